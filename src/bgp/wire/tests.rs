use super::*;
use ipnet::IpNet;

const CTX: Context = Context {
    four_octet_as: true,
    ..Context::PLAIN
};

#[test]
fn add_path_nlri_carry_a_path_identifier_before_each_prefix() {
    let u = Update {
        announced: vec![
            Nlri {
                prefix: net("10.12.0.0/16"),
                path_id: 7,
            },
            Nlri {
                prefix: net("10.12.0.0/16"),
                path_id: 9,
            },
        ],
        attributes: Some(ibgp_attrs("10.10.0.1")),
        ..Default::default()
    };
    let m = encode(&Message::Update(u.clone()), Context::ALL);
    // The NLRI field ends the message: id 7, /16, 10.12; id 9, /16, 10.12.
    assert_eq!(
        &m[m.len() - 14..],
        &[0, 0, 0, 7, 16, 10, 12, 0, 0, 0, 9, 16, 10, 12]
    );
    assert_eq!(decode(&m, Context::ALL).unwrap(), Message::Update(u));
}

#[test]
fn add_path_ipv6_nlri_and_withdrawals_round_trip_in_mp_attributes() {
    let u = Update {
        announced: vec![Nlri {
            prefix: net("2001:db8:200::/64"),
            path_id: 3,
        }],
        // IPv4 withdrawals come first on the wire, then MP_UNREACH_NLRI.
        withdrawn: vec![
            Nlri {
                prefix: net("10.1.0.0/16"),
                path_id: 5,
            },
            Nlri {
                prefix: net("2001:db8:1::/48"),
                path_id: 4,
            },
        ],
        attributes: Some(ibgp_attrs("2001:db8::1")),
        ..Default::default()
    };
    let m = encode(&Message::Update(u.clone()), Context::ALL);
    assert_eq!(decode(&m, Context::ALL).unwrap(), Message::Update(u));
}

#[test]
fn add_path_nlri_read_on_a_session_without_add_path_are_an_invalid_network_field() {
    let u = Update {
        announced: vec![Nlri {
            prefix: net("10.12.0.0/16"),
            path_id: 0x0a0b_0c0d,
        }],
        attributes: Some(ibgp_attrs("10.10.0.1")),
        ..Default::default()
    };
    let m = encode(&Message::Update(u), Context::ALL);
    // Read as plain NLRI, 0a 0b 0c 0d 10 0a 0c is 11.0.0.0/10, 16.8.0.0/13, then a /12
    // with no octets left: the prefix overruns the field (RFC 4271: invalid network field).
    let e = decode(&m, CTX).unwrap_err();
    assert_eq!((e.notification.code, e.notification.subcode), (3, 10));
    assert!(e.reason.contains("overruns"), "{}", e.reason);
}

