//! Property tests for the BGP codec: any UPDATE, OPEN or NOTIFICATION we can build encodes to
//! bytes that decode back to the same value, and no byte string makes the decoder panic.

use appliance::bgp::wire::{
    decode, encode, AsSegment, Attributes, Capability, Context, Message, Nlri, Notification, Open,
    Origin, Update,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr};

const CTX: Context = Context {
    four_octet_as: true,
    ..Context::PLAIN
};

fn v4net() -> impl Strategy<Value = IpNet> {
    (any::<u32>(), 0u8..=32)
        .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).unwrap().trunc()))
}

fn v6net() -> impl Strategy<Value = IpNet> {
    (any::<u128>(), 0u8..=128)
        .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).unwrap().trunc()))
}

fn unicast_v4() -> impl Strategy<Value = Ipv4Addr> {
    (1u32..0xe000_0000).prop_map(Ipv4Addr::from)
}

fn attributes(v6_nlri: bool) -> impl Strategy<Value = Attributes> {
    (
        prop_oneof![
            Just(Origin::Igp),
            Just(Origin::Egp),
            Just(Origin::Incomplete)
        ],
        prop::collection::vec(prop::collection::vec(any::<u32>(), 1..5), 0..3),
        unicast_v4(),
        any::<u128>(),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u32>()),
        prop::collection::vec(any::<u32>(), 0..4),
        prop::option::of(unicast_v4()),
        prop::collection::vec(unicast_v4(), 0..3),
    )
        .prop_map(
            move |(origin, path, nh4, nh6, med, lp, communities, originator, clusters)| {
                Attributes {
                    origin,
                    as_path: path.into_iter().map(AsSegment::Sequence).collect(),
                    next_hop: Some(if v6_nlri {
                        Ipv6Addr::from(nh6).into()
                    } else {
                        nh4.into()
                    }),
                    med,
                    local_pref: lp,
                    atomic_aggregate: false,
                    communities,
                    originator_id: originator,
                    cluster_list: clusters,
                    unknown: vec![],
                }
            },
        )
}

/// NLRI with path identifiers when the session uses ADD-PATH, 0 otherwise.
fn nlri(net: impl Strategy<Value = IpNet>, add_path: bool) -> impl Strategy<Value = Nlri> {
    let id = if add_path {
        (0u32..).boxed()
    } else {
        Just(0u32).boxed()
    };
    (net, id).prop_map(|(prefix, path_id)| Nlri { prefix, path_id })
}

fn update(add_path: bool) -> impl Strategy<Value = Update> {
    prop_oneof![
        (
            prop::collection::vec(nlri(v4net(), add_path), 1..30),
            prop::collection::vec(nlri(v4net(), add_path), 0..30),
            attributes(false)
        ),
        (
            prop::collection::vec(nlri(v6net(), add_path), 1..30),
            prop::collection::vec(nlri(v6net(), add_path), 0..30),
            attributes(true)
        ),
    ]
    .prop_map(|(mut announced, mut withdrawn, a)| {
        announced.sort();
        announced.dedup();
        withdrawn.sort();
        withdrawn.dedup();
        Update {
            announced,
            withdrawn,
            attributes: Some(a),
            ..Default::default()
        }
    })
}

fn sorted(m: Message) -> Message {
    match m {
        Message::Update(mut u) => {
            u.announced.sort();
            u.withdrawn.sort();
            Message::Update(u)
        }
        m => m,
    }
}

proptest! {
    #[test]
    fn updates_round_trip(u in update(false)) {
        let m = Message::Update(u);
        let bytes = encode(&m, CTX);
        prop_assume!(bytes.len() <= 4096);
        prop_assert_eq!(sorted(decode(&bytes, CTX).unwrap()), sorted(m));
    }

    #[test]
    fn add_path_updates_round_trip(u in update(true)) {
        let m = Message::Update(u);
        let bytes = encode(&m, Context::ALL);
        prop_assume!(bytes.len() <= 4096);
        prop_assert_eq!(sorted(decode(&bytes, Context::ALL).unwrap()), sorted(m));
    }

    #[test]
    fn opens_round_trip(asn in 1u32.., hold in prop_oneof![Just(0u16), 3u16..], id in unicast_v4(), rr in any::<bool>()) {
        let mut capabilities = vec![Capability::FourOctetAs(asn)];
        if rr {
            capabilities.push(Capability::RouteRefresh);
        }
        let m = Message::Open(Open { asn, hold_time: hold, bgp_id: id, capabilities });
        prop_assert_eq!(decode(&encode(&m, CTX), CTX).unwrap(), m);
    }

    #[test]
    fn notifications_round_trip(code in any::<u8>(), sub in any::<u8>(), data in prop::collection::vec(any::<u8>(), 0..64)) {
        let m = Message::Notification(Notification::new(code, sub, data));
        prop_assert_eq!(decode(&encode(&m, CTX), CTX).unwrap(), m);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(kind in 1u8..=6, body in prop::collection::vec(any::<u8>(), 0..600), four in any::<bool>(), add_path in any::<bool>()) {
        let mut m = vec![0xff; 16];
        m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        m.push(kind);
        m.extend_from_slice(&body);
        let ctx = if add_path { Context::ALL } else { Context::PLAIN };
        let _ = decode(&m, Context { four_octet_as: four, ..ctx });
    }
}
