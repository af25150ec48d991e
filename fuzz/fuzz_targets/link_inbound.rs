//! A gateway link's inbound path (`Link::inbound`) on arbitrary datagrams from the internet,
//! keys fixed: whatever arrives, nothing panics and nothing reaches the tun device (only a
//! datagram that decrypts under the peer's session may), and no reply goes anywhere but back
//! to the sender. The input is a sequence of datagrams, each prefixed by a length byte and a
//! byte choosing the source (the node's endpoint or another address); when that byte has bit
//! 1 set, a real handshake initiation from the node (made once, with the node's fixed key)
//! goes first, so the mutated datagrams also meet a link with a handshake in progress.
#![no_main]
use appliance::datapath::engine::{Link, Outbound, MAX_PACKET};
use appliance::intent::links::{LinkSpec, PeerSpec};
use appliance::model::key::PrivateKey;
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

const NODE: &str = "198.51.100.11:40000";

/// The gateway's link, the instant the fuzzer's clock stands at, and a real initiation.
fn link() -> &'static (Link, Instant, Vec<u8>) {
    static L: OnceLock<(Link, Instant, Vec<u8>)> = OnceLock::new();
    L.get_or_init(|| {
        let now = Instant::now();
        let gw = PrivateKey([7; 32]);
        let node = PrivateKey([9; 32]);
        let node_link = Link::new(
            &LinkSpec {
                dev: "ap-gw1-0".into(),
                index: 0,
                listen_port: None,
                v6_underlay: false,
                clamp_mtu: Some(1420),
                peers: vec![PeerSpec {
                    name: "gw1".into(),
                    public_key: gw.public(),
                    next_key: None,
                    endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                    allowed: vec!["10.10.0.0/16".parse().unwrap()],
                    routes: vec!["10.10.0.0/16".parse().unwrap()],
                }],
            },
            &node,
            now,
        );
        let mut packet = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 200, 0, 11, 10, 10, 0, 2];
        packet.resize(28, 0);
        let mut out = vec![0u8; MAX_PACKET];
        let Outbound::Send(_, n) = node_link.outbound(&packet, &mut out, now) else {
            panic!("the node's first packet starts a handshake")
        };
        let initiation = out[..n].to_vec();
        let spec = LinkSpec {
            dev: "ap-l0".into(),
            index: 0,
            listen_port: Some(51820),
            v6_underlay: false,
            clamp_mtu: Some(1420),
            peers: vec![PeerSpec {
                name: "c1".into(),
                public_key: node.public(),
                // A rotating node: two sessions, the path a key rotation adds.
                next_key: Some(PrivateKey([11; 32]).public()),
                endpoint: None,
                allowed: vec!["10.200.0.11/32".parse().unwrap()],
                routes: vec!["10.200.0.11/32".parse().unwrap()],
            }],
        };
        (Link::new(&spec, &gw, now), now, initiation)
    })
}

fuzz_target!(|data: &[u8]| {
    let (link, now, initiation) = link();
    let mut out = vec![0u8; MAX_PACKET];
    if data.get(1).is_some_and(|b| b & 2 != 0) {
        let r = link.inbound(NODE.parse().unwrap(), initiation, &mut out, *now);
        assert!(r.to_tun.is_none());
    }
    let mut rest = data;
    while rest.len() >= 2 {
        let (len, src) = (rest[0] as usize * 8, rest[1]);
        rest = &rest[2..];
        let d = &rest[..len.min(rest.len())];
        rest = &rest[d.len()..];
        let from: SocketAddr = if src & 1 == 0 {
            NODE.parse().unwrap()
        } else {
            SocketAddr::from(([203, 0, 113, src], 1000 + u16::from(src)))
        };
        let r = link.inbound(from, d, &mut out, *now);
        assert!(r.to_tun.is_none(), "a forged datagram reached the tun device");
        for (to, _) in &r.to_net {
            assert_eq!(*to, from, "a reply to someone who did not ask");
        }
    }
});
