//! Link liveness. Pure: time is an input.
//!
//! A WireGuard tunnel never goes down by itself, so each link carries authenticated keepalives
//! every `interval`; a link from which nothing arrived for `dead_after` intervals is dead. The
//! tracker reports each transition once, so the caller logs it once and re-plans routes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub interval: Duration,
    pub dead_after: u32,
}

impl Liveness {
    pub fn deadline(&self) -> Duration {
        self.interval * self.dead_after
    }

    pub fn is_alive(&self, last_rx: Option<Instant>, now: Instant) -> bool {
        last_rx.is_some_and(|t| now.saturating_duration_since(t) < self.deadline())
    }
}

/// Remembers which links are alive and reports changes. Updated in place: a tick with
/// nothing new allocates nothing.
#[derive(Debug)]
pub struct Tracker<K: Ord + Clone> {
    /// Alive links, with the round they were last fed in.
    alive: BTreeMap<K, u64>,
    round: u64,
}

impl<K: Ord + Clone> Default for Tracker<K> {
    fn default() -> Self {
        Tracker {
            alive: BTreeMap::new(),
            round: 0,
        }
    }
}

impl<K: Ord + Clone> Tracker<K> {
    /// Feed the current verdict of every link; returns the links whose verdict changed, with
    /// the new verdict. Links seen for the first time start dead (no transition reported unless
    /// they are alive); links not fed are dead, and forgotten without a transition (a link
    /// removed by a reload, or one never heard from, which the caller need not feed).
    pub fn update(&mut self, links: impl IntoIterator<Item = (K, bool)>) -> Vec<(K, bool)> {
        self.round += 1;
        let round = self.round;
        let mut changed = Vec::new();
        for (k, alive) in links {
            match (alive, self.alive.get_mut(&k)) {
                (true, Some(r)) => *r = round,
                (true, None) => {
                    changed.push((k.clone(), true));
                    self.alive.insert(k, round);
                }
                (false, Some(_)) => {
                    self.alive.remove(&k);
                    changed.push((k, false));
                }
                (false, None) => {}
            }
        }
        self.alive.retain(|_, r| *r == round);
        changed
    }

    pub fn is_alive(&self, k: &K) -> bool {
        self.alive.contains_key(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Liveness = Liveness {
        interval: Duration::from_millis(300),
        dead_after: 3,
    };

    #[test]
    fn a_link_dies_after_dead_after_silent_intervals_and_comes_back_with_a_packet() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut tr = Tracker::default();
        assert_eq!(
            tr.update([("l0", P.is_alive(Some(t0), t0))]),
            vec![("l0", true)]
        );
        assert!(tr
            .update([("l0", P.is_alive(Some(t0), at(899)))])
            .is_empty());
        assert_eq!(
            tr.update([("l0", P.is_alive(Some(t0), at(900)))]),
            vec![("l0", false)]
        );
        assert_eq!(
            tr.update([("l0", P.is_alive(Some(at(5000)), at(5000)))]),
            vec![("l0", true)]
        );
    }

    #[test]
    fn a_link_that_never_heard_anything_is_dead_without_a_transition() {
        let mut tr = Tracker::default();
        assert!(tr
            .update([("l0", P.is_alive(None, Instant::now()))])
            .is_empty());
        assert!(!tr.is_alive(&"l0"));
    }

    #[test]
    fn a_link_no_longer_fed_is_forgotten_without_a_transition() {
        let mut tr = Tracker::default();
        assert_eq!(tr.update([("l0", true), ("l1", true)]).len(), 2);
        assert!(tr.update([("l0", true)]).is_empty());
        assert!(tr.is_alive(&"l0") && !tr.is_alive(&"l1"));
        assert_eq!(
            tr.update([("l1", true)]),
            vec![("l1", true)],
            "back: up again"
        );
    }
}
