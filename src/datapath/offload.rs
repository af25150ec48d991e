//! The offload self-checks (pure: packets and decisions, no I/O, time as an argument): UDP
//! GSO on the sending side ([`GsoCheck`]), UDP GRO on the receiving side ([`GroWatch`]).
//!
//! Some kernels and hypervisors break UDP segmentation offload silently: a virtio-net guest
//! that drops GSO traffic, a driver that mangles it. The socket call succeeds and the
//! datagrams never arrive. So a link checks, end to end, with the peer at its other end:
//! it sends two trains of [`TRAIN`] check packets through the tunnel, one datagram by
//! datagram and one as a single GSO write, and the peer reports how many of each it
//! decrypted. A GSO train that goes missing while the plain one arrives turns GSO off for
//! the link (datagram-by-datagram sends); the check runs again later, so a path that heals
//! gets GSO back.
//!
//! Check packets ride inside the tunnel like liveness probes: IPv4, protocol 253, addresses
//! 0.0.0.0 (a peer that does not know them drops them as martians), magic `APCK`. A peer
//! that never reports (wireguard-go, an older appliance) leaves the verdict "unverified" and
//! GSO on.

use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"APCK";
const HEADER: usize = 20 + 4 + 1 + 2 + 2;
/// Datagrams per train: enough for a GSO write of many segments, few enough to cost nothing.
pub const TRAIN: u16 = 16;
/// Inner size of a train packet: under any tunnel MTU (IPv6's minimum is 1280).
pub const TRAIN_PACKET: usize = 1200;
/// How long the peer has to report both trains.
pub const REPORT_WAIT: Duration = Duration::from_secs(1);
/// Checks again this often, whatever the last verdict.
pub const RECHECK: Duration = Duration::from_secs(600);
/// After a check with no answer or too much loss on both trains (a lossy or busy path says
/// nothing about GSO): again this soon, [`QUICK_RETRIES`] times, then at [`RECHECK`].
pub const RETRY: Duration = Duration::from_secs(10);
pub const QUICK_RETRIES: u32 = 3;

/// A check packet: a train member or a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Member `seq` of train `train`.
    Train { train: u16, seq: u16 },
    /// The trains the sender heard last, with how many members of each it decrypted.
    Report { heard: [(u16, u16); 2] },
}

/// A train member: [`TRAIN_PACKET`] bytes, the rest a pattern the receiver verifies.
pub fn train_packet(train: u16, seq: u16) -> Vec<u8> {
    let mut p = header(TRAIN_PACKET, 1);
    p[25..27].copy_from_slice(&train.to_be_bytes());
    p[27..29].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in p[HEADER..].iter_mut().enumerate() {
        *b = pattern(train, seq, i);
    }
    p
}

pub fn report_packet(heard: [(u16, u16); 2]) -> Vec<u8> {
    let mut p = header(HEADER + 4, 2);
    p[25..27].copy_from_slice(&heard[0].0.to_be_bytes());
    p[27..29].copy_from_slice(&heard[0].1.to_be_bytes());
    p[29..31].copy_from_slice(&heard[1].0.to_be_bytes());
    p[31..33].copy_from_slice(&heard[1].1.to_be_bytes());
    p
}

fn pattern(train: u16, seq: u16, i: usize) -> u8 {
    (i as u32)
        .wrapping_mul(31)
        .wrapping_add(u32::from(train) * 7 + u32::from(seq)) as u8
}

fn header(len: usize, kind: u8) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 1;
    p[9] = 253;
    let sum = crate::datapath::probe::checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..24].copy_from_slice(MAGIC);
    p[24] = kind;
    p
}

/// What `p` is, if it is a check packet. A train member whose pattern is wrong is `None`
/// (it did not arrive intact: not counted).
pub fn parse(p: &[u8]) -> Option<Check> {
    if p.len() < HEADER || p[0] != 0x45 || p[9] != 253 || p[12..20] != [0; 8] {
        return None;
    }
    if &p[20..24] != MAGIC {
        return None;
    }
    let word = |at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
    match p[24] {
        1 if p.len() == TRAIN_PACKET => {
            let (train, seq) = (word(25), word(27));
            p[HEADER..]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == pattern(train, seq, i))
                .then_some(Check::Train { train, seq })
        }
        2 if p.len() == HEADER + 4 => Some(Check::Report {
            heard: [(word(25), word(27)), (word(29), word(31))],
        }),
        _ => None,
    }
}

