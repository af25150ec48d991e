//! One BFD session in asynchronous mode (RFC 5880 §6), sans I/O: [`Session::receive`] takes a
//! decoded Control packet, [`Session::timers`] the time; both return what changed, and
//! `timers` the packet to send. Time and jitter are inputs, so every rule is a unit test.

use super::packet::{Control, Diag, State};
use std::time::{Duration, Instant};

/// While a session is not Up its transmit interval is at least a second (§6.8.3).
pub const SLOW_TX: Duration = Duration::from_secs(1);

/// What we ask of the peer and promise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How often we would like to send once Up (bfd.DesiredMinTxInterval).
    pub desired_min_tx: Duration,
    /// How often we can take the peer's packets (bfd.RequiredMinRxInterval).
    pub required_min_rx: Duration,
    /// Packets the peer may miss before we declare the session down (bfd.DetectMult).
    pub detect_mult: u8,
}

/// A change of session state, with the diagnostic that explains it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub diag: Diag,
}

/// Why a packet that decoded was not for this session (§6.8.6: discarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// Your Discriminator names another session.
    OtherDiscriminator(u32),
    /// Your Discriminator 0 while we are not Down: the peer lost the session, we did not.
    NoDiscriminatorWhileUp,
    /// We are administratively down.
    AdminDown,
}

#[derive(Debug, Clone)]
pub struct Session {
    cfg: Config,
    local_discr: u32,
    state: State,
    diag: Diag,
    remote_state: State,
    remote_discr: u32,
    remote_demand: bool,
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    remote_detect_mult: u8,
    /// Poll sequence in progress: our packets carry P until a Final comes back.
    poll: bool,
    /// The peer polled: the next packet carries F, at once.
    owe_final: bool,
    next_tx: Instant,
    last_rx: Option<Instant>,
}

