//! The RIB task's reactions: graceful-restart stale handling, what each peer is sent, the
//! session stops it orders, and what the host routes by.

use super::*;
use crate::bgp::rib::{Policy, RibPeer};
use crate::bgp::wire::{Attributes, Families, Nlri};
use std::net::IpAddr;

const RESTART: Duration = Duration::from_secs(120);

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn attrs(nh: &str) -> Attributes {
    Attributes {
        next_hop: Some(nh.parse::<IpAddr>().unwrap()),
        local_pref: Some(100),
        ..Default::default()
    }
}

fn policy(allow: &[&str], max_prefix: u32) -> Policy {
    Policy {
        allow: allow.iter().map(|s| net(s)).collect(),
        deny: vec![],
        max_prefix,
        next_hop_self: None,
        next_hop_self_v6: None,
    }
}

fn negotiated(id: &str, graceful: bool) -> Negotiated {
    Negotiated {
        peer_id: id.parse().unwrap(),
        hold_time: 90,
        four_octet_as: true,
        ipv4: true,
        ipv6: true,
        route_refresh: true,
        peer_restart_time: graceful.then_some(120),
        add_path_rx: Families::NONE,
        add_path_tx: Families::NONE,
    }
}

const SITE: PeerId = 0;
const C1: PeerId = 1;

/// A gateway: the site router (non-client) and node c1 (client, 10.200.0.0/28, max 4), both
/// established; c1 announced 10.200.0.1/32 and 10.200.0.2/32.
fn gateway() -> Router {
    let mut rib = Rib::new("10.10.0.2".parse().unwrap());
    rib.add_peer(RibPeer {
        name: "site".into(),
        kind: PeerKind::NonClient,
        policy: policy(&[], 100),
        router_id: None,
    });
    rib.add_peer(RibPeer {
        name: "c1".into(),
        kind: PeerKind::Client,
        policy: policy(&["10.200.0.0/28"], 4),
        router_id: None,
    });
    let mut r = Router::new(rib, Learn::FromClients);
    r.handle(Input::Up(SITE, negotiated("10.10.0.1", true)));
    r.handle(Input::Up(C1, negotiated("10.200.0.11", true)));
    let o = r.handle(announce(&["10.200.0.1/32", "10.200.0.2/32"], "10.200.0.11"));
    assert_eq!(o.changed, vec![net("10.200.0.1/32"), net("10.200.0.2/32")]);
    r
}

fn announce(prefixes: &[&str], nh: &str) -> Input {
    Input::Update(
        C1,
        Box::new(Update {
            announced: prefixes.iter().map(|p| Nlri::from(net(p))).collect(),
            attributes: Some(attrs(nh)),
            ..Default::default()
        }),
    )
}

/// The prefixes `to` was told to withdraw and to announce in `o`.
fn told(o: &Output, to: PeerId) -> (Vec<IpNet>, Vec<IpNet>) {
    let (mut w, mut a) = (Vec::new(), Vec::new());
    for (id, m) in &o.send {
        if let (true, Message::Update(u)) = (*id == to, m) {
            w.extend(u.withdrawn.iter().map(|n| n.prefix));
            a.extend(u.announced.iter().map(|n| n.prefix));
        }
    }
    (w, a)
}

fn cease(o: &Output, to: PeerId) -> Option<u8> {
    o.send.iter().find_map(|(id, m)| match m {
        Message::Notification(n) if *id == to && n.code == 6 => Some(n.subcode),
        _ => None,
    })
}

#[test]
fn a_gracefully_restarting_peer_keeps_its_routes_until_end_of_rib_sweeps_the_rest() {
    let mut r = gateway();
    let o = r.handle(Input::Down(C1, Some(RESTART)));
    assert!(o.changed.is_empty(), "nothing withdrawn while c1 restarts");
    assert!(told(&o, SITE).0.is_empty());
    assert_eq!(o.timers.len(), 1);
    assert_eq!(o.timers[0].after, RESTART);
    let restart_timer = o.timers[0];
    assert_eq!(
        r.learned(&net("10.200.0.2/32")),
        BTreeSet::from(["c1".to_string()])
    );

    let o = r.handle(Input::Up(C1, negotiated("10.200.0.11", true)));
    assert_eq!(
        o.timers[0].after, STALE_PATH_TIME,
        "waits for End-of-RIB, bounded"
    );
    r.handle(announce(&["10.200.0.1/32"], "10.200.0.11"));
    // The restart timer of the earlier session runs out now: it no longer counts.
    let o = r.handle(Input::StaleExpired(C1, restart_timer.generation));
    assert!(o.changed.is_empty());
    let o = r.handle(Input::Update(C1, Box::default()));
    assert_eq!(o.changed, vec![net("10.200.0.2/32")]);
    assert_eq!(told(&o, SITE), (vec![net("10.200.0.2/32")], vec![]));
    assert!(r.learned(&net("10.200.0.2/32")).is_empty());
    assert!(!r.learned(&net("10.200.0.1/32")).is_empty());
}

