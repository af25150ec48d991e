//! A gateway link's inbound path (`Link::inbound`) on arbitrary datagrams from the internet,
//! keys fixed: whatever arrives, nothing panics and nothing reaches the tun device (only a
//! datagram that decrypts under the peer's session may), and no reply goes anywhere but back
//! to the sender. The input is a sequence of datagrams, each prefixed by a length byte and a
//! byte choosing the source (the node's endpoint or another address).
#![no_main]
use appliance::datapath::engine::{Link, MAX_PACKET};
use appliance::intent::links::{LinkSpec, PeerSpec};
use appliance::model::key::PrivateKey;
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

fn link() -> &'static (Link, Instant) {
    static L: OnceLock<(Link, Instant)> = OnceLock::new();
    L.get_or_init(|| {
        let now = Instant::now();
        let gw = PrivateKey([7; 32]);
        let node = PrivateKey([9; 32]);
        let spec = LinkSpec {
            dev: "ap-l0".into(),
            index: 0,
            listen_port: Some(51820),
            v6_underlay: false,
            clamp_mtu: Some(1420),
            peers: vec![PeerSpec {
                name: "c1".into(),
                public_key: node.public(),
                endpoint: None,
                allowed: vec!["10.200.0.11/32".parse().unwrap()],
                routes: vec!["10.200.0.11/32".parse().unwrap()],
            }],
        };
        (Link::new(&spec, &gw, now), now)
    })
}

fuzz_target!(|data: &[u8]| {
    let (link, now) = link();
    let mut out = vec![0u8; MAX_PACKET];
    let mut rest = data;
    while rest.len() >= 2 {
        let (len, src) = (rest[0] as usize * 8, rest[1]);
        rest = &rest[2..];
        let d = &rest[..len.min(rest.len())];
        rest = &rest[d.len()..];
        let from: SocketAddr = if src & 1 == 0 {
            "198.51.100.11:40000".parse().unwrap()
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