impl Session {
    /// A session in Down, sending its first packet at `now`. `local_discr` must be nonzero and
    /// unique among this system's sessions.
    pub fn new(cfg: Config, local_discr: u32, now: Instant) -> Session {
        assert!(local_discr != 0, "discriminator 0 is reserved");
        Session {
            cfg,
            local_discr,
            state: State::Down,
            diag: Diag::None,
            remote_state: State::Down,
            remote_discr: 0,
            remote_demand: false,
            // §6.8.1: initialised to 1 (µs), i.e. "as fast as you like" until we hear.
            remote_min_rx: Duration::from_micros(1),
            remote_desired_tx: Duration::ZERO,
            remote_detect_mult: 0,
            poll: false,
            owe_final: false,
            next_tx: now,
            last_rx: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn diag(&self) -> Diag {
        self.diag
    }

    pub fn local_discr(&self) -> u32 {
        self.local_discr
    }

    pub fn remote_discr(&self) -> u32 {
        self.remote_discr
    }

    /// The interval we advertise: the configured one once Up, at least [`SLOW_TX`] before.
    fn desired_tx(&self) -> Duration {
        if self.state == State::Up {
            self.cfg.desired_min_tx
        } else {
            self.cfg.desired_min_tx.max(SLOW_TX)
        }
    }

    /// Our transmit interval before jitter (§6.8.7).
    pub fn tx_interval(&self) -> Duration {
        self.desired_tx().max(self.remote_min_rx)
    }

    /// The detection time in asynchronous mode (§6.8.4): the peer's multiplier times the
    /// larger of what we can receive and what it wants to send. None before we heard it.
    pub fn detection_time(&self) -> Option<Duration> {
        (self.remote_detect_mult > 0).then(|| {
            self.cfg.required_min_rx.max(self.remote_desired_tx) * self.remote_detect_mult as u32
        })
    }

    /// When the driver must call [`Session::timers`] next.
    pub fn next_wake(&self) -> Instant {
        match (self.last_rx, self.detection_time()) {
            (Some(at), Some(d)) if self.remote_discr != 0 => self.next_tx.min(at + d),
            _ => self.next_tx,
        }
    }

    fn set_state(&mut self, to: State, diag: Diag, now: Instant) -> Option<Transition> {
        if self.state == to {
            return None;
        }
        let from = self.state;
        self.state = to;
        self.diag = diag;
        // The advertised interval changes with Up (fast) and down again (slow): a poll
        // sequence tells the peer (§6.8.3), and a packet goes out at once.
        self.poll = to == State::Up || from == State::Up;
        self.next_tx = now;
        Some(Transition { from, to, diag })
    }

    /// A Control packet from the peer (already decoded and checked by `Control::decode`).
    pub fn receive(&mut self, p: &Control, now: Instant) -> Result<Option<Transition>, Discard> {
        if p.your_discr != 0 && p.your_discr != self.local_discr {
            return Err(Discard::OtherDiscriminator(p.your_discr));
        }
        if p.your_discr == 0 && !matches!(self.state, State::Down | State::AdminDown) {
            return Err(Discard::NoDiscriminatorWhileUp);
        }
        self.remote_discr = p.my_discr;
        self.remote_state = p.state;
        self.remote_demand = p.demand;
        self.remote_min_rx = p.required_min_rx;
        self.remote_desired_tx = p.desired_min_tx;
        self.remote_detect_mult = p.detect_mult;
        self.last_rx = Some(now);
        if p.final_ {
            self.poll = false;
        }
        if self.state == State::AdminDown {
            return Err(Discard::AdminDown);
        }
        if p.poll {
            self.owe_final = true;
            self.next_tx = now;
        }
        let t = if p.state == State::AdminDown {
            if self.state != State::Down {
                self.set_state(State::Down, Diag::NeighborDown, now)
            } else {
                None
            }
        } else {
            match (self.state, p.state) {
                (State::Down, State::Down) => self.set_state(State::Init, Diag::None, now),
                (State::Down, State::Init) => self.set_state(State::Up, Diag::None, now),
                (State::Init, State::Init | State::Up) => {
                    self.set_state(State::Up, Diag::None, now)
                }
                (State::Up, State::Down) => self.set_state(State::Down, Diag::NeighborDown, now),
                _ => None,
            }
        };
        Ok(t)
    }

    /// Take the session down on purpose (shutdown) or bring it back (§6.8.16).
    pub fn set_admin_down(&mut self, down: bool, now: Instant) -> Option<Transition> {
        if down {
            self.set_state(State::AdminDown, Diag::AdminDown, now)
        } else if self.state == State::AdminDown {
            self.remote_discr = 0;
            self.set_state(State::Down, Diag::AdminDown, now)
        } else {
            None
        }
    }

    /// Run the timers at `now`: the detection timer (§6.8.4) and the transmit timer (§6.8.7).
    /// `jitter` is any random number; it sets this interval's share of 75–100 % (75–90 % with a
    /// multiplier of 1). Returns a state change, if any, and the packet to send, if due.
    pub fn timers(&mut self, now: Instant, jitter: u32) -> (Option<Transition>, Option<Control>) {
        let mut t = None;
        if let (Some(at), Some(d)) = (self.last_rx, self.detection_time()) {
            if now >= at + d && self.remote_discr != 0 {
                // Silence for the detection time: down, and forget the peer's discriminator
                // so a restarted peer (new discriminator) is taken on again (§6.8.1).
                if matches!(self.state, State::Init | State::Up) {
                    t = self.set_state(State::Down, Diag::DetectionExpired, now);
                }
                self.remote_discr = 0;
                self.remote_state = State::Down;
            }
        }
        if now < self.next_tx {
            return (t, None);
        }
        let final_ = std::mem::take(&mut self.owe_final);
        let periodic_allowed = self.remote_min_rx > Duration::ZERO
            && !(self.remote_demand && self.state == State::Up && self.remote_state == State::Up);
        let interval = self.tx_interval();
        let span = if self.cfg.detect_mult == 1 { 16 } else { 26 };
        let pct = 75 + jitter % span;
        self.next_tx = now + interval * pct / 100;
        if !periodic_allowed && !final_ {
            return (t, None);
        }
        let p = Control {
            diag: self.diag,
            state: self.state,
            // P and F are never both set (§6.8.7): a Final answers, the poll waits.
            poll: self.poll && !final_,
            final_,
            demand: false,
            detect_mult: self.cfg.detect_mult,
            my_discr: self.local_discr,
            your_discr: self.remote_discr,
            desired_min_tx: self.desired_tx(),
            required_min_rx: self.cfg.required_min_rx,
            required_min_echo_rx: Duration::ZERO,
        };
        (t, Some(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: Config = Config {
        desired_min_tx: Duration::from_millis(100),
        required_min_rx: Duration::from_millis(100),
        detect_mult: 3,
    };

    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    fn ms(n: u64) -> Instant {
        t0() + Duration::from_millis(n)
    }

    /// Send what `from` has due at `now` to `to`; returns `to`'s transition.
    fn deliver(from: &mut Session, to: &mut Session, now: Instant) -> Option<Transition> {
        let (_, p) = from.timers(now, 0);
        p.and_then(|p| to.receive(&p, now).unwrap())
    }

    fn up_pair() -> (Session, Session, Instant) {
        let (mut a, mut b) = (Session::new(CFG, 1, t0()), Session::new(CFG, 2, t0()));
        let mut now = t0();
        for _ in 0..6 {
            deliver(&mut a, &mut b, now);
            deliver(&mut b, &mut a, now);
            if a.state() == State::Up && b.state() == State::Up {
                return (a, b, now);
            }
            now += Duration::from_secs(1);
        }
        panic!("no three-way handshake: {:?} {:?}", a.state(), b.state());
    }

    #[test]
    fn the_three_way_handshake_goes_down_init_up() {
        let (mut a, mut b) = (Session::new(CFG, 1, t0()), Session::new(CFG, 2, t0()));
        let t = deliver(&mut a, &mut b, t0()).unwrap();
        assert_eq!((t.from, t.to), (State::Down, State::Init), "b heard Down");
        let t = deliver(&mut b, &mut a, t0()).unwrap();
        assert_eq!((t.from, t.to), (State::Down, State::Up), "a heard Init");
        let t = deliver(&mut a, &mut b, t0()).unwrap();
        assert_eq!((t.from, t.to), (State::Init, State::Up), "b heard Up");
        assert_eq!((a.remote_discr(), b.remote_discr()), (2, 1));
    }

    #[test]
    fn before_up_packets_go_out_at_most_once_a_second_and_fast_once_up() {
        let mut a = Session::new(CFG, 1, t0());
        let (_, first) = a.timers(t0(), 0);
        let first = first.unwrap();
        assert_eq!(first.desired_min_tx, SLOW_TX);
        assert_eq!(first.your_discr, 0);
        assert!(a.next_wake() >= ms(750), "75 % of a second at the earliest");
        let (a, _, now) = up_pair();
        assert_eq!(a.tx_interval(), Duration::from_millis(100));
        assert!(a.next_wake() <= now + Duration::from_millis(100));
    }

    #[test]
    fn jitter_keeps_intervals_within_75_to_100_percent_and_90_with_a_multiplier_of_one() {
        let (mut a, mut b, mut now) = up_pair();
        for j in 0..100u32 {
            now += Duration::from_millis(100);
            if let (_, Some(p)) = b.timers(now, 0) {
                a.receive(&p, now).unwrap();
            }
            let (t, p) = a.timers(now, j);
            assert_eq!(t, None);
            b.receive(&p.expect("due every 100 ms at most"), now)
                .unwrap();
            let gap = a.next_wake() - now;
            assert!(
                gap >= Duration::from_millis(75) && gap <= Duration::from_millis(100),
                "{gap:?}"
            );
        }
        let one = Config {
            detect_mult: 1,
            ..CFG
        };
        let mut s = Session::new(one, 9, t0());
        for j in 0..100 {
            let at = t0() + Duration::from_secs(10 * j);
            let _ = s.timers(at, j as u32);
            assert!(s.next_wake() - at <= Duration::from_millis(900));
        }
    }

    #[test]
    fn silence_for_the_detection_time_takes_the_session_down_and_forgets_the_peer() {
        let (mut a, _, now) = up_pair();
        // b wants 100 ms, a takes 100 ms, b's multiplier 3: 300 ms.
        assert_eq!(a.detection_time(), Some(Duration::from_millis(300)));
        let (t, _) = a.timers(now + Duration::from_millis(299), 0);
        assert_eq!(t, None);
        let (t, _) = a.timers(now + Duration::from_millis(300), 0);
        assert_eq!(
            t,
            Some(Transition {
                from: State::Up,
                to: State::Down,
                diag: Diag::DetectionExpired
            })
        );
        assert_eq!(a.remote_discr(), 0);
        let (_, p) = a.timers(now + Duration::from_millis(300), 0);
        let p = p
            .or_else(|| a.timers(now + Duration::from_secs(2), 0).1)
            .unwrap();
        assert_eq!(
            (p.state, p.diag, p.your_discr),
            (State::Down, Diag::DetectionExpired, 0)
        );
    }

    #[test]
    fn the_detection_time_uses_the_peers_multiplier_and_the_slower_of_the_two_rates() {
        let slow_peer = Config {
            desired_min_tx: Duration::from_millis(500),
            required_min_rx: Duration::from_millis(50),
            detect_mult: 5,
        };
        let (mut a, mut b) = (Session::new(CFG, 1, t0()), Session::new(slow_peer, 2, t0()));
        deliver(&mut b, &mut a, t0());
        // b still advertises the slow 1 s while Down.
        assert_eq!(a.detection_time(), Some(Duration::from_secs(5)));
        deliver(&mut a, &mut b, t0());
        deliver(&mut b, &mut a, t0());
        deliver(&mut a, &mut b, t0());
        assert_eq!(b.state(), State::Up);
        // b's last packet came from b Up: it wants to send every 500 ms now.
        assert_eq!(a.detection_time(), Some(Duration::from_millis(2500)));
        // And we send no faster than the peer can take.
        assert_eq!(b.tx_interval(), Duration::from_millis(500));
    }

    #[test]
    fn a_neighbor_that_signals_down_or_admin_down_takes_us_down() {
        let (mut a, mut b, now) = up_pair();
        let _ = b.set_admin_down(true, now);
        let t = deliver(&mut b, &mut a, now).unwrap();
        assert_eq!((t.to, t.diag), (State::Down, Diag::NeighborDown));
        let (mut a, _, now) = up_pair();
        let down = Control {
            diag: Diag::DetectionExpired,
            state: State::Down,
            poll: false,
            final_: false,
            demand: false,
            detect_mult: 3,
            my_discr: 2,
            your_discr: 1,
            desired_min_tx: SLOW_TX,
            required_min_rx: Duration::from_millis(100),
            required_min_echo_rx: Duration::ZERO,
        };
        let t = a.receive(&down, now).unwrap().unwrap();
        assert_eq!(
            (t.from, t.to, t.diag),
            (State::Up, State::Down, Diag::NeighborDown)
        );
    }

    #[test]
    fn packets_for_another_session_or_without_our_discriminator_while_up_are_discarded() {
        let (mut a, mut b, now) = up_pair();
        let (_, p) = b.timers(now + Duration::from_millis(100), 0);
        let mut p = p.unwrap();
        p.your_discr = 77;
        assert_eq!(a.receive(&p, now), Err(Discard::OtherDiscriminator(77)));
        p.your_discr = 0;
        assert_eq!(a.receive(&p, now), Err(Discard::NoDiscriminatorWhileUp));
        assert_eq!(a.state(), State::Up);
    }

    #[test]
    fn a_poll_is_answered_with_a_final_at_once_and_a_final_ends_our_poll() {
        let (mut a, mut b) = (Session::new(CFG, 1, t0()), Session::new(CFG, 2, t0()));
        deliver(&mut a, &mut b, t0());
        deliver(&mut b, &mut a, t0());
        // a just went Up: its interval changed, so it polls.
        let (_, p) = a.timers(t0(), 0);
        let p = p.unwrap();
        assert!(p.poll && !p.final_);
        assert_eq!(p.desired_min_tx, Duration::from_millis(100));
        b.receive(&p, t0()).unwrap();
        let (_, f) = b.timers(t0(), 0);
        let f = f.unwrap();
        assert!(f.final_ && !f.poll, "P and F never together: {f:?}");
        a.receive(&f, t0()).unwrap();
        let (_, p) = a.timers(ms(200), 0);
        assert!(!p.unwrap().poll, "the poll sequence is over");
    }

    #[test]
    fn a_peer_that_wants_no_packets_gets_none() {
        let (mut a, mut b, now) = up_pair();
        let (_, p) = b.timers(now + Duration::from_millis(100), 0);
        let mut p = p.unwrap();
        p.required_min_rx = Duration::ZERO;
        p.poll = false;
        a.receive(&p, now).unwrap();
        let (_, sent) = a.timers(now + Duration::from_millis(150), 0);
        assert_eq!(sent, None);
    }

    #[test]
    fn admin_down_ignores_the_peer_until_brought_back() {
        let (mut a, mut b, now) = up_pair();
        let t = a.set_admin_down(true, now).unwrap();
        assert_eq!((t.to, t.diag), (State::AdminDown, Diag::AdminDown));
        let (_, p) = b.timers(now + Duration::from_millis(100), 0);
        assert_eq!(a.receive(&p.unwrap(), now), Err(Discard::AdminDown));
        let t = a.set_admin_down(false, now).unwrap();
        assert_eq!(t.to, State::Down);
        assert_eq!(a.remote_discr(), 0);
    }
}
