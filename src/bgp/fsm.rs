//! The BGP session state machine (RFC 4271 §8), sans I/O: [`Session::handle`] takes an
//! [`Event`] and returns the [`Action`]s a driver performs (send, arm timers, close, report).
//! Timers are durations the driver arms; their expiry comes back as events. No sockets, no
//! clocks, so every rule is a unit test.

use super::wire::{
    Capability, Context, DecodeError, Families, Message, Notification, Open, Update, AFI_IPV4,
    AFI_IPV6, SAFI_UNICAST,
};
use std::net::Ipv4Addr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Idle,
    /// Waiting for the TCP connection (ours or the peer's).
    Connect,
    OpenSent,
    OpenConfirm,
    Established,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub local_as: u32,
    pub local_id: Ipv4Addr,
    /// The AS the peer must announce (iBGP: our own).
    pub peer_as: u32,
    /// Hold time we offer (0 or >= 3).
    pub hold_time: u16,
    /// Graceful-restart time we announce (RFC 4724); 0 disables the capability.
    pub restart_time: u16,
}

/// What both OPENs agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub peer_id: Ipv4Addr,
    pub hold_time: u16,
    pub four_octet_as: bool,
    pub ipv4: bool,
    pub ipv6: bool,
    pub route_refresh: bool,
    /// The peer's graceful-restart time, if it announced the capability.
    pub peer_restart_time: Option<u16>,
    /// ADD-PATH (RFC 7911): families in which the peer sends us path identifiers.
    pub add_path_rx: Families,
    /// Families in which we send the peer several paths, with path identifiers.
    pub add_path_tx: Families,
}

impl Negotiated {
    pub fn context(&self) -> Context {
        Context {
            four_octet_as: self.four_octet_as,
            add_path_rx: self.add_path_rx,
            add_path_tx: self.add_path_tx,
        }
    }
}

/// RFC 7911 §5 send/receive field: 1 receive, 2 send, 3 both.
const ADD_PATH_RECEIVE: u8 = 1;
const ADD_PATH_SEND: u8 = 2;

