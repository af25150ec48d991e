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
    /// Feed the current `last_rx` of every link; returns the links whose verdict changed, with
    /// the new verdict. Links seen for the first time start dead (no transition reported unless
    /// they are alive).
    pub fn update(
        &mut self,
        policy: Liveness,
        now: Instant,
        links: impl IntoIterator<Item = (K, Option<Instant>)>,
    ) -> Vec<(K, bool)> {
        let mut changed = Vec::new();
        let mut seen = BTreeMap::new();
        for (k, last) in links {
            let alive = policy.is_alive(last, now);
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
        let mut tr = Tracker::default();
        assert_eq!(tr.update(P, t0, [("l0", Some(t0))]), vec![("l0", true)]);
        assert!(tr
            .update(P, t0 + Duration::from_millis(899), [("l0", Some(t0))])
            .is_empty());
        assert_eq!(
            tr.update(P, t0 + Duration::from_millis(900), [("l0", Some(t0))]),
            vec![("l0", false)]
        );
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(tr.update(P, t1, [("l0", Some(t1))]), vec![("l0", true)]);
    }

    #[test]
    fn a_link_that_never_heard_anything_is_dead_without_a_transition() {
        let mut tr = Tracker::default();
        assert!(tr.update(P, Instant::now(), [("l0", None)]).is_empty());
        assert!(!tr.is_alive(&"l0"));
    }
}
