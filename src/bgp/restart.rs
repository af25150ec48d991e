//! Graceful restart, receiving side (RFC 4724 §4.2): which timer still counts. Pure.
//!
//! A peer whose session drops without a NOTIFICATION, having announced graceful restart, keeps
//! its routes marked stale for its restart time. Two timers bound them:
//! - the restart time, started when the session drops: if the peer is not back when it runs
//!   out, the stale routes go;
//! - once the peer is back, the stale-path time ([`STALE_PATH_TIME`]): End-of-RIB normally
//!   sweeps the routes it did not re-announce first; a peer that never sends it must not keep
//!   stale routes for ever.
//!
//! A timer belongs to one session generation: a timer from an earlier session is ignored.
//! A peer that comes back without the capability loses its stale routes at once.

use super::rib::PeerId;
use std::time::Duration;

/// How long a re-established peer's stale routes may wait for its End-of-RIB (FRR's
/// `bgp graceful-restart stalepath-time` default).
pub const STALE_PATH_TIME: Duration = Duration::from_secs(360);

/// Session generations per peer: each established session is a new generation.
#[derive(Debug, Default)]
pub struct Restarts {
    generation: Vec<u64>,
}

/// A timer to run: after `after`, the caller reports `(peer, generation)` back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timer {
    pub peer: PeerId,
    pub after: Duration,
    pub generation: u64,
}

impl Restarts {
    pub fn new(peers: usize) -> Restarts {
        Restarts {
            generation: vec![0; peers],
        }
    }

    /// A session with `peer` is established: timers of earlier sessions no longer count.
    pub fn session_up(&mut self, peer: PeerId) {
        self.generation[peer] += 1;
    }

    /// A timer for the current session generation of `peer`.
    pub fn timer(&self, peer: PeerId, after: Duration) -> Timer {
        Timer {
            peer,
            after,
            generation: self.generation[peer],
        }
    }

    /// Does a timer that ran out still sweep the peer's stale routes? Only when no session
    /// came up since it was started.
    pub fn counts(&self, t: (PeerId, u64)) -> bool {
        self.generation.get(t.0) == Some(&t.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_counts_only_for_the_generation_it_was_started_in() {
        let mut r = Restarts::new(2);
        let down = r.timer(1, Duration::from_secs(120));
        assert!(r.counts((1, down.generation)));
        r.session_up(1);
        assert!(!r.counts((1, down.generation)), "the peer came back");
        let again = r.timer(1, STALE_PATH_TIME);
        assert!(r.counts((1, again.generation)));
        assert!(r.counts((0, 0)), "other peers are not affected");
        assert!(!r.counts((7, 0)), "an unknown peer never counts");
    }
}