#[test]
fn the_restart_time_running_out_while_the_peer_is_away_withdraws_its_routes() {
    let mut r = gateway();
    let t = r.handle(Input::Down(C1, Some(RESTART))).timers[0];
    let o = r.handle(Input::StaleExpired(C1, t.generation));
    assert_eq!(o.changed.len(), 2);
    assert_eq!(told(&o, SITE).0.len(), 2);
}

#[test]
fn a_peer_back_without_end_of_rib_loses_its_stale_routes_at_the_stale_path_time() {
    let mut r = gateway();
    r.handle(Input::Down(C1, Some(RESTART)));
    let t = r
        .handle(Input::Up(C1, negotiated("10.200.0.11", true)))
        .timers[0];
    r.handle(announce(&["10.200.0.1/32"], "10.200.0.11"));
    let o = r.handle(Input::StaleExpired(C1, t.generation));
    assert_eq!(o.changed, vec![net("10.200.0.2/32")]);
}

#[test]
fn a_peer_back_without_the_capability_loses_its_stale_routes_at_once() {
    let mut r = gateway();
    r.handle(Input::Down(C1, Some(RESTART)));
    let o = r.handle(Input::Up(C1, negotiated("10.200.0.11", false)));
    assert_eq!(o.changed.len(), 2);
    assert!(o.timers.is_empty());
    assert_eq!(told(&o, SITE).0.len(), 2);
}

#[test]
fn a_session_down_without_restart_withdraws_everything_it_announced() {
    let mut r = gateway();
    let o = r.handle(Input::Down(C1, None));
    assert_eq!(told(&o, SITE).0.len(), 2);
    assert!(o.timers.is_empty());
}

#[test]
fn only_differences_are_sent_and_the_sender_is_not_told_its_own_routes() {
    let mut r = gateway();
    let o = r.handle(announce(&["10.200.0.1/32"], "10.200.0.11"));
    assert!(
        o.send.is_empty(),
        "the same route again sends nothing: {:?}",
        o.send
    );
    let o = r.handle(announce(&["10.200.0.1/32"], "10.200.0.12"));
    assert_eq!(told(&o, SITE), (vec![], vec![net("10.200.0.1/32")]));
    assert_eq!(told(&o, C1), (vec![], vec![]));
    assert_eq!(r.sent_count(SITE), 2);
    // A route refresh sends everything again, then End-of-RIB.
    let o = r.handle(Input::Refresh(SITE));
    assert_eq!(told(&o, SITE).1.len(), 2);
    assert!(matches!(o.send.last(), Some((SITE, Message::Update(u))) if u.is_end_of_rib()));
}

#[test]
fn a_new_session_is_sent_the_table_and_end_of_rib() {
    let mut r = gateway();
    r.handle(Input::Down(SITE, None));
    let o = r.handle(Input::Up(SITE, negotiated("10.10.0.1", true)));
    assert_eq!(told(&o, SITE).1.len(), 2);
    assert!(matches!(o.send.last(), Some((SITE, Message::Update(u))) if u.is_end_of_rib()));
}

#[test]
fn max_prefix_exceeded_stops_that_session_only() {
    let mut r = gateway();
    let o = r.handle(announce(
        &["10.200.0.3/32", "10.200.0.4/32", "10.200.0.5/32"],
        "10.200.0.11",
    ));
    assert_eq!(cease(&o, C1), Some(1));
    assert_eq!(cease(&o, SITE), None);
    // Nothing of the session over its limit reaches anyone, not even for a moment: the other
    // gateway's limit is the sum of the nodes' (found in the 250-node lab, where a node over
    // its assignment tripped the gateways' session with each other), and what c1 announced
    // before is withdrawn now, not when its session task reports it down.
    assert_eq!(
        told(&o, SITE),
        (vec![net("10.200.0.1/32"), net("10.200.0.2/32")], vec![]),
        "the site router hears only withdrawals"
    );
    assert!(!r.is_up(C1));
    assert!(r.learned(&net("10.200.0.3/32")).is_empty());
    assert!(r.learned(&net("10.200.0.1/32")).is_empty());
}

#[test]
fn an_unreachable_node_is_reset_and_its_routes_withdrawn_even_if_restarting() {
    let mut r = gateway();
    let o = r.handle(Input::Reachable(C1, false, Lost::Tunnel));
    assert_eq!(cease(&o, C1), Some(8));
    assert_eq!(told(&o, SITE).0.len(), 2);
    assert!(!r.is_up(C1));
    // Down gracefully first, then unreachable: the stale routes go too.
    let mut r = gateway();
    r.handle(Input::Down(C1, Some(RESTART)));
    let o = r.handle(Input::Reachable(C1, false, Lost::Tunnel));
    assert_eq!(o.changed.len(), 2);
    // By BFD: Cease 10, "BFD Down" (RFC 9384).
    let mut r = gateway();
    let o = r.handle(Input::Reachable(SITE, false, Lost::Bfd));
    assert_eq!(cease(&o, SITE), Some(10));
    assert!(o.events.iter().any(|e| e.1.contains("BFD session down")));
}