/// What the receiving side keeps: the last two trains it heard and how many of each.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Heard {
    trains: [(u16, u16); 2],
    /// Counted something since the last report.
    pub changed: bool,
}

impl Heard {
    /// A train member arrived. (Duplicates are impossible: the session refuses replays.)
    pub fn count(&mut self, train: u16) {
        if self.trains[0].0 == train && self.trains[0].1 > 0 {
            self.trains[0].1 = self.trains[0].1.saturating_add(1);
        } else if self.trains[1].0 == train && self.trains[1].1 > 0 {
            self.trains[1].1 = self.trains[1].1.saturating_add(1);
        } else {
            self.trains = [(train, 1), self.trains[0]];
        }
        self.changed = true;
    }

    pub fn report(&mut self) -> [(u16, u16); 2] {
        self.changed = false;
        self.trains
    }
}

/// Whether UDP GSO works on a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Not checked yet, or the peer does not answer checks: GSO stays on.
    #[default]
    Unverified,
    /// The GSO train arrived: GSO on.
    Works,
    /// The GSO train went missing while the plain one arrived: sends go datagram by datagram.
    Broken,
}

/// What the link should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Send train `plain` datagram by datagram and train `gso` as one GSO write, to the peer
    /// being checked with.
    Send {
        plain: u16,
        gso: u16,
    },
    /// The verdict changed to this.
    Verdict(Verdict),
}

/// One link's GSO check.
#[derive(Debug, Clone)]
pub struct GsoCheck {
    verdict: Verdict,
    /// The trains in flight and when they went, or when the next check is due.
    waiting: Option<(u16, u16, Instant)>,
    due: Option<Instant>,
    next_train: u16,
    quick_left: u32,
    checks: u64,
}

impl GsoCheck {
    /// `first` is a train id to start from (a restarted daemon must not reuse the ids of a
    /// report the peer still holds).
    pub fn new(first: u16) -> GsoCheck {
        GsoCheck {
            verdict: Verdict::Unverified,
            waiting: None,
            due: None,
            next_train: first.max(1),
            quick_left: QUICK_RETRIES,
            checks: 0,
        }
    }

    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Checks completed (with a verdict or not).
    pub fn checks(&self) -> u64 {
        self.checks
    }

    /// Step at `now`. `peer_ready`: a peer that answers probes is live on the link (someone
    /// to check with). `report`: that peer's last report.
    pub fn step(
        &mut self,
        now: Instant,
        peer_ready: bool,
        report: Option<[(u16, u16); 2]>,
    ) -> Step {
        if let Some((plain, gso, sent)) = self.waiting {
            let count = |t: u16| {
                report
                    .into_iter()
                    .flatten()
                    .find(|(id, _)| *id == t)
                    .map(|(_, n)| n)
            };
            let (p, g) = (count(plain), count(gso));
            let half = TRAIN / 2;
            let decided = match (p, g) {
                // A plain train that arrived is the control: GSO is judged against it.
                (Some(p), Some(g)) if p >= half && g >= half => Some(Verdict::Works),
                (Some(p), _) if p >= half && now >= sent + REPORT_WAIT => Some(Verdict::Broken),
                _ => None,
            };
            if decided.is_none() && now < sent + REPORT_WAIT {
                return Step::Nothing;
            }
            self.waiting = None;
            self.checks += 1;
            match decided {
                Some(v) => {
                    // A fresh "broken" is checked again soon: the loss may have been the
                    // receiver's (its GRO watch turns a broken GRO off within one train), or
                    // a burst that hit only the GSO train.
                    let confirm = v == Verdict::Broken && self.verdict != Verdict::Broken;
                    self.due = Some(now + if confirm { RETRY } else { RECHECK });
                    self.quick_left = QUICK_RETRIES;
                    if v != self.verdict {
                        self.verdict = v;
                        return Step::Verdict(v);
                    }
                }
                None => {
                    // No answer, or the control train lost too: nothing learnt.
                    let wait = if self.quick_left > 0 {
                        self.quick_left -= 1;
                        RETRY
                    } else {
                        RECHECK
                    };
                    self.due = Some(now + wait);
                }
            }
            return Step::Nothing;
        }
        if !peer_ready || self.due.is_some_and(|d| now < d) {
            return Step::Nothing;
        }
        let plain = self.take_id();
        let gso = self.take_id();
        self.waiting = Some((plain, gso, now));
        Step::Send { plain, gso }
    }

