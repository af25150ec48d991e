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

/// Remembers the last verdict per link key and reports changes.
#[derive(Debug, Default)]
pub struct Tracker<K: Ord + Clone> {
    alive: BTreeMap<K, bool>,
}

impl<K: Ord + Clone> Tracker<K> {
    /// Feed the current verdict of every link; returns the links whose verdict changed, with
    /// the new verdict. Links seen for the first time start dead (no transition reported unless
    /// they are alive). Links not fed are forgotten.
    pub fn update(&mut self, links: impl IntoIterator<Item = (K, bool)>) -> Vec<(K, bool)> {
        let mut changed = Vec::new();
        let mut seen = BTreeMap::new();
        for (k, alive) in links {
            let before = self.alive.get(&k).copied().unwrap_or(false);
            if alive != before {
                changed.push((k.clone(), alive));
            }
            seen.insert(k, alive);
        }
        self.alive = seen;
        changed
    }

    pub fn is_alive(&self, k: &K) -> bool {
        self.alive.get(k).copied().unwrap_or(false)
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
}