#[test]
fn a_gateway_routes_by_client_paths_only_and_a_node_by_all() {
    let mut r = gateway();
    let site_route = Update {
        announced: vec![Nlri::from(net("10.12.0.0/16"))],
        attributes: Some(attrs("10.10.0.1")),
        ..Default::default()
    };
    r.handle(Input::Update(SITE, Box::new(site_route.clone())));
    assert!(r.learned(&net("10.12.0.0/16")).is_empty());
    assert_eq!(
        r.learned(&net("10.200.0.1/32")),
        BTreeSet::from(["c1".to_string()])
    );
    r.learn = Learn::FromAll;
    assert_eq!(
        r.learned(&net("10.12.0.0/16")),
        BTreeSet::from(["site".to_string()])
    );
}

#[test]
fn shutdown_tells_every_established_peer() {
    let mut r = gateway();
    let o = r.handle(Input::Shutdown);
    assert_eq!((cease(&o, SITE), cease(&o, C1)), (Some(2), Some(2)));
}

/// A client's UPDATE just under 4096 bytes (a big unknown optional transitive attribute): the
/// reflector adds ORIGINATOR_ID, CLUSTER_LIST and LOCAL_PREF, and the re-encoded UPDATE must
/// still fit, or bird and FRR reset the session, and the route comes back on reconnect, forever.
/// Such a path is not passed on (and counted as rejected); a smaller one is, whole.
#[test]
fn a_client_update_that_would_not_fit_once_reflected_is_not_passed_on() {
    use crate::bgp::wire::{self, Context, Families, RawAttribute};
    let ctx = Context {
        four_octet_as: true,
        add_path_rx: Families::NONE,
        add_path_tx: Families::NONE,
    };
    let update = |len: usize| {
        let mut a = attrs("10.200.0.11");
        a.unknown = vec![RawAttribute {
            flags: 0xc0 | 0x10, // optional, transitive, extended length
            code: 99,
            value: vec![0xab; len],
        }];
        Update {
            announced: vec![Nlri::from(net("10.200.0.3/32"))],
            attributes: Some(a),
            ..Default::default()
        }
    };
    // The client's message: 4095 bytes.
    let mut len = 4000;
    while wire::encode(&Message::Update(update(len)), ctx).len() < 4095 {
        len += 1;
    }
    assert_eq!(wire::encode(&Message::Update(update(len)), ctx).len(), 4095);
    let mut r = gateway();
    let o = r.handle(Input::Update(C1, Box::new(update(len))));
    for (id, m) in &o.send {
        let n = wire::encode(m, ctx).len();
        assert!(n <= wire::MAX_LEN, "peer {id} is sent a {n}-byte message");
    }
    assert!(told(&o, SITE).1.is_empty(), "not passed on");
    assert!(
        o.rejected.iter().any(|e| e.2.contains("too long")),
        "{:?}",
        o.rejected
    );
    // 100 bytes smaller, it fits with what the reflector adds, and goes.
    let o = r.handle(Input::Update(C1, Box::new(update(len - 100))));
    assert_eq!(told(&o, SITE).1, vec![net("10.200.0.3/32")]);
    for (_, m) in &o.send {
        assert!(wire::encode(m, ctx).len() <= wire::MAX_LEN);
    }
}

/// A drained gateway withdraws every path it announced, keeps its sessions and what it
/// learned (it still routes to its nodes), and announces everything again when undrained.
#[test]
fn a_drained_gateway_withdraws_everything_and_announces_it_again_when_undrained() {
    let mut r = gateway();
    let both = vec![net("10.200.0.1/32"), net("10.200.0.2/32")];
    let o = r.handle(Input::Drain(true));
    assert_eq!(
        told(&o, SITE),
        (both.clone(), vec![]),
        "the site router drops our paths"
    );
    assert!(
        cease(&o, SITE).is_none() && cease(&o, C1).is_none(),
        "sessions stay"
    );
    assert_eq!(r.learned(&both[0]), BTreeSet::from(["c1".to_string()]));
    assert!(
        r.handle(Input::Drain(true)).send.is_empty(),
        "draining twice says nothing"
    );
    // A new announcement while drained goes nowhere.
    let o = r.handle(announce(&["10.200.0.3/32"], "10.200.0.11"));
    assert!(told(&o, SITE).1.is_empty());
    let o = r.handle(Input::Drain(false));
    let (w, mut a) = told(&o, SITE);
    a.sort();
    assert!(w.is_empty());
    assert_eq!(
        a,
        vec![
            net("10.200.0.1/32"),
            net("10.200.0.2/32"),
            net("10.200.0.3/32")
        ]
    );
}
