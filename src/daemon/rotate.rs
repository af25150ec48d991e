//! Hitless key rotation: which link moves to the target key next, when a move is done, and
//! when one is given up. Pure: the daemon feeds it a view of its links and the time.
//!
//! A host's links all start on its current key. When the site file lists a next key for the
//! host and the host holds its private half, the next key is the target. A link moves once
//! every peer live on it has said (in its liveness probes) that its own site file lists the
//! next key, so hosts that load the new site file in any order lose nothing: one link at a
//! time is rebuilt under it ([`crate::datapath::engine::Link::rekeyed`]) and handshakes at once,
//! while the other links carry the traffic (the kernel's multipath routes lose nothing, the
//! moved link keeps its liveness). The move is done when every peer that was live on the link
//! holds a session with the new key; the next link follows. A move that does not complete
//! within [`MOVE_TIMEOUT`] (a peer whose site file does not list the next key yet) goes back
//! to the key it came from and is tried again after [`RETRY_AFTER`]. When the site file
//! drops the next key again (a rotation called off), the current key is the target and the
//! moved links come back the same way.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How long a moved link may take to complete its handshakes with the new key.
pub const MOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after a failed move the next attempt starts.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How often a moving link handshakes again with the peers that have not answered (one that
/// loads the site file listing the new key a moment after this host did).
pub const NUDGE: Duration = Duration::from_secs(1);
/// Peers asked per nudge (and at the move): the answers stay under the link's handshake rate
/// limit (100 a second), so a gateway link with hundreds of nodes is not answered with
/// cookies. The timeout grows by a second per this many peers.
pub const PACE: usize = 40;

/// How long a move may take for `peers` peers.
pub fn move_timeout(peers: usize) -> Duration {
    MOVE_TIMEOUT + NUDGE * (peers / PACE) as u32
}

/// One link as the rotation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkView {
    pub dev: String,
    /// The link runs on the target key.
    pub on_target: bool,
    /// Peers live on the link now.
    pub live: BTreeSet<String>,
    /// Peers holding a session with the link's key (a handshake completed under it).
    pub established: BTreeSet<String>,
    /// Peers that take handshakes signed with the target key (their probes say their site
    /// file lists it, or they never probe).
    pub ready: BTreeSet<String>,
}

/// What the daemon does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing now.
    Wait,
    /// Rebuild this link under the target key and handshake.
    Move(String),
    /// This link's move failed: rebuild it under the key it had and handshake.
    Revert(String),
    /// Handshake again on the moving link with these peers, which have not answered yet.
    Nudge(String, BTreeSet<String>),
}

#[derive(Debug, Clone)]
struct Moving {
    dev: String,
    since: Instant,
    nudged: Instant,
    /// The peers that must hold a session with the new key for the move to count.
    expect: BTreeSet<String>,
}

/// The rotation's progress, kept across reloads.
#[derive(Debug, Clone, Default)]
pub struct Rotation {
    moving: Option<Moving>,
    retry_at: Option<Instant>,
    /// Links moved so far, and moves given up.
    pub moves: u64,
    pub reverts: u64,
}

impl Rotation {
    /// The link being moved, if one is.
    pub fn moving(&self) -> Option<&str> {
        self.moving.as_ref().map(|m| m.dev.as_str())
    }

    /// Decide the next step from the links now. Links are moved in the order given.
    pub fn step(&mut self, links: &[LinkView], now: Instant) -> Step {
        if let Some(m) = &self.moving {
            match links.iter().find(|l| l.dev == m.dev) {
                // The link went away (a reload), or the target changed under it.
                None => self.moving = None,
                Some(l) if !l.on_target => self.moving = None,
                // Peers that went dead meanwhile are not waited for.
                Some(l)
                    if m.expect
                        .intersection(&l.live)
                        .all(|p| l.established.contains(p)) =>
                {
                    self.moves += 1;
                    self.moving = None;
                }
                Some(_)
                    if now.saturating_duration_since(m.since) >= move_timeout(m.expect.len()) =>
                {
                    let dev = m.dev.clone();
                    self.moving = None;
                    self.reverts += 1;
                    self.retry_at = Some(now + RETRY_AFTER);
                    return Step::Revert(dev);
                }
                Some(l) if now.saturating_duration_since(m.nudged) >= NUDGE => {
                    let dev = m.dev.clone();
                    let late = m
                        .expect
                        .intersection(&l.live)
                        .filter(|p| !l.established.contains(*p))
                        .take(PACE)
                        .cloned()
                        .collect();
                    if let Some(m) = &mut self.moving {
                        m.nudged = now;
                    }
                    return Step::Nudge(dev, late);
                }
                Some(_) => return Step::Wait,
            }
        }
        if self.retry_at.is_some_and(|t| now < t) {
            return Step::Wait;
        }
        self.retry_at = None;
        match links
            .iter()
            .find(|l| !l.on_target && l.live.is_subset(&l.ready))
        {
            Some(l) => {
                self.moving = Some(Moving {
                    dev: l.dev.clone(),
                    since: now,
                    nudged: now,
                    expect: l.live.clone(),
                });
                Step::Move(l.dev.clone())
            }
            None => Step::Wait,
        }
    }

    /// The live peers that keep links from moving: their site file does not list the target
    /// key yet.
    pub fn unready(links: &[LinkView]) -> BTreeSet<String> {
        links
            .iter()
            .filter(|l| !l.on_target)
            .flat_map(|l| l.live.difference(&l.ready).cloned().collect::<Vec<_>>())
            .collect()
    }

