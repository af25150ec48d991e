//! What the daemon decides, without I/O and without a clock of its own. Pure.
//!
//! ```text
//!  link verdicts (engine, at `now`) ─┐
//!  learned routes (speaker's watch) ─┼─▶ Core ─▶ Reaction { transitions, reachable,
//!  underlay networks (observed)  ────┘      │               tables, kernel plan }
//!                                           └── installed: the kernel state last applied
//! ```
//!
//! The core keeps the inputs of [`intent::derive`] (the config, the liveness tracker, what iBGP
//! taught, the underlay networks) and the kernel state it last installed. Each input change
//! re-derives the intent and answers with exactly what follows from it: the liveness
//! transitions to log, the nodes whose reachability changed (a gateway tells BGP), new
//! datapath tables, and the kernel plan from the installed state to the new one (a link flip:
//! one route replace per prefix it carries). The edge applies that plan with one netlink
//! request per change; the periodic full reconcile ([`Core::installed`]) repairs drift.

use crate::datapath::engine::Link;
use crate::datapath::liveness::{Liveness, Tracker};
use crate::intent::links::LinkSpec;
use crate::intent::plan::{diff, Plan};
use crate::intent::state::HostState;
use crate::intent::{self, HostIntent, Inputs, Learned};
use crate::model::config::{Config, Role};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// (peer name, link index).
pub type LinkKey = (String, u32);

/// Withdrawn prefixes whose blackholes a node keeps (bounded: a flapping peer cannot grow it).
pub const MAX_WITHDRAWN: usize = 4096;

pub struct Core {
    cfg: Config,
    host: String,
    role: Role,
    learned: Learned,
    underlay: Vec<IpNet>,
    tracker: Tracker<LinkKey>,
    /// Gateways whose probes say they are drained (a node routes around them).
    draining: BTreeSet<String>,
    /// The datapath tables last handed out (one spec per device), so a reaction names only
    /// the devices whose table changed.
    tables: Vec<LinkSpec>,
    /// The kernel state last applied (verified by a full reconcile, or reached by applying the
    /// plans of reactions since). None: unknown, the next change needs a full reconcile.
    installed: Option<HostState>,
}

/// What follows from one input change.
#[derive(Debug, Default)]
pub struct Reaction {
    /// Links whose liveness changed, with the new verdict.
    pub transitions: Vec<(LinkKey, bool)>,
    /// Peers that became reachable (some link live) or unreachable (none live): nodes on a
    /// gateway, gateways on a node.
    pub reachable: Vec<(String, bool)>,
    /// New datapath tables, only for the devices whose table changed (learned routes or
    /// the underlay changed).
    pub tables: Vec<LinkSpec>,
    /// The kernel changes from the installed state to the new intent, with the state they
    /// lead to; None when the kernel stays as it is.
    pub kernel: Option<(Plan, HostState)>,
    /// The installed state is unknown: reconcile in full instead.
    pub full: bool,
}

impl Reaction {
    pub fn is_empty(&self) -> bool {
        self.transitions.is_empty()
            && self.reachable.is_empty()
            && self.tables.is_empty()
            && self.kernel.is_none()
            && !self.full
    }
}

/// The verdict on every (peer, link) of `links` at `now`. Peers never heard from are left
/// out: they are dead, which is what the tracker assumes of a link it is not fed (a gateway
/// with a large pool of enrolled nodes pays only for the ones that connected).
pub fn verdicts<'a>(
    links: impl IntoIterator<Item = &'a Link>,
    policy: Liveness,
    now: Instant,
) -> Vec<(LinkKey, bool)> {
    let mut v = Vec::new();
    for link in links {
        for p in link.peers().iter().filter(|p| link.last_rx(p).is_some()) {
            v.push((
                (p.spec.name.clone(), link.index),
                link.alive(p, policy, now),
            ));
        }
    }
    v
}

impl Core {
    pub fn new(cfg: Config, host: &str) -> Result<Core, String> {
        let mut core = Core {
            role: Role::Relay,
            cfg,
            host: host.to_string(),
            learned: Learned::new(),
            underlay: Vec::new(),
            tracker: Tracker::default(),
            draining: BTreeSet::new(),
            tables: Vec::new(),
            installed: None,
        };
        let i = core.all_live()?;
        core.role = i.role;
        core.tables = i.links;
        Ok(core)
    }

    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn is_alive(&self, peer: &str, link: u32) -> bool {
        self.tracker.is_alive(&(peer.to_string(), link))
    }

    pub fn policy(&self) -> Liveness {
        Liveness {
            interval: Duration::from_millis(self.cfg.site.keepalive_ms as u64),
            dead_after: self.cfg.site.dead_after,
        }
    }

    fn derive(&self, cfg: &Config, live: intent::Live<'_>) -> Result<HostIntent, String> {
        intent::derive(
            cfg,
            &self.host,
            Inputs {
                live,
                draining: &self.draining,
                learned: &self.learned,
                underlay: &self.underlay,
            },
        )
        .map_err(|e| e.to_string())
    }

    /// The host intent now: the live links, what iBGP taught, the underlay.
    pub fn intent(&self) -> Result<HostIntent, String> {
        let tracker = &self.tracker;
        self.derive(&self.cfg, &|peer: &str, link: u32| {
            tracker.is_alive(&(peer.to_string(), link))
        })
    }

    /// The intent with every link counted alive: the datapath tables (which do not depend on
    /// liveness) and the BGP sessions.
    pub fn all_live(&self) -> Result<HostIntent, String> {
        self.derive(&self.cfg, &|_, _| true)
    }