#[test]
fn a_path_identifier_with_no_prefix_after_it_is_an_invalid_network_field() {
    let mut m = encode(
        &Message::Update(Update {
            attributes: Some(ibgp_attrs("10.10.0.1")),
            announced: vec![nlri("10.12.0.0/16")],
            ..Default::default()
        }),
        CTX,
    );
    // Replace the plain NLRI (3 octets) by a lone 4-octet path identifier.
    m.truncate(m.len() - 3);
    m.extend_from_slice(&[0, 0, 0, 1]);
    let len = m.len() as u16;
    m[16..18].copy_from_slice(&len.to_be_bytes());
    let e = decode(&m, Context::ALL).unwrap_err();
    assert_eq!((e.notification.code, e.notification.subcode), (3, 10));
    assert!(e.reason.contains("path identifier"), "{}", e.reason);
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn nlri(s: &str) -> Nlri {
    net(s).into()
}

fn ibgp_attrs(nh: &str) -> Attributes {
    Attributes {
        next_hop: Some(nh.parse().unwrap()),
        local_pref: Some(100),
        ..Default::default()
    }
}

fn roundtrip(m: &Message) {
    let bytes = encode(m, CTX);
    assert_eq!(&decode(&bytes, CTX).unwrap(), m, "{bytes:02x?}");
}

#[test]
fn every_message_type_round_trips() {
    roundtrip(&Message::Keepalive);
    roundtrip(&Message::Notification(Notification::cease(2)));
    roundtrip(&Message::RouteRefresh {
        afi: AFI_IPV6,
        safi: SAFI_UNICAST,
    });
    roundtrip(&Message::Open(Open {
        asn: 4_200_000_001,
        hold_time: 90,
        bgp_id: "10.10.0.2".parse().unwrap(),
        capabilities: vec![
            Capability::Multiprotocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            },
            Capability::Multiprotocol {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
            },
            Capability::RouteRefresh,
            Capability::GracefulRestart {
                restarting: true,
                time: 120,
                families: vec![(AFI_IPV4, SAFI_UNICAST, true)],
            },
            Capability::FourOctetAs(4_200_000_001),
            Capability::AddPath(vec![(AFI_IPV4, SAFI_UNICAST, 3)]),
        ],
    }));
    let mut a = ibgp_attrs("10.10.0.2");
    a.originator_id = Some("10.200.0.11".parse().unwrap());
    a.cluster_list = vec!["10.10.0.2".parse().unwrap(), "10.10.0.3".parse().unwrap()];
    a.communities = vec![65010 << 16 | 7];
    a.med = Some(5);
    a.as_path = vec![AsSegment::Sequence(vec![65001, 4_200_000_001])];
    roundtrip(&Message::Update(Update {
        withdrawn: vec![nlri("10.200.0.12/32"), nlri("2001:db8:1::/48")],
        announced: vec![nlri("10.200.0.11/32"), nlri("10.200.1.0/24")],
        attributes: Some(a.clone()),
        ..Default::default()
    }));
    a.next_hop = Some("2001:db8::2".parse().unwrap());
    roundtrip(&Message::Update(Update {
        announced: vec![nlri("2001:db8:200::/64"), nlri("::/0")],
        attributes: Some(a),
        ..Default::default()
    }));
    roundtrip(&Message::Update(Update::default()));
}

#[test]
fn a_four_octet_as_is_sent_as_as_trans_in_the_open_header() {
    let bytes = encode(
        &Message::Open(Open {
            asn: 4_200_000_001,
            hold_time: 90,
            bgp_id: "1.2.3.4".parse().unwrap(),
            capabilities: vec![Capability::FourOctetAs(4_200_000_001)],
        }),
        CTX,
    );
    assert_eq!(&bytes[20..22], &AS_TRANS.to_be_bytes());
}

fn with_attr(raw: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 0];
    body.extend_from_slice(&(raw.len() as u16).to_be_bytes());
    body.extend_from_slice(raw);
    body.extend_from_slice(nlri);
    frame(UPDATE, &body)
}

const GOOD: &[u8] = &[
    0x40, 1, 1, 0, 0x40, 2, 0, 0x40, 3, 4, 10, 10, 0, 2, 0x40, 5, 4, 0, 0, 0, 100,
];
const NLRI: &[u8] = &[32, 10, 200, 0, 11];

#[test]
fn a_well_formed_update_is_accepted() {
    let Message::Update(u) = decode(&with_attr(GOOD, NLRI), CTX).unwrap() else {
        panic!()
    };
    assert!(!u.treat_as_withdraw, "{:?}", u.errors);
    assert_eq!(u.announced, vec![nlri("10.200.0.11/32")]);
}