    /// The peers the current move waits for that do not hold the new key yet.
    pub fn waiting_for(&self, links: &[LinkView]) -> Vec<String> {
        let Some(m) = &self.moving else {
            return Vec::new();
        };
        let est = links
            .iter()
            .find(|l| l.dev == m.dev)
            .map(|l| &l.established);
        m.expect
            .iter()
            .filter(|p| est.is_none_or(|e| !e.contains(*p)))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn view(dev: &str, on_target: bool, live: &[&str], est: &[&str]) -> LinkView {
        LinkView {
            dev: dev.into(),
            on_target,
            live: set(live),
            established: set(est),
            ready: set(live),
        }
    }

    #[test]
    fn a_link_waits_until_every_live_peer_lists_the_next_key() {
        let t = Instant::now();
        let mut r = Rotation::default();
        let mut links = vec![
            view("ap-l0", false, &["c1", "c2"], &["c1", "c2"]),
            view("ap-l1", false, &["c1"], &["c1"]),
        ];
        links[0].ready = set(&["c1"]);
        links[1].ready = set(&[]);
        assert_eq!(
            r.step(&links, t),
            Step::Wait,
            "c2 and c1 do not list it yet"
        );
        assert_eq!(Rotation::unready(&links), set(&["c1", "c2"]));
        links[1].ready = set(&["c1"]);
        assert_eq!(
            r.step(&links, t),
            Step::Move("ap-l1".into()),
            "ap-l1's peer is ready"
        );
        assert_eq!(Rotation::unready(&links), set(&["c2"]));
    }

    #[test]
    fn links_move_one_at_a_time_each_once_the_last_one_completed() {
        let t = Instant::now();
        let mut r = Rotation::default();
        let mut links = vec![
            view("ap-l0", false, &["c1", "c2"], &["c1", "c2"]),
            view("ap-l1", false, &["c1", "c2"], &["c1", "c2"]),
        ];
        assert_eq!(r.step(&links, t), Step::Move("ap-l0".into()));
        // Rebuilt: on the target, no session with the new key yet.
        links[0] = view("ap-l0", true, &["c1", "c2"], &["c2"]);
        assert_eq!(r.step(&links, t), Step::Wait, "c1 has not handshaken");
        assert_eq!(r.waiting_for(&links), vec!["c1".to_string()]);
        assert_eq!(r.moving(), Some("ap-l0"));
        links[0].established = set(&["c1", "c2"]);
        assert_eq!(r.step(&links, t), Step::Move("ap-l1".into()));
        assert_eq!(r.moves, 1);
        links[1] = view("ap-l1", true, &["c1", "c2"], &["c1", "c2"]);
        assert_eq!(r.step(&links, t), Step::Wait);
        assert_eq!(r.moves, 2);
        assert_eq!(r.step(&links, t + RETRY_AFTER), Step::Wait, "all moved");
    }

    #[test]
    fn a_move_the_peers_do_not_complete_goes_back_and_is_retried_later() {
        let t = Instant::now();
        let mut r = Rotation::default();
        let mut links = vec![view("ap-gw1-0", false, &["gw1"], &["gw1"])];
        assert_eq!(r.step(&links, t), Step::Move("ap-gw1-0".into()));
        links[0] = view("ap-gw1-0", true, &["gw1"], &[]);
        assert_eq!(r.step(&links, t + NUDGE / 2), Step::Wait);
        assert_eq!(
            r.step(&links, t + NUDGE),
            Step::Nudge("ap-gw1-0".into(), set(&["gw1"])),
            "the peer that has not answered is asked again"
        );
        assert_eq!(r.step(&links, t + NUDGE + NUDGE / 2), Step::Wait);
        assert_eq!(
            r.step(&links, t + MOVE_TIMEOUT),
            Step::Revert("ap-gw1-0".into())
        );
        assert_eq!(r.reverts, 1);
        links[0] = view("ap-gw1-0", false, &["gw1"], &["gw1"]);
        let later = t + MOVE_TIMEOUT;
        assert_eq!(r.step(&links, later + RETRY_AFTER / 2), Step::Wait);
        assert_eq!(
            r.step(&links, later + RETRY_AFTER),
            Step::Move("ap-gw1-0".into())
        );
    }

    #[test]
    fn a_peer_that_dies_during_a_move_is_not_waited_for_and_big_links_get_longer() {
        let t = Instant::now();
        let mut r = Rotation::default();
        let mut links = vec![view("ap-l0", false, &["c1", "c2"], &["c1", "c2"])];
        assert_eq!(r.step(&links, t), Step::Move("ap-l0".into()));
        links[0] = view("ap-l0", true, &["c1"], &["c1"]);
        assert_eq!(r.step(&links, t), Step::Wait);
        assert_eq!(r.moves, 1, "c2 died: the move is done without it");
        assert_eq!(move_timeout(10), MOVE_TIMEOUT);
        assert_eq!(move_timeout(400), MOVE_TIMEOUT + 10 * NUDGE);
    }

    #[test]
    fn a_link_with_no_live_peer_moves_at_once_and_a_vanished_link_ends_its_move() {
        let t = Instant::now();
        let mut r = Rotation::default();
        let links = vec![view("ap-l0", false, &[], &[])];
        assert_eq!(r.step(&links, t), Step::Move("ap-l0".into()));
        let moved = vec![view("ap-l0", true, &[], &[])];
        assert_eq!(r.step(&moved, t), Step::Wait);
        assert_eq!(r.moves, 1);
        let mut r = Rotation::default();
        assert_eq!(r.step(&links, t), Step::Move("ap-l0".into()));
        assert_eq!(
            r.step(&[], t + MOVE_TIMEOUT),
            Step::Wait,
            "no revert of a gone link"
        );
        assert_eq!((r.moves, r.reverts), (0, 0));
    }
}