    fn take_id(&mut self) -> u16 {
        let id = self.next_train;
        self.next_train = self.next_train.wrapping_add(1).max(1);
        id
    }
}

/// Receive side: UDP GRO hands a train of datagrams from one source to one read, split at the
/// segment size the kernel reports. A kernel that reports the wrong one (or mangles the train)
/// makes every datagram of such a read fail authentication. The first datagram still starts
/// where the train does, so its header is right: it names a live session and fails on its tag.
/// [`GroWatch`] sees that and turns GRO off on the socket; it is turned on again after
/// [`RECHECK`], so a healed path gets it back.
///
/// Only a read whose first datagram names a live session (a receiver index the attacker must
/// know: 24 random bits, new at every rekey) and fails on its tag counts: garbage, replays and
/// trains for sessions that ended (a restarted peer) do not. A peer, or an on-path attacker
/// who sees the indexes, can turn GRO off for [`RECHECK`] at a time: that costs throughput,
/// never correctness, and each time is logged.
pub const GRO_BAD: u32 = 8;
/// The window over which [`GRO_BAD`] failed datagrams must outnumber good ones four to one.
pub const GRO_WINDOW: Duration = Duration::from_secs(1);

/// What the receive thread should do with its socket's UDP GRO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroStep {
    Keep,
    /// Coalesced reads for a live session fail: turn GRO off.
    Off,
    /// [`RECHECK`] has passed since it was turned off: on again.
    On,
}

/// One socket's UDP GRO watch (one receive thread owns it: no lock, no allocation).
#[derive(Debug, Clone, Default)]
pub struct GroWatch {
    window: Option<Instant>,
    good: u32,
    bad: u32,
    off_since: Option<Instant>,
}

impl GroWatch {
    /// One read: `coalesced` if GRO joined several datagrams in it; `suspect` if its first
    /// datagram named a live session and failed authentication (not as a replay); `good` of
    /// its datagrams authenticated and `bad` did not.
    pub fn read(
        &mut self,
        coalesced: bool,
        suspect: bool,
        good: u32,
        bad: u32,
        now: Instant,
    ) -> GroStep {
        if !coalesced || self.off_since.is_some() || (bad > 0 && !suspect) {
            return GroStep::Keep;
        }
        if self
            .window
            .is_none_or(|w| now.saturating_duration_since(w) >= GRO_WINDOW)
        {
            self.window = Some(now);
            self.good = 0;
            self.bad = 0;
        }
        self.good = self.good.saturating_add(good);
        self.bad = self.bad.saturating_add(bad);
        if self.bad >= GRO_BAD && self.bad > self.good.saturating_mul(4) {
            self.off_since = Some(now);
            self.window = None;
            return GroStep::Off;
        }
        GroStep::Keep
    }

    /// Call now and then (each wake-up of the receive thread).
    pub fn tick(&mut self, now: Instant) -> GroStep {
        match self.off_since {
            Some(t) if now.saturating_duration_since(t) >= RECHECK => {
                self.off_since = None;
                GroStep::On
            }
            _ => GroStep::Keep,
        }
    }