#[test]
fn header_errors_produce_the_rfc_notification() {
    let mut m = encode(&Message::Keepalive, CTX);
    m[3] = 0;
    assert_eq!(
        decode(&m, CTX).unwrap_err().notification,
        Notification::new(1, 1, vec![])
    );
    let mut m = encode(&Message::Keepalive, CTX);
    m[17] = 20;
    m.push(0);
    assert_eq!(
        decode(&m, CTX).unwrap_err().notification.subcode,
        2,
        "KEEPALIVE with a body"
    );
    let mut m = encode(&Message::Keepalive, CTX);
    m[18] = 9;
    assert_eq!(
        decode(&m, CTX).unwrap_err().notification,
        Notification::new(1, 3, vec![9])
    );
    let mut m = encode(&Message::Keepalive, CTX);
    m[16] = 0x20;
    assert_eq!(
        frame_len(&m).unwrap_err().notification.subcode,
        2,
        "length over 4096"
    );
}

#[test]
fn open_errors_produce_the_rfc_notification() {
    let good = encode(
        &Message::Open(Open {
            asn: 65010,
            hold_time: 90,
            bgp_id: "1.2.3.4".parse().unwrap(),
            capabilities: vec![],
        }),
        CTX,
    );
    let mut v = good.clone();
    v[19] = 3;
    assert_eq!(decode(&v, CTX).unwrap_err().notification.code, 2);
    assert_eq!(decode(&v, CTX).unwrap_err().notification.subcode, 1);
    let mut h = good.clone();
    h[23] = 1;
    h[22] = 0;
    assert_eq!(
        decode(&h, CTX).unwrap_err().notification.subcode,
        6,
        "hold time 1"
    );
    let mut id = good;
    id[24..28].copy_from_slice(&[0, 0, 0, 0]);
    assert_eq!(
        decode(&id, CTX).unwrap_err().notification.subcode,
        3,
        "BGP identifier 0.0.0.0"
    );
}

fn withdraws(raw: &[u8]) -> Update {
    let Message::Update(u) = decode(&with_attr(raw, NLRI), CTX).unwrap() else {
        panic!()
    };
    assert!(
        u.treat_as_withdraw,
        "expected treat-as-withdraw for {raw:02x?}"
    );
    assert_eq!(u.effective_withdrawn(), vec![nlri("10.200.0.11/32")]);
    u
}

#[test]
fn malformed_well_known_attributes_are_treated_as_withdraw() {
    // ORIGIN with the optional bit set (flags error), ORIGIN value 7, NEXT_HOP length 3.
    let mut bad_flags = GOOD.to_vec();
    bad_flags[0] = 0xc0;
    withdraws(&bad_flags);
    let mut bad_origin = GOOD.to_vec();
    bad_origin[3] = 7;
    withdraws(&bad_origin);
    let bad_nh = [&GOOD[..7], &[0x40, 3, 3, 10, 10, 0], &GOOD[14..]].concat();
    withdraws(&bad_nh);
    // AS_PATH with segment type 9, and a segment that overruns.
    let bad_path = [
        &GOOD[..4],
        &[0x40, 2, 6, 9, 1, 0, 0, 0xfd, 0xf2],
        &GOOD[7..],
    ]
    .concat();
    let u = withdraws(&bad_path);
    assert!(u.errors[0].contains("AS_PATH"), "{:?}", u.errors);
    let overrun_path = [
        &GOOD[..4],
        &[0x40, 2, 6, 2, 5, 0, 0, 0xfd, 0xf2],
        &GOOD[7..],
    ]
    .concat();
    withdraws(&overrun_path);
    // Missing NEXT_HOP for IPv4 NLRI, and an attribute that overruns the list.
    let no_nh = [&GOOD[..7], &GOOD[14..]].concat();
    withdraws(&no_nh);
    let overrun = [GOOD, &[0x80, 4, 9, 0, 0]].concat();
    withdraws(&overrun);
    // A malformed CLUSTER_LIST (RFC 7606 §7.10).
    withdraws(&[GOOD, &[0x80, 10, 3, 1, 2, 3]].concat());
}