/// The ADD-PATH families both sides agreed on: we receive path identifiers where we offered to
/// receive and the peer offered to send, and send them where the reverse holds. `ours` and
/// `theirs` are the capability tuples (AFI, SAFI, send/receive).
pub fn add_path_agreement(
    ours: &[(u16, u8, u8)],
    theirs: &[(u16, u8, u8)],
) -> (Families, Families) {
    let bits = |list: &[(u16, u8, u8)], afi: u16| {
        list.iter()
            .filter(|(a, s, _)| *a == afi && *s == SAFI_UNICAST)
            .fold(0, |acc, (_, _, b)| acc | b)
    };
    let both = |we: u8, they: u8| {
        let f = |afi| bits(ours, afi) & we != 0 && bits(theirs, afi) & they != 0;
        Families {
            ipv4: f(AFI_IPV4),
            ipv6: f(AFI_IPV6),
        }
    };
    (
        both(ADD_PATH_RECEIVE, ADD_PATH_SEND),
        both(ADD_PATH_SEND, ADD_PATH_RECEIVE),
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The driver has a TCP connection to the peer (either direction).
    Connected,
    /// The connection closed or failed.
    Disconnected,
    Received(Message),
    /// A message that failed to decode: answer with its NOTIFICATION.
    Malformed(DecodeError),
    HoldTimerExpired,
    KeepaliveTimerExpired,
    /// Stop the session (configuration change, max-prefix, shutdown) with a Cease subcode.
    Stop {
        subcode: u8,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(Message),
    /// Arm (or, with None, disarm) the hold timer.
    HoldTimer(Option<Duration>),
    KeepaliveTimer(Option<Duration>),
    Close,
    Established(Negotiated),
    /// The session went down; routes learned from the peer must go, or, with `keep_stale`,
    /// stay marked stale that long while the peer restarts (RFC 4724).
    Down {
        reason: String,
        keep_stale: Option<Duration>,
    },
    /// An UPDATE to apply to the peer's Adj-RIB-In.
    Update(Update),
    /// The peer asks us to resend our routes (RFC 2918).
    RouteRefresh {
        afi: u16,
        safi: u8,
    },
}

/// RFC 4271 §8.2.2: a large hold time while waiting for the peer's OPEN.
const OPEN_HOLD: Duration = Duration::from_secs(240);

#[derive(Debug)]
pub struct Session {
    pub config: SessionConfig,
    pub state: State,
    pub negotiated: Option<Negotiated>,
}

impl Session {
    pub fn new(config: SessionConfig) -> Session {
        Session {
            config,
            state: State::Idle,
            negotiated: None,
        }
    }

    /// Our OPEN: IPv4 and IPv6 unicast, route refresh, 4-octet AS, ADD-PATH send and receive
    /// for both families, and graceful restart as a helper only: the capability lists no
    /// address family (RFC 4724 §3), because our forwarding dies with the daemon (the tunnels
    /// are in it), so a peer must drop our routes when our session ends rather than keep
    /// sending traffic into a dead datapath for the restart time. We still keep the routes of
    /// a peer that restarts with its forwarding intact (a site router).
    pub fn open_message(&self) -> Open {
        let mut caps = vec![
            Capability::Multiprotocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            },
            Capability::Multiprotocol {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
            },
            Capability::RouteRefresh,
            Capability::FourOctetAs(self.config.local_as),
            Capability::AddPath(self.add_path_offer()),
        ];
        if self.config.restart_time > 0 {
            caps.push(Capability::GracefulRestart {
                restarting: false,
                time: self.config.restart_time,
                families: vec![],
            });
        }
        Open {
            asn: self.config.local_as,
            hold_time: self.config.hold_time,
            bgp_id: self.config.local_id,
            capabilities: caps,
        }
    }

    fn add_path_offer(&self) -> Vec<(u16, u8, u8)> {
        let both = ADD_PATH_RECEIVE | ADD_PATH_SEND;
        vec![
            (AFI_IPV4, SAFI_UNICAST, both),
            (AFI_IPV6, SAFI_UNICAST, both),
        ]
    }

    /// Codec parameters for this session (4-octet AS once negotiated).
    pub fn context(&self) -> Context {
        self.negotiated
            .as_ref()
            .map(Negotiated::context)
            .unwrap_or_default()
    }

    pub fn start(&mut self) -> Vec<Action> {
        if self.state == State::Idle {
            self.state = State::Connect;
        }
        Vec::new()
    }

    fn down(&mut self, reason: impl Into<String>, notify: Option<Notification>) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(n) = notify {
            out.push(Action::Send(Message::Notification(n)));
        }
        out.extend([
            Action::HoldTimer(None),
            Action::KeepaliveTimer(None),
            Action::Close,
        ]);
        if self.state != State::Idle && self.state != State::Connect || self.negotiated.is_some() {
            out.push(Action::Down {
                reason: reason.into(),
                keep_stale: None,
            });
        }
        self.state = State::Connect;
        self.negotiated = None;
        out
    }

    /// Check the peer's OPEN against ours; the NOTIFICATION to send if unacceptable.
    fn negotiate(&self, o: &Open) -> Result<Negotiated, (Notification, String)> {
        if o.asn != self.config.peer_as {
            return Err((
                Notification::new(2, 2, vec![]),
                format!(
                    "peer AS {} is not the expected {}",
                    o.asn, self.config.peer_as
                ),
            ));
        }
        if o.bgp_id == self.config.local_id {
            return Err((
                Notification::new(2, 3, vec![]),
                format!("peer BGP identifier {} equals ours", o.bgp_id),
            ));
        }
        let has = |f: &dyn Fn(&Capability) -> bool| o.capabilities.iter().any(f);
        let mp: Vec<(u16, u8)> = o
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::Multiprotocol { afi, safi } => Some((*afi, *safi)),
                _ => None,
            })
            .collect();
        // No multiprotocol capability at all means IPv4 unicast only (RFC 4760 §8).
        let ipv4 = mp.is_empty() || mp.contains(&(AFI_IPV4, SAFI_UNICAST));
        let ipv6 = mp.contains(&(AFI_IPV6, SAFI_UNICAST));
        let hold_time = if o.hold_time == 0 || self.config.hold_time == 0 {
            0
        } else {
            o.hold_time.min(self.config.hold_time)
        };
        let theirs: Vec<(u16, u8, u8)> = o
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::AddPath(v) => Some(v.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        let (add_path_rx, add_path_tx) = add_path_agreement(&self.add_path_offer(), &theirs);
        Ok(Negotiated {
            add_path_rx,
            add_path_tx,
            peer_id: o.bgp_id,
            hold_time,
            four_octet_as: has(&|c| matches!(c, Capability::FourOctetAs(_))),
            ipv4,
            ipv6,
            route_refresh: has(&|c| matches!(c, Capability::RouteRefresh)),
            peer_restart_time: o.capabilities.iter().find_map(|c| match c {
                Capability::GracefulRestart { time, .. } => Some(*time),
                _ => None,
            }),
        })
    }

    fn timers(hold: u16) -> [Action; 2] {
        if hold == 0 {
            [Action::HoldTimer(None), Action::KeepaliveTimer(None)]
        } else {
            [
                Action::HoldTimer(Some(Duration::from_secs(hold as u64))),
                Action::KeepaliveTimer(Some(Duration::from_secs((hold / 3).max(1) as u64))),
            ]
        }
    }

    pub fn handle(&mut self, ev: Event) -> Vec<Action> {
        use State::*;
        match (self.state, ev) {
            (Idle, _) => Vec::new(),
            (_, Event::Stop { subcode }) => self.down(
                format!("stopped: {}", Notification::cease(subcode).describe()),
                Some(Notification::cease(subcode)),
            ),
            (Connect, Event::Connected) => {
                self.state = OpenSent;
                vec![
                    Action::Send(Message::Open(self.open_message())),
                    Action::HoldTimer(Some(OPEN_HOLD)),
                ]
            }
            (Connect, _) => Vec::new(),
            (state, Event::Disconnected) => {
                // RFC 4724 §4.2: the TCP session of an established peer that announced graceful
                // restart ended without a NOTIFICATION: keep its routes, marked stale, for its
                // restart time.
                let restart = match (state, &self.negotiated) {
                    (State::Established, Some(n)) => n.peer_restart_time.filter(|t| *t > 0),
                    _ => None,
                };
                let mut out = self.down("connection closed", None);
                if let Some(Action::Down { keep_stale, .. }) = out.last_mut() {
                    *keep_stale = restart.map(|t| Duration::from_secs(t as u64));
                }
                out
            }
            (_, Event::Malformed(e)) => self.down(
                format!("malformed message from peer: {}", e.reason),
                Some(e.notification),
            ),
            (_, Event::HoldTimerExpired) => {
                self.down("hold timer expired", Some(Notification::new(4, 0, vec![])))
            }
            (_, Event::Received(Message::Notification(n))) => {
                self.down(format!("peer sent NOTIFICATION: {}", n.describe()), None)
            }
            (OpenSent, Event::Received(Message::Open(o))) => match self.negotiate(&o) {
                Ok(n) => {
                    self.state = OpenConfirm;
                    let mut out = vec![Action::Send(Message::Keepalive)];
                    out.extend(Self::timers(n.hold_time));
                    self.negotiated = Some(n);
                    out
                }
                Err((notification, reason)) => {
                    self.down(format!("OPEN refused: {reason}"), Some(notification))
                }
            },
            (OpenConfirm, Event::Received(Message::Keepalive)) => {
                self.state = Established;
                let n = self.negotiated.clone().expect("set in OpenSent");
                let mut out = vec![Action::Established(n.clone())];
                if n.hold_time > 0 {
                    out.push(Action::HoldTimer(Some(Duration::from_secs(
                        n.hold_time as u64,
                    ))));
                }
                out
            }
            (Established, Event::Received(Message::Keepalive)) => self.refresh_hold(),
            (Established, Event::Received(Message::Update(u))) => {
                let mut out = self.refresh_hold();
                out.push(Action::Update(u));
                out
            }
            (Established, Event::Received(Message::RouteRefresh { afi, safi })) => {
                let mut out = self.refresh_hold();
                // RFC 2918 §4: only from a peer that announced the capability, and only for a
                // family both sides announced; anything else is ignored (it would otherwise
                // buy a full re-export per 23-byte message).
                let honoured = self.negotiated.as_ref().is_some_and(|n| {
                    n.route_refresh
                        && match (afi, safi) {
                            (1, 1) => n.ipv4,
                            (2, 1) => n.ipv6,
                            _ => false,
                        }
                });
                if honoured {
                    out.push(Action::RouteRefresh { afi, safi });
                }
                out
            }
            (OpenConfirm | Established, Event::KeepaliveTimerExpired) => {
                let mut out = vec![Action::Send(Message::Keepalive)];
                if let Some(n) = &self.negotiated {
                    out.push(Action::KeepaliveTimer(Some(Duration::from_secs(
                        (n.hold_time / 3).max(1) as u64,
                    ))));
                }
                out
            }
            (OpenSent, Event::KeepaliveTimerExpired) => Vec::new(),
            // Anything else is out of order: RFC 4271 §6.6 Finite State Machine Error.
            (state, Event::Received(m)) => {
                let kind = match m {
                    Message::Open(_) => "OPEN",
                    Message::Update(_) => "UPDATE",
                    Message::Keepalive => "KEEPALIVE",
                    Message::RouteRefresh { .. } => "ROUTE-REFRESH",
                    Message::Notification(_) => "NOTIFICATION",
                };
                let sub = match state {
                    OpenSent => 1,
                    OpenConfirm => 2,
                    _ => 3,
                };
                self.down(
                    format!("unexpected {kind} in {state:?}"),
                    Some(Notification::new(5, sub, vec![])),
                )
            }
            (_, Event::Connected) => Vec::new(),
        }
    }

    fn refresh_hold(&self) -> Vec<Action> {
        match &self.negotiated {
            Some(n) if n.hold_time > 0 => vec![Action::HoldTimer(Some(Duration::from_secs(
                n.hold_time as u64,
            )))],
            _ => Vec::new(),
        }
    }
}

