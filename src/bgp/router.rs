//! What the RIB task decides, without I/O and without a clock: session events in, messages to
//! send, timers to start and changed prefixes out. [`super::speaker`] only moves them.
//!
//! ```text
//!  Input::{Up, Update, Refresh, Down, StaleExpired, Reachable(.., Lost), Shutdown}
//!        │
//!        ▼
//!  Router ── Rib (Adj-RIB-In, Loc-RIB, reflection, policy)
//!        │── AdjRibOut per established peer (send only differences)
//!        │── Restarts (which graceful-restart timer still counts)
//!        ▼
//!  Output { send: (peer, Message), timers, changed prefixes }
//! ```
//!
//! What the host routes by ([`Router::learned`]) is read from the same RIB: per prefix, the
//! names of the peers whose paths are among the equal-cost best, filtered by [`Learn`].

use super::adj_rib_out::AdjRibOut;
use super::fsm::Negotiated;
use super::restart::{Restarts, Timer, STALE_PATH_TIME};
use super::rib::{Applied, PeerId, PeerKind, Rib};
use super::wire::{Context, Message, Notification, Update};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Prefixes learned over iBGP, each with the names of the peers whose paths the host may
/// route by (see [`crate::intent::Learned`]).
pub type Learned = BTreeMap<IpNet, BTreeSet<String>>;

/// Whose paths a host routes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    /// Every peer's (a node: its gateways).
    FromAll,
    /// Route-reflector clients' only (a gateway: its nodes; the site router's and the other
    /// gateway's routes are reached over the site LAN, not the tunnels).
    FromClients,
}

#[derive(Debug)]
pub enum Input {
    Up(PeerId, Negotiated),
    Update(PeerId, Box<Update>),
    /// The peer asks for everything again (RFC 2918).
    Refresh(PeerId),
    /// Session down; with a duration the peer restarts gracefully and its routes stay stale.
    Down(PeerId, Option<Duration>),
    /// A [`Timer`] ran out.
    StaleExpired(PeerId, u64),
    /// The datapath can (or can no longer) reach this peer.
    Reachable(PeerId, bool, Lost),
    /// Going away on purpose: tell every established peer (Cease, administrative shutdown).
    Shutdown,
    /// Drained (true) or back in service: a drained gateway announces nothing to anyone, so
    /// the site routers drop its paths and the nodes its reflected routes, while every
    /// session stays up to carry them again the moment it is undrained.
    Drain(bool),
}

/// Why a peer cannot be reached: every tunnel link to it is dead, or its BFD session went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    Tunnel,
    Bfd,
}

#[derive(Debug, Default)]
pub struct Output {
    /// Messages for established sessions; a NOTIFICATION ends that session.
    pub send: Vec<(PeerId, Message)>,
    /// Timers to start; each reports back as [`Input::StaleExpired`].
    pub timers: Vec<Timer>,
    /// Prefixes whose paths changed.
    pub changed: Vec<IpNet>,
    /// Why, for the log: (peer, what happened).
    pub events: Vec<(PeerId, String)>,
    /// Prefixes refused by policy, and why: a peer decides how many, so the log rations them.
    pub rejected: Vec<(PeerId, IpNet, String)>,
}

struct Established {
    ctx: Context,
    out: AdjRibOut,
}

pub struct Router {
    pub rib: Rib,
    up: BTreeMap<PeerId, Established>,
    restarts: Restarts,
    learn: Learn,
    drained: bool,
}

impl Router {
    pub fn new(rib: Rib, learn: Learn) -> Router {
        let restarts = Restarts::new(rib.peers.len());
        Router {
            rib,
            up: BTreeMap::new(),
            restarts,
            learn,
            drained: false,
        }
    }

    /// Start drained (the site file says so).
    pub fn drained(mut self, on: bool) -> Router {
        self.drained = on;
        self
    }

    pub fn is_up(&self, peer: PeerId) -> bool {
        self.up.contains_key(&peer)
    }

    /// How many (prefix, path) entries `peer` holds from us.
    pub fn sent_count(&self, peer: PeerId) -> usize {
        self.up.get(&peer).map_or(0, |e| e.out.len())
    }