#[test]
fn structural_update_errors_reset_the_session() {
    // Withdrawn length overruns the message.
    let m = frame(UPDATE, &[0, 50, 0, 0]);
    assert_eq!(
        decode(&m, CTX).unwrap_err().notification,
        Notification::new(3, 1, vec![])
    );
    // Total attribute length overruns the message.
    let m = frame(UPDATE, &[0, 0, 0, 40, 0x40, 1, 1, 0]);
    assert_eq!(decode(&m, CTX).unwrap_err().notification.subcode, 1);
    // Unrecognized well-known attribute.
    let m = with_attr(&[GOOD, &[0x40, 99, 1, 0]].concat(), NLRI);
    assert_eq!(decode(&m, CTX).unwrap_err().notification.subcode, 2);
    // Malformed MP_REACH_NLRI (next hop length 5) hides its NLRI.
    let m = with_attr(&[GOOD, &[0x80, 14, 6, 0, 2, 1, 5, 0, 0]].concat(), &[]);
    assert_eq!(decode(&m, CTX).unwrap_err().notification.subcode, 1);
    // An NLRI prefix longer than 32 bits.
    let m = with_attr(GOOD, &[33, 10, 200, 0, 11, 0]);
    assert_eq!(decode(&m, CTX).unwrap_err().notification.subcode, 10);
}

#[test]
fn duplicate_and_unknown_optional_attributes_are_tolerated() {
    let dup = [GOOD, &[0x40, 5, 4, 0, 0, 0, 200]].concat();
    let Message::Update(u) = decode(&with_attr(&dup, NLRI), CTX).unwrap() else {
        panic!()
    };
    assert!(!u.treat_as_withdraw);
    assert_eq!(
        u.attributes.unwrap().local_pref,
        Some(100),
        "the first one counts"
    );
    let unknown = [GOOD, &[0xc0, 200, 2, 1, 2]].concat();
    let Message::Update(u) = decode(&with_attr(&unknown, NLRI), CTX).unwrap() else {
        panic!()
    };
    let a = u.attributes.unwrap();
    assert_eq!(
        a.unknown[0].flags,
        0xc0 | PARTIAL,
        "passed on with the Partial bit"
    );
}

#[test]
fn decoding_never_panics_on_truncations_of_valid_messages() {
    let mut a = ibgp_attrs("10.10.0.2");
    a.cluster_list = vec!["1.1.1.1".parse().unwrap()];
    let m = encode(
        &Message::Update(Update {
            announced: vec![nlri("10.200.0.0/24"), nlri("2001:db8::/32")],
            withdrawn: vec![nlri("10.1.0.0/16")],
            attributes: Some(a),
            ..Default::default()
        }),
        CTX,
    );
    for cut in 0..m.len() {
        let mut t = m[..cut].to_vec();
        if t.len() >= 18 {
            t[16..18].copy_from_slice(&(cut as u16).to_be_bytes());
        }
        let _ = decode(&t, CTX);
    }
    for i in HEADER_LEN..m.len() {
        for bit in 0..8 {
            let mut t = m.clone();
            t[i] ^= 1 << bit;
            let _ = decode(&t, CTX);
        }
    }
}