/// RFC 4271 §6.8 collision resolution: of two connections with the same peer, keep the one
/// opened by the speaker with the higher BGP identifier. `existing_outgoing` tells whether the
/// connection we already have is the one we opened. Returns true to keep the existing one.
pub fn keep_existing_on_collision(
    local_id: Ipv4Addr,
    remote_id: Ipv4Addr,
    existing_outgoing: bool,
) -> bool {
    let we_win = u32::from(local_id) > u32::from(remote_id);
    we_win == existing_outgoing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SessionConfig {
        SessionConfig {
            local_as: 65010,
            local_id: "10.10.0.2".parse().unwrap(),
            peer_as: 65010,
            hold_time: 90,
            restart_time: 120,
        }
    }

    fn peer_open(hold: u16) -> Message {
        Message::Open(Open {
            asn: 65010,
            hold_time: hold,
            bgp_id: "10.10.0.1".parse().unwrap(),
            capabilities: vec![
                Capability::FourOctetAs(65010),
                Capability::Multiprotocol {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                },
            ],
        })
    }

    fn established(hold: u16) -> Session {
        let mut s = Session::new(cfg());
        s.start();
        s.handle(Event::Connected);
        s.handle(Event::Received(peer_open(hold)));
        s.handle(Event::Received(Message::Keepalive));
        assert_eq!(s.state, State::Established);
        s
    }

    #[test]
    fn a_connection_sends_our_open_with_all_capabilities() {
        let mut s = Session::new(cfg());
        s.start();
        let out = s.handle(Event::Connected);
        let Action::Send(Message::Open(o)) = &out[0] else {
            panic!("{out:?}")
        };
        assert!(o.capabilities.contains(&Capability::FourOctetAs(65010)));
        assert!(o.capabilities.contains(&Capability::RouteRefresh));
        assert!(
            o.capabilities.iter().any(
                |c| matches!(c, Capability::GracefulRestart { families, .. } if families.is_empty())
            ),
            "graceful restart as a helper: no family whose forwarding we would preserve"
        );
        assert_eq!(s.state, State::OpenSent);
    }

    #[test]
    fn holdtime_negotiation_uses_the_minimum_and_keepalive_a_third() {
        let mut s = Session::new(cfg());
        s.start();
        s.handle(Event::Connected);
        let out = s.handle(Event::Received(peer_open(30)));
        assert!(out.contains(&Action::HoldTimer(Some(Duration::from_secs(30)))));
        assert!(out.contains(&Action::KeepaliveTimer(Some(Duration::from_secs(10)))));
        assert!(s.negotiated.as_ref().unwrap().four_octet_as);
    }

    #[test]
    fn a_zero_hold_time_disables_both_timers() {
        let mut s = Session::new(cfg());
        s.start();
        s.handle(Event::Connected);
        let out = s.handle(Event::Received(peer_open(0)));
        assert!(
            out.contains(&Action::HoldTimer(None)) && out.contains(&Action::KeepaliveTimer(None))
        );
    }

    #[test]
    fn add_path_is_used_only_in_the_directions_and_families_both_sides_offered() {
        let mut s = Session::new(cfg());
        s.start();
        s.handle(Event::Connected);
        let Message::Open(mut o) = peer_open(90) else {
            unreachable!()
        };
        // The peer (like bird's `add paths rx`) only receives, and only IPv4.
        o.capabilities
            .push(Capability::AddPath(vec![(AFI_IPV4, SAFI_UNICAST, 1)]));
        s.handle(Event::Received(Message::Open(o)));
        let ctx = s.context();
        assert_eq!(
            ctx.add_path_tx,
            Families {
                ipv4: true,
                ipv6: false
            },
            "we send path identifiers where it receives them"
        );
        assert_eq!(ctx.add_path_rx, Families::NONE, "it sends none");
    }

    #[test]
    fn a_peer_without_the_add_path_capability_gets_plain_nlri() {
        let s = established(90);
        assert_eq!(s.context().add_path_rx, Families::NONE);
        assert_eq!(s.context().add_path_tx, Families::NONE);
    }

    #[test]
    fn we_offer_add_path_send_and_receive_for_both_families() {
        let o = Session::new(cfg()).open_message();
        assert!(o.capabilities.contains(&Capability::AddPath(vec![
            (AFI_IPV4, SAFI_UNICAST, 3),
            (AFI_IPV6, SAFI_UNICAST, 3)
        ])));
    }

    /// The actions after the peer's OPEN (hold 90) reaches a session with `config`.
    fn after_open(config: SessionConfig) -> (Session, Vec<Action>) {
        let mut s = Session::new(config);
        s.start();
        s.handle(Event::Connected);
        let out = s.handle(Event::Received(peer_open(90)));
        (s, out)
    }

    fn refused_with(out: &[Action], subcode: u8) -> bool {
        out.contains(&Action::Send(Message::Notification(Notification::new(
            2,
            subcode,
            vec![],
        ))))
    }

    #[test]
    fn a_wrong_peer_as_is_refused_with_bad_peer_as() {
        let (s, out) = after_open(SessionConfig {
            peer_as: 65020,
            ..cfg()
        });
        assert!(refused_with(&out, 2), "{out:?}");
        assert_eq!(s.state, State::Connect);
    }

    #[test]
    fn our_own_bgp_identifier_from_the_peer_is_refused() {
        let (_, out) = after_open(SessionConfig {
            local_id: "10.10.0.1".parse().unwrap(),
            ..cfg()
        });
        assert!(refused_with(&out, 3), "{out:?}");
    }

    #[test]
    fn updates_are_delivered_only_when_established() {
        let mut s = Session::new(cfg());
        s.start();
        s.handle(Event::Connected);
        let out = s.handle(Event::Received(Message::Update(Update::default())));
        assert!(
            out.contains(&Action::Send(Message::Notification(Notification::new(
                5,
                1,
                vec![]
            )))),
            "{out:?}"
        );
        let mut s = established(90);
        let out = s.handle(Event::Received(Message::Update(Update::default())));
        assert!(matches!(out.last(), Some(Action::Update(_))));
    }

    #[test]
    fn hold_timer_expiry_sends_notification_and_brings_the_session_down() {
        let mut s = established(90);
        let out = s.handle(Event::HoldTimerExpired);
        assert_eq!(
            out[0],
            Action::Send(Message::Notification(Notification::new(4, 0, vec![])))
        );
        assert!(out.iter().any(|a| matches!(a, Action::Down { .. })));
        assert!(out.contains(&Action::Close));
    }

    #[test]
    fn a_dropped_connection_of_a_graceful_restart_peer_keeps_its_routes_stale() {
        let mut s = Session::new(cfg());
        s.start();
        s.handle(Event::Connected);
        let mut open = peer_open(90);
        if let Message::Open(o) = &mut open {
            o.capabilities.push(Capability::GracefulRestart {
                restarting: false,
                time: 120,
                families: vec![],
            });
        }
        s.handle(Event::Received(open));
        s.handle(Event::Received(Message::Keepalive));
        let out = s.handle(Event::Disconnected);
        assert!(out.iter().any(|a| matches!(a, Action::Down { keep_stale: Some(d), .. } if *d == Duration::from_secs(120))), "{out:?}");
    }

    #[test]
    fn a_notification_ends_graceful_restart_and_the_routes_go() {
        let mut s = established(90);
        let out = s.handle(Event::Received(Message::Notification(Notification::cease(
            2,
        ))));
        assert!(
            out.iter().any(|a| matches!(
                a,
                Action::Down {
                    keep_stale: None,
                    ..
                }
            )),
            "{out:?}"
        );
    }

    #[test]
    fn a_malformed_message_is_answered_with_its_notification() {
        let mut s = established(90);
        let e = DecodeError {
            notification: Notification::new(3, 1, vec![]),
            reason: "x".into(),
        };
        let out = s.handle(Event::Malformed(e));
        assert_eq!(
            out[0],
            Action::Send(Message::Notification(Notification::new(3, 1, vec![])))
        );
    }

    #[test]
    fn a_route_refresh_request_is_passed_up_only_with_the_capability_and_for_a_negotiated_family() {
        let refresh = |afi, safi| Event::Received(Message::RouteRefresh { afi, safi });
        let asked = |out: &[Action]| out.iter().any(|a| matches!(a, Action::RouteRefresh { .. }));
        // The peer did not announce route refresh: ignored (RFC 2918 §4), the session lives.
        let mut s = established(90);
        let out = s.handle(refresh(1, 1));
        assert!(!asked(&out), "{out:?}");
        assert_eq!(s.state, State::Established);
        // It did: IPv4 unicast is honoured, IPv6 (not negotiated) and odd families are not.
        let mut s = Session::new(cfg());
        s.start();
        s.handle(Event::Connected);
        let Message::Open(mut o) = peer_open(90) else {
            unreachable!()
        };
        o.capabilities.push(Capability::RouteRefresh);
        s.handle(Event::Received(Message::Open(o)));
        s.handle(Event::Received(Message::Keepalive));
        assert!(s
            .handle(refresh(1, 1))
            .contains(&Action::RouteRefresh { afi: 1, safi: 1 }));
        assert!(!asked(&s.handle(refresh(2, 1))));
        assert!(!asked(&s.handle(refresh(1, 128))));
    }

    #[test]
    fn collision_keeps_the_connection_opened_by_the_higher_identifier() {
        let (hi, lo): (Ipv4Addr, Ipv4Addr) =
            ("10.0.0.2".parse().unwrap(), "10.0.0.1".parse().unwrap());
        assert!(
            keep_existing_on_collision(hi, lo, true),
            "we are higher and the existing one is ours"
        );
        assert!(!keep_existing_on_collision(hi, lo, false));
        assert!(
            keep_existing_on_collision(lo, hi, false),
            "the peer is higher and the existing one is theirs"
        );
    }
}