    /// A full reconcile left the kernel in `state`.
    pub fn installed(&mut self, state: HostState) {
        self.installed = Some(state);
    }

    /// An applied plan failed: what the kernel holds is unknown until a full reconcile.
    pub fn forget_installed(&mut self) {
        self.installed = None;
    }

    /// The underlay networks as last observed; true when they changed.
    pub fn set_underlay(&mut self, nets: impl IntoIterator<Item = IpNet>) -> bool {
        let nets: Vec<IpNet> = nets.into_iter().collect();
        let changed = nets != self.underlay;
        self.underlay = nets;
        changed
    }

    /// The kernel plan from the installed state to the current intent.
    fn kernel(&self, r: &mut Reaction) -> Result<(), String> {
        let Some(installed) = &self.installed else {
            r.full = true;
            return Ok(());
        };
        let want = self.intent()?.kernel;
        let plan = diff(&self.host, self.role, &want, installed).map_err(|e| e.to_string())?;
        if !plan.is_empty() {
            r.kernel = Some((plan, want));
        }
        Ok(())
    }

    /// The gateways that say they are drained, as the links' probes last told.
    pub fn draining_changed(&mut self, now: BTreeSet<String>) -> Result<Reaction, String> {
        let mut r = Reaction::default();
        if now == self.draining {
            return Ok(r);
        }
        self.draining = now;
        self.kernel(&mut r)?;
        Ok(r)
    }

    pub fn draining(&self) -> &BTreeSet<String> {
        &self.draining
    }

    /// New liveness verdicts (every running link's, see [`verdicts`]).
    pub fn verdicts(&mut self, seen: Vec<(LinkKey, bool)>) -> Result<Reaction, String> {
        let mut r = Reaction {
            transitions: self.tracker.update(seen),
            ..Default::default()
        };
        if r.transitions.is_empty() {
            return Ok(r);
        }
        // A peer with no live link at all is unreachable: BGP must know at once (a gateway
        // withdraws that node's routes; a node reconnects to a gateway the moment it is back).
        let touched: BTreeSet<&str> = r.transitions.iter().map(|((p, _), _)| p.as_str()).collect();
        for peer in touched {
            let flipped = |i: u32| r.transitions.iter().any(|((p, l), _)| p == peer && *l == i);
            let now = (0..self.cfg.site.links).any(|i| self.is_alive(peer, i));
            let before = (0..self.cfg.site.links).any(|i| self.is_alive(peer, i) != flipped(i));
            if now != before {
                r.reachable.push((peer.to_string(), now));
            }
        }
        self.kernel(&mut r)?;
        Ok(r)
    }

    /// What the speaker says the host routes by now. A prefix learned before and missing now
    /// is withdrawn: it stays as an empty set (a node keeps its fail-closed blackhole), at most
    /// [`MAX_WITHDRAWN`] of them.
    pub fn learned_changed(&mut self, from_speaker: &Learned) -> Result<Reaction, String> {
        let mut learned = from_speaker.clone();
        learned.retain(|_, by| !by.is_empty());
        // Just withdrawn first (they were live until now), then those withdrawn before: a
        // peer cycling through prefixes cannot push a fresh withdrawal out of the bound.
        let just: Vec<IpNet> = self
            .learned
            .iter()
            .filter(|(p, by)| !by.is_empty() && !learned.contains_key(p))
            .map(|(p, _)| *p)
            .collect();
        let older: Vec<IpNet> = self
            .learned
            .iter()
            .filter(|(p, by)| by.is_empty() && !learned.contains_key(p))
            .map(|(p, _)| *p)
            .collect();
        for p in just.into_iter().chain(older).take(MAX_WITHDRAWN) {
            learned.insert(p, BTreeSet::new());
        }
        let mut r = Reaction::default();
        if learned == self.learned {
            return Ok(r);
        }
        // Commit only when the whole reaction could be derived.
        let (old_learned, old_tables) = (
            std::mem::replace(&mut self.learned, learned),
            self.tables.clone(),
        );
        let result = self.changed_tables().and_then(|t| {
            r.tables = t;
            self.kernel(&mut r)
        });
        if let Err(e) = result {
            self.learned = old_learned;
            self.tables = old_tables;
            return Err(e);
        }
        Ok(r)
    }

    /// What iBGP taught, as the intent reads it.
    pub fn learned(&self) -> &Learned {
        &self.learned
    }

    /// The underlay changed (observed by a full reconcile): the reaction to it.
    pub fn underlay_changed(&mut self) -> Result<Reaction, String> {
        let mut r = Reaction {
            tables: self.changed_tables()?,
            ..Default::default()
        };
        self.kernel(&mut r)?;
        Ok(r)
    }

    /// The datapath tables that differ from the ones last handed out; remembers the new ones.
    fn changed_tables(&mut self) -> Result<Vec<LinkSpec>, String> {
        let new = self.all_live()?.links;
        let changed = new
            .iter()
            .filter(|s| !self.tables.contains(s))
            .cloned()
            .collect();
        self.tables = new;
        Ok(changed)
    }

    /// Take a new config; the role must stay. Returns the intent with every link alive (its
    /// datapath tables and sessions); the caller reconciles in full next.
    pub fn reload(&mut self, cfg: Config) -> Result<HostIntent, String> {
        let i = self.derive(&cfg, &|_, _| true)?;
        if i.role != self.role {
            return Err(format!(
                "{} changes role from {} to {}: restart the daemon for that",
                self.host, self.role, i.role
            ));
        }
        self.cfg = cfg;
        self.tables = i.links.clone();
        Ok(i)
    }
}

#[cfg(test)]
mod tests;