/// RFC 7607: AS 0 in AS_PATH makes the UPDATE malformed (treat-as-withdraw); in AS4_PATH or
/// AGGREGATOR the attribute is discarded. RFC 7606 §7.14 and RFC 8092 §6: EXTENDED_COMMUNITIES
/// whose length is not a multiple of 8, LARGE_COMMUNITY not a multiple of 12: treat-as-withdraw.
/// None of them may be passed on as they came.
#[test]
fn as_zero_and_misaligned_community_attributes_are_not_passed_on() {
    // GOOD's AS_PATH (0x40 2 0, empty) replaced by a sequence 65001 0.
    let as0 = [
        &GOOD[..4],
        &[0x40, 2, 10, 2, 2, 0, 0, 0xfd, 0xe9, 0, 0, 0, 0],
        &GOOD[7..],
    ]
    .concat();
    let u = withdraws(&as0);
    assert!(
        u.errors.iter().any(|e| e.contains("AS 0")),
        "{:?}",
        u.errors
    );
    // EXTENDED_COMMUNITIES (16) of 7 bytes, LARGE_COMMUNITY (32) of 13.
    withdraws(&[GOOD, &[0xc0, 16, 7, 0, 2, 0xfd, 0xe9, 0, 0, 1]].concat());
    withdraws(&[GOOD, &[0xc0, 32, 13], &[1; 13]].concat());
    // Well-formed ones are kept (and passed on).
    for ok in [
        [GOOD, &[0xc0, 16, 8, 0, 2, 0xfd, 0xe9, 0, 0, 0, 1]].concat(),
        [GOOD, &[0xc0, 32, 12], &[1; 12]].concat(),
    ] {
        let Message::Update(u) = decode(&with_attr(&ok, NLRI), CTX).unwrap() else {
            panic!()
        };
        assert!(!u.treat_as_withdraw, "{:?}", u.errors);
        assert_eq!(u.attributes.unwrap().unknown.len(), 1);
    }
    // AS4_PATH (17) with AS 0 and an AGGREGATOR from AS 0: discarded, the route stays.
    for discard in [
        [GOOD, &[0xc0, 17, 6, 2, 1, 0, 0, 0, 0]].concat(),
        [GOOD, &[0xc0, 7, 8, 0, 0, 0, 0, 10, 0, 0, 1]].concat(),
    ] {
        let Message::Update(u) = decode(&with_attr(&discard, NLRI), CTX).unwrap() else {
            panic!()
        };
        assert!(!u.treat_as_withdraw, "{:?}", u.errors);
        assert!(u.attributes.unwrap().unknown.is_empty(), "discarded");
        assert!(!u.errors.is_empty());
    }
}

/// One UPDATE announcing IPv4 NLRI (NEXT_HOP) and IPv6 NLRI (MP_REACH): each family keeps its
/// own next hop. The IPv4 NEXT_HOP used to be overwritten by the MP_REACH one, and the IPv4
/// route was then passed on without a NEXT_HOP.
#[test]
fn an_update_with_both_families_keeps_each_next_hop() {
    let mut a = ibgp_attrs("10.10.0.2");
    a.next_hop = Some("10.10.0.2".parse().unwrap());
    let u = Update {
        announced: vec![nlri("10.200.0.11/32"), nlri("2001:db8:200::/48")],
        attributes: Some(a),
        mp_next_hop: Some("2001:db8:10::2".parse().unwrap()),
        ..Default::default()
    };
    let m = encode(&Message::Update(u.clone()), CTX);
    let Message::Update(back) = decode(&m, CTX).unwrap() else {
        panic!()
    };
    assert_eq!(
        back.attributes.as_ref().unwrap().next_hop,
        Some("10.10.0.2".parse().unwrap()),
        "the IPv4 NEXT_HOP"
    );
    assert_eq!(back.mp_next_hop, Some("2001:db8:10::2".parse().unwrap()));
    assert_eq!(back, u);
    // Each path in the RIB with its own next hop.
    let mut rib = crate::bgp::rib::Rib::new("10.10.0.9".parse().unwrap());
    rib.add_peer(crate::bgp::rib::RibPeer {
        name: "r".into(),
        kind: crate::bgp::rib::PeerKind::NonClient,
        policy: crate::bgp::rib::Policy {
            allow: vec![],
            deny: vec![],
            max_prefix: 10,
            next_hop_self: None,
            next_hop_self_v6: None,
        },
        router_id: None,
    });
    rib.apply(0, &back);
    let nh = |p: &str| {
        rib.multipath(&p.parse().unwrap())
            .first()
            .and_then(|x| x.attributes.next_hop)
    };
    assert_eq!(nh("10.200.0.11/32"), Some("10.10.0.2".parse().unwrap()));
    assert_eq!(
        nh("2001:db8:200::/48"),
        Some("2001:db8:10::2".parse().unwrap())
    );
}