    pub fn is_off(&self) -> bool {
        self.off_since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip_and_a_damaged_train_member_does_not_count() {
        let p = train_packet(7, 3);
        assert_eq!(p.len(), TRAIN_PACKET);
        assert_eq!(parse(&p), Some(Check::Train { train: 7, seq: 3 }));
        let mut bad = p.clone();
        bad[600] ^= 1;
        assert_eq!(parse(&bad), None);
        assert_eq!(parse(&p[..TRAIN_PACKET - 1]), None);
        let r = report_packet([(9, 16), (8, 2)]);
        assert_eq!(
            parse(&r),
            Some(Check::Report {
                heard: [(9, 16), (8, 2)]
            })
        );
        // A liveness probe is not a check packet, nor is an ordinary packet.
        let probe = crate::datapath::probe::packet(crate::datapath::probe::Probe {
            hears_you: true,
            draining: false,
            drain_you: false,
            next_tag: None,
        });
        assert_eq!(parse(&probe), None);
        assert_eq!(parse(&[0x45; 60]), None);
    }

    #[test]
    fn any_bytes_from_a_peer_parse_without_a_panic() {
        // A compromised peer decides the whole inner packet: every length, with and without
        // a valid header in front.
        let mut x: u32 = 0x9e37_79b9;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        };
        for len in 0..1300 {
            let mut p: Vec<u8> = (0..len).map(|_| next()).collect();
            let _ = parse(&p);
            let h = header(HEADER + 4, 2);
            for (d, s) in p.iter_mut().zip(h.iter()) {
                *d = *s;
            }
            let _ = parse(&p);
            if len >= HEADER {
                p[24] = 1;
                let _ = parse(&p);
            }
        }
    }

    #[test]
    fn the_receiver_reports_the_last_two_trains() {
        let mut h = Heard::default();
        for _ in 0..16 {
            h.count(1);
        }
        for _ in 0..3 {
            h.count(2);
        }
        assert!(h.changed);
        assert_eq!(h.report(), [(2, 3), (1, 16)]);
        assert!(!h.changed);
        h.count(1); // a late member of the older train
        assert_eq!(h.report(), [(2, 3), (1, 17)]);
        h.count(3);
        assert_eq!(h.report(), [(3, 1), (2, 3)]);
    }

    fn run(check: &mut GsoCheck, t: Instant, report: Option<[(u16, u16); 2]>) -> Step {
        check.step(t, true, report)
    }

    #[test]
    fn a_missing_gso_train_breaks_gso_and_a_later_check_restores_it() {
        let t0 = Instant::now();
        let mut c = GsoCheck::new(1);
        assert_eq!(
            c.step(t0, false, None),
            Step::Nothing,
            "no peer to check with"
        );
        let Step::Send { plain, gso } = run(&mut c, t0, None) else {
            panic!()
        };
        // The plain train arrived, the GSO one did not (yet): wait for the deadline.
        let arrived = Some([(plain, 16), (0, 0)]);
        assert_eq!(
            run(&mut c, t0 + Duration::from_millis(100), arrived),
            Step::Nothing
        );
        assert_eq!(c.verdict(), Verdict::Unverified);
        assert_eq!(
            run(&mut c, t0 + REPORT_WAIT, arrived),
            Step::Verdict(Verdict::Broken)
        );
        assert_eq!(run(&mut c, t0 + REPORT_WAIT, arrived), Step::Nothing);
        // A fresh "broken" is confirmed RETRY later; lost again, it holds until RECHECK.
        let tc = t0 + REPORT_WAIT + RETRY;
        assert_eq!(
            run(&mut c, tc - Duration::from_millis(1), None),
            Step::Nothing
        );
        let Step::Send { plain: p2, .. } = run(&mut c, tc, None) else {
            panic!("confirmed RETRY after the first verdict")
        };
        let again = Some([(p2, 16), (0, 0)]);
        assert_eq!(run(&mut c, tc + REPORT_WAIT, again), Step::Nothing);
        assert_eq!(c.verdict(), Verdict::Broken);
        let t1 = tc + REPORT_WAIT + RECHECK;
        assert_eq!(
            run(&mut c, t1 - Duration::from_millis(1), again),
            Step::Nothing
        );
        // Checked again at RECHECK: both arrive now.
        let Step::Send { plain, gso: g2 } = run(&mut c, t1, again) else {
            panic!()
        };
        assert!(plain != gso && g2 != gso, "fresh train ids");
        assert_eq!(
            run(
                &mut c,
                t1 + Duration::from_millis(5),
                Some([(g2, 15), (plain, 16)])
            ),
            Step::Verdict(Verdict::Works)
        );
        assert_eq!(c.checks(), 3);
    }

