//! Rate limits for the BGP edge, pure (the caller passes the time): a request that runs at
//! most once per interval, later ones within it folding into one deferred run, and a log
//! budget that says how much it held back. A peer flooding ROUTE-REFRESH or foreign prefixes
//! costs one re-export per interval and a few log lines per minute, not one of each per message.

use std::time::{Duration, Instant};

/// At most one run per `every`; asks in between fold into one run when the interval ends.
#[derive(Debug, Clone)]
pub struct Coalesce {
    every: Duration,
    last: Option<Instant>,
    pending: bool,
}

impl Coalesce {
    pub fn new(every: Duration) -> Coalesce {
        Coalesce {
            every,
            last: None,
            pending: false,
        }
    }

    /// A request at `now`: true when it runs now; else it is remembered for [`Coalesce::due`].
    pub fn ask(&mut self, now: Instant) -> bool {
        match self.last {
            Some(l) if now < l + self.every => {
                self.pending = true;
                false
            }
            _ => {
                self.last = Some(now);
                self.pending = false;
                true
            }
        }
    }

    /// When the folded request is to run, if there is one.
    pub fn due(&self) -> Option<Instant> {
        match (self.pending, self.last) {
            (true, Some(l)) => Some(l + self.every),
            _ => None,
        }
    }

    /// The folded request runs now.
    pub fn fire(&mut self, now: Instant) {
        self.pending = false;
        self.last = Some(now);
    }
}

/// Up to `max` lines per `per`; the rest are counted and reported once the window ends.
#[derive(Debug, Clone)]
pub struct LogBudget {
    per: Duration,
    max: u32,
    window: Option<Instant>,
    used: u32,
    held: u64,
}

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Log this line.
    pub log: bool,
    /// Lines held back in the window that just ended: say how many, once.
    pub held_back: u64,
}

impl LogBudget {
    pub fn new(max: u32, per: Duration) -> LogBudget {
        LogBudget {
            per,
            max,
            window: None,
            used: 0,
            held: 0,
        }
    }

    pub fn line(&mut self, now: Instant) -> Verdict {
        let mut held_back = 0;
        if self.window.is_none_or(|w| now >= w + self.per) {
            held_back = std::mem::take(&mut self.held);
            self.window = Some(now);
            self.used = 0;
        }
        let log = self.used < self.max;
        if log {
            self.used += 1;
        } else {
            self.held += 1;
        }
        Verdict { log, held_back }
    }

    /// Lines held back so far in the current window.
    pub fn held(&self) -> u64 {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_within_the_interval_fold_into_one_deferred_run() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        let mut c = Coalesce::new(s);
        assert!(c.ask(t));
        assert_eq!(c.due(), None);
        for i in 1..1000 {
            assert!(!c.ask(t + Duration::from_micros(i)));
        }
        assert_eq!(c.due(), Some(t + s));
        c.fire(t + s);
        assert_eq!(c.due(), None);
        assert!(!c.ask(t + s + Duration::from_millis(10)));
        assert!(c.ask(t + s * 3));
    }

    #[test]
    fn a_flood_of_lines_logs_the_budget_then_says_how_many_were_held_back() {
        let t = Instant::now();
        let m = Duration::from_secs(60);
        let mut b = LogBudget::new(10, m);
        let logged = (0..100_000)
            .filter(|i| b.line(t + Duration::from_micros(*i)).log)
            .count();
        assert_eq!(logged, 10);
        assert_eq!(b.held(), 99_990);
        let v = b.line(t + m);
        assert_eq!(
            v,
            Verdict {
                log: true,
                held_back: 99_990
            }
        );
        assert_eq!(b.line(t + m * 3).held_back, 0);
    }
}