    pub fn handle(&mut self, input: Input) -> Output {
        let mut o = Output::default();
        match input {
            Input::Shutdown => {
                for id in self.up.keys() {
                    o.send
                        .push((*id, Message::Notification(Notification::cease(2))));
                }
            }
            Input::Drain(on) if on != self.drained => {
                self.drained = on;
                let ids: Vec<PeerId> = self.up.keys().copied().collect();
                for prefix in self.rib.prefixes() {
                    for id in &ids {
                        self.export_one(*id, &prefix, &mut o);
                    }
                }
            }
            Input::Drain(_) => {}
            Input::Up(id, n) => {
                self.restarts.session_up(id);
                self.rib.peers[id].router_id = Some(n.peer_id);
                let stale = self.rib.stale_count(id);
                if stale > 0 {
                    if n.peer_restart_time.is_none() {
                        // RFC 4724 §4.2: back without the capability, its stale routes go.
                        o.changed.extend(self.rib.sweep_stale(id));
                        o.events.push((
                            id,
                            "back without graceful restart: stale routes removed".into(),
                        ));
                    } else {
                        o.timers.push(self.restarts.timer(id, STALE_PATH_TIME));
                    }
                }
                self.up.insert(
                    id,
                    Established {
                        ctx: n.context(),
                        out: AdjRibOut::default(),
                    },
                );
                self.export_all(id, &mut o);
            }
            Input::Refresh(id) => {
                if let Some(e) = self.up.get_mut(&id) {
                    e.out.clear();
                    self.export_all(id, &mut o);
                }
            }
            Input::Down(id, Some(restart)) => {
                self.up.remove(&id);
                self.rib.mark_stale(id);
                o.events.push((
                    id,
                    format!(
                        "restarting gracefully: {} route(s) kept stale for {restart:?}",
                        self.rib.stale_count(id)
                    ),
                ));
                o.timers.push(self.restarts.timer(id, restart));
            }
            Input::Down(id, None) => {
                self.up.remove(&id);
                o.changed = self.rib.peer_down(id);
            }
            Input::StaleExpired(id, g) => {
                if self.restarts.counts((id, g)) && self.rib.stale_count(id) > 0 {
                    o.events
                        .push((id, "stale time over: stale routes removed".into()));
                    o.changed = self.rib.sweep_stale(id);
                }
            }
            Input::Reachable(id, false, lost) => {
                if self.up.remove(&id).is_some() {
                    let (why, subcode) = match lost {
                        // Cease 8 ("out of resources") is the closest RFC 4486 has.
                        Lost::Tunnel => ("no live tunnel", 8),
                        // RFC 9384: Cease subcode 10, "BFD Down".
                        Lost::Bfd => ("BFD session down", 10),
                    };
                    o.events
                        .push((id, format!("{why}: session reset, routes withdrawn")));
                    // The NOTIFICATION ends the session task.
                    o.send
                        .push((id, Message::Notification(Notification::cease(subcode))));
                }
                // A restarting peer's stale routes go too, and the others are told.
                o.changed = self.rib.sweep_stale(id);
                o.changed.extend(self.rib.peer_down(id));
            }
            Input::Reachable(_, true, _) => {}
            Input::Update(id, u) => {
                let Applied {
                    mut changed,
                    rejected,
                    max_prefix_exceeded,
                } = self.rib.apply(id, &u);
                if u.is_end_of_rib() {
                    // RFC 4724: after End-of-RIB, what the peer did not re-announce is gone.
                    changed.extend(self.rib.sweep_stale(id));
                }
                o.rejected
                    .extend(rejected.into_iter().map(|(prefix, why)| (id, prefix, why)));
                if max_prefix_exceeded && self.up.remove(&id).is_some() {
                    o.events.push((
                        id,
                        format!(
                            "max-prefix {} exceeded: stopping the session",
                            self.rib.peers[id].policy.max_prefix
                        ),
                    ));
                    o.send
                        .push((id, Message::Notification(Notification::cease(1))));
                    // Down now, before anything is exported: not one route of a session over
                    // its limit reaches another peer (whose own limit counts on this one's).
                    changed.extend(self.rib.sweep_stale(id));
                    changed.extend(self.rib.peer_down(id));
                }
                o.changed = changed;
            }
        }
        o.changed.sort();
        o.changed.dedup();
        let changed = o.changed.clone();
        for prefix in &changed {
            let ids: Vec<PeerId> = self.up.keys().copied().collect();
            for id in ids {
                self.export_one(id, prefix, &mut o);
            }
        }
        o
    }

    fn export_one(&mut self, to: PeerId, prefix: &IpNet, o: &mut Output) {
        let Some(e) = self.up.get_mut(&to) else {
            return;
        };
        // (our path identifier, attributes); 0 for the one path of a session without ADD-PATH.
        let want = if self.drained {
            Vec::new()
        } else if e.ctx.add_path_tx.has(matches!(prefix, IpNet::V6(_))) {
            self.rib.export_paths(to, prefix)
        } else {
            self.rib
                .export(to, prefix)
                .map(|a| (0, a))
                .into_iter()
                .collect()
        };
        for u in e.out.update(*prefix, want) {
            o.send.push((to, Message::Update(u)));
        }
    }

    fn export_all(&mut self, to: PeerId, o: &mut Output) {
        for prefix in self.rib.prefixes() {
            self.export_one(to, &prefix, o);
        }
        // End-of-RIB (RFC 4724): an empty UPDATE.
        o.send.push((to, Message::Update(Update::default())));
    }

    /// The names of the peers whose equal-cost paths to `prefix` the host routes by.
    pub fn learned(&self, prefix: &IpNet) -> BTreeSet<String> {
        self.rib
            .multipath(prefix)
            .iter()
            .filter_map(|p| p.from)
            .filter(|i| self.learn == Learn::FromAll || self.rib.peers[*i].kind == PeerKind::Client)
            .map(|i| self.rib.peers[i].name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests;