    #[test]
    fn no_answer_or_a_lost_control_train_decides_nothing_and_retries_soon() {
        let t0 = Instant::now();
        let mut c = GsoCheck::new(1);
        let mut t = t0;
        for _ in 0..QUICK_RETRIES {
            let Step::Send { plain, gso } = run(&mut c, t, None) else {
                panic!("a check at {:?}", t - t0)
            };
            // Both trains lost half their members: a lossy path, nothing about GSO.
            let lossy = Some([(gso, 2), (plain, 3)]);
            assert_eq!(run(&mut c, t + REPORT_WAIT, lossy), Step::Nothing);
            assert_eq!(c.verdict(), Verdict::Unverified);
            assert_eq!(
                run(&mut c, t + REPORT_WAIT + RETRY / 2, lossy),
                Step::Nothing
            );
            t = t + REPORT_WAIT + RETRY;
        }
        // After the quick retries: the next is at RECHECK.
        assert!(matches!(run(&mut c, t, None), Step::Send { .. }));
        assert_eq!(run(&mut c, t + REPORT_WAIT, None), Step::Nothing);
        assert_eq!(run(&mut c, t + REPORT_WAIT + RETRY, None), Step::Nothing);
        assert!(matches!(
            run(&mut c, t + REPORT_WAIT + RECHECK, None),
            Step::Send { .. }
        ));
    }

    #[test]
    fn a_stale_report_naming_other_trains_decides_nothing() {
        let t0 = Instant::now();
        let mut c = GsoCheck::new(100);
        let Step::Send { .. } = run(&mut c, t0, None) else {
            panic!()
        };
        let stale = Some([(5, 16), (4, 16)]);
        assert_eq!(run(&mut c, t0 + REPORT_WAIT, stale), Step::Nothing);
        assert_eq!(c.verdict(), Verdict::Unverified);
    }
    #[test]
    fn coalesced_reads_that_fail_for_a_live_session_turn_gro_off_and_recheck_turns_it_on() {
        let t0 = Instant::now();
        let mut w = GroWatch::default();
        // Single datagrams never decide anything.
        assert_eq!(w.read(false, true, 0, 1, t0), GroStep::Keep);
        // A coalesced train of 7 bad: under GRO_BAD.
        assert_eq!(w.read(true, true, 0, 7, t0), GroStep::Keep);
        assert!(!w.is_off());
        let off = t0 + Duration::from_millis(5);
        assert_eq!(w.read(true, true, 0, 1, off), GroStep::Off);
        assert!(w.is_off());
        // Off: nothing more to decide until RECHECK.
        assert_eq!(w.read(true, true, 0, 40, off), GroStep::Keep);
        assert_eq!(
            w.tick(off + RECHECK - Duration::from_millis(1)),
            GroStep::Keep
        );
        assert_eq!(w.tick(off + RECHECK), GroStep::On);
        assert!(!w.is_off());
        assert_eq!(w.tick(off + RECHECK + RECHECK), GroStep::Keep);
        // Broken again: off again, counted.
        let later = off + RECHECK + Duration::from_secs(1);
        assert_eq!(w.read(true, true, 0, 16, later), GroStep::Off);
        assert!(w.is_off());
    }

    #[test]
    fn garbage_or_a_few_bad_among_good_or_thin_failures_keep_gro() {
        let t0 = Instant::now();
        // Reads whose first datagram names no live session (garbage, replays, a session that
        // ended) count nothing, however many.
        let mut w = GroWatch::default();
        for i in 0..100 {
            let t = t0 + Duration::from_millis(i);
            assert_eq!(w.read(true, false, 0, 64, t), GroStep::Keep);
        }
        // Mostly good coalesced reads with some bad: kept.
        let mut v = GroWatch::default();
        for i in 0..50 {
            let t = t0 + Duration::from_millis(i);
            assert_eq!(v.read(true, true, 16, 3, t), GroStep::Keep);
        }
        // Failures spread thinner than GRO_BAD per window: kept.
        let mut u = GroWatch::default();
        for i in 0..20 {
            let t = t0 + GRO_WINDOW * i;
            assert_eq!(u.read(true, true, 0, GRO_BAD - 1, t), GroStep::Keep);
        }
        assert!(!w.is_off() && !v.is_off() && !u.is_off());
    }
}
