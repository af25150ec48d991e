//! The iBGP sessions a host runs, derived from the site file. Pure.
//!
//! - gateway: route reflector (router ID = cluster ID = its IPv4 site address); the site
//!   routers are non-clients with next-hop-self that may not announce the cloud block; the
//!   other gateways are non-clients (the lower router ID dials); every node is a client,
//!   accepted only from its cloud address and only inside its assignment.
//! - node: one session to every gateway's site address, dialled from the node address over
//!   the tunnels, announcing the node's prefixes; none when `bgp-speaker "external"`.
//! - relay: none.
//!
//! Max-prefix per role: a node running our speaker announces its assignment and nothing more
//! (limit: its prefix count); a node with an external speaker (a CNI announcing pod routes
//! inside its assignment) gets the `bgp` block's `max-prefix`; a gateway passes on the nodes'
//! routes and nothing else (accepted only inside the nodes' assignments, limit: the sum of the
//! nodes' limits); a site router has the configured
//! limit (`neighbor { max-prefix }`, default the `bgp` block's); a node accepts from each
//! gateway what the site routers may send in all.

use crate::bgp::rib::{PeerKind, Policy, RibPeer};
use crate::bgp::router::Learn;
use crate::bgp::setup::{PeerConfig, SpeakerConfig, PORT};
use crate::bgp::wire::Attributes;
use crate::intent::import;
use crate::model::config::{BgpSpeaker, Config, Gateway};

/// Restart time in our graceful-restart capability (RFC 4724), seconds. The capability lists
/// no address family (see `fsm::Session::open_message`), so no peer keeps our routes for it.
pub const RESTART_TIME: u16 = 120;

/// The iBGP sessions of this host, from the config: gateways reflect for the nodes and peer
/// with the site routers (next-hop-self, never accepting the cloud block) and with each other;
/// nodes peer with every gateway over the tunnels and announce their own prefixes.
pub fn sessions(cfg: &Config, host: &str) -> Result<Option<SpeakerConfig>, String> {
    let v4 = |a: std::net::IpAddr, what: &str| match a {
        std::net::IpAddr::V4(v) => Ok(v),
        _ => Err(format!("{what} {a} must be IPv4 to serve as BGP router ID")),
    };
    let policy = |allow: Vec<ipnet::IpNet>,
                  deny: Vec<ipnet::IpNet>,
                  max_prefix: usize,
                  nhs: Option<&Gateway>| Policy {
        allow,
        deny,
        max_prefix: max_prefix.clamp(1, u32::MAX as usize) as u32,
        next_hop_self: nhs.map(|g| g.site_address),
        next_hop_self_v6: nhs.and_then(|g| g.site_address_v6),
    };
    let assignments: Vec<ipnet::IpNet> = cfg
        .nodes
        .iter()
        .flat_map(|n| n.prefixes.iter().copied())
        .collect();
    let node_limit = |n: &crate::model::config::Node| match n.bgp_speaker {
        BgpSpeaker::Appliance => n.prefixes.len(),
        BgpSpeaker::External => cfg.bgp.max_prefix as usize,
    };
    let from_nodes: usize = cfg.nodes.iter().map(node_limit).sum();
    let peer = |name: &str, kind, policy, address, active| PeerConfig {
        peer: RibPeer {
            name: name.to_string(),
            kind,
            policy,
            router_id: None,
        },
        address,
        active,
    };
    if let Some(g) = cfg.gateways.iter().find(|g| g.name == host) {
        let id = v4(g.site_address, "gateway site address")?;
        let mut peers = Vec::new();
        for n in &cfg.bgp.neighbors {
            peers.push(peer(
                &n.name,
                PeerKind::NonClient,
                policy(
                    vec![],
                    cfg.site.cloud_blocks.clone(),
                    n.max_prefix as usize,
                    Some(g),
                ),
                n.address,
                true,
            ));
        }
        for o in cfg.gateways.iter().filter(|o| o.name != g.name) {
            let active = u32::from(id) < u32::from(v4(o.site_address, "gateway site address")?);
            // What another gateway reflects to us is its clients' routes: the nodes'
            // prefixes, every one of which it may carry.
            peers.push(peer(
                &o.name,
                PeerKind::NonClient,
                policy(assignments.clone(), vec![], from_nodes, None),
                o.site_address,
                active,
            ));
        }
        for n in &cfg.nodes {
            peers.push(peer(
                &n.name,
                PeerKind::Client,
                policy(n.prefixes.clone(), vec![], node_limit(n), None),
                n.address,
                false,
            ));
        }
        return Ok(Some(SpeakerConfig {
            local_as: cfg.site.asn,
            router_id: id,
            local_address: g.site_address,
            listen: Some(std::net::SocketAddr::new(
                std::net::Ipv4Addr::UNSPECIFIED.into(),
                PORT,
            )),
            hold_time: cfg.bgp.hold_time,
            restart_time: RESTART_TIME,
            peers,
            originate: Vec::new(),
            client_to_client: false,
            learn: Learn::FromClients,
            drained: g.drain,
        }));
    }
    if let Some(n) = cfg.nodes.iter().find(|n| n.name == host) {
        if n.bgp_speaker == BgpSpeaker::External {
            return Ok(None);
        }
        let id = v4(n.address, "node address")?;
        // A gateway reflects to a node the site routers' routes, each within its limit.
        let from_site: usize = cfg
            .bgp
            .neighbors
            .iter()
            .map(|r| r.max_prefix as usize)
            .sum();
        let peers = cfg
            .gateways
            .iter()
            .map(|g| {
                peer(
                    &g.name,
                    PeerKind::NonClient,
                    // The static half of the node's import policy (see `import`).
                    policy(vec![], import::static_deny(cfg, n), from_site, None),
                    g.site_address,
                    true,
                )
            })
            .collect();
        let own = Attributes {
            next_hop: Some(n.address),
            local_pref: Some(100),
            ..Default::default()
        };
        return Ok(Some(SpeakerConfig {
            local_as: cfg.site.asn,
            router_id: id,
            local_address: n.address,
            listen: None,
            hold_time: cfg.bgp.hold_time,
            restart_time: RESTART_TIME,
            peers,
            originate: n.prefixes.iter().map(|p| (*p, own.clone())).collect(),
            client_to_client: false,
            learn: Learn::FromAll,
            drained: false,
        }));
    }
    Ok(None)
}

/// The BFD sessions of a gateway: with every `bgp { neighbor }` that has `bfd #true`, from its
/// IPv4 site address, at the `bgp` block's interval and multiplier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BfdSessions {
    pub local: std::net::Ipv4Addr,
    pub peers: Vec<(String, std::net::Ipv4Addr)>,
    pub timers: crate::bfd::session::Config,
}

pub fn bfd_sessions(cfg: &Config, host: &str) -> Option<BfdSessions> {
    let g = cfg.gateways.iter().find(|g| g.name == host)?;
    let std::net::IpAddr::V4(local) = g.site_address else {
        return None;
    };
    let v4 = |name: &str, a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(a) => Some((name.to_string(), a)),
        _ => None,
    };
    // The site routers that ask for it, and the other gateways (their BGP session carries
    // every node's routes between the reflectors) unless `gateway-bfd #false`.
    let peers: Vec<_> = cfg
        .bgp
        .neighbors
        .iter()
        .filter(|n| n.bfd)
        .filter_map(|n| v4(&n.name, n.address))
        .chain(
            cfg.gateways
                .iter()
                .filter(|o| cfg.bgp.gateway_bfd && o.name != g.name)
                .filter_map(|o| v4(&o.name, o.site_address)),
        )
        .collect();
    let every = std::time::Duration::from_millis(cfg.bgp.bfd_interval_ms as u64);
    (!peers.is_empty()).then_some(BfdSessions {
        local,
        peers,
        timers: crate::bfd::session::Config {
            desired_min_tx: every,
            required_min_rx: every,
            detect_mult: cfg.bgp.bfd_multiplier,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::parse;
    use std::net::IpAddr;

    fn site() -> Config {
        let mut text = include_str!("../../tests/golden/two-gateways/config.kdl").to_string();
        text.push_str(
            "node \"c3\" {\n address \"10.200.2.1\"\n prefix \"10.200.2.0/28\"\n public-key \"Yv/7p9TBowqS327ezLJ0y0qDFu1eWh6tlOG0wxZybZE=\"\n}\n\
             node \"ext\" {\n address \"10.200.0.14\"\n public-key \"zEVY4Cd9vbK/piYjBJ5iqNP5dyAJR+60TRdtPgsKTSg=\"\n bgp-speaker \"external\"\n}\n\
             relay \"r1\" {\n public-address \"203.0.113.5\"\n private-address \"172.31.0.1\"\n}\n\
             bgp {\n hold-time 30\n max-prefix 50\n neighbor \"site-router\" {\n  address \"10.10.0.1\"\n }\n}\n",
        );
        parse("site.kdl", &text).unwrap()
    }

    fn by_name<'a>(s: &'a SpeakerConfig, name: &str) -> &'a PeerConfig {
        s.peers.iter().find(|p| p.peer.name == name).unwrap()
    }

    fn net(s: &str) -> ipnet::IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn a_gateway_reflects_for_every_node_and_peers_with_the_site_router_and_the_other_gateway() {
        let cfg = site();
        let s = sessions(&cfg, "gw1").unwrap().unwrap();
        assert_eq!(s.router_id.to_string(), "10.10.0.2");
        assert_eq!(s.local_address, "10.10.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(s.listen.unwrap().port(), PORT);
        assert_eq!((s.hold_time, s.restart_time), (30, RESTART_TIME));
        assert_eq!(s.learn, Learn::FromClients);
        assert!(!s.client_to_client && s.originate.is_empty());
        let names: Vec<&str> = s.peers.iter().map(|p| p.peer.name.as_str()).collect();
        assert_eq!(names, ["site-router", "gw2", "c1", "c2", "c3", "ext"]);

        let site = by_name(&s, "site-router");
        assert_eq!(site.peer.kind, PeerKind::NonClient);
        assert!(site.active, "gateways dial the site router");
        assert_eq!(site.peer.policy.deny, vec![net("10.200.0.0/16")]);
        assert_eq!(
            site.peer.policy.next_hop_self,
            Some("10.10.0.2".parse().unwrap())
        );
        assert_eq!(site.peer.policy.max_prefix, 50);

        let gw2 = by_name(&s, "gw2");
        assert_eq!(gw2.address, "10.10.0.3".parse::<IpAddr>().unwrap());
        assert!(gw2.active, "the lower router ID dials");
        assert_eq!(gw2.peer.policy.next_hop_self, None);
        let back = sessions(&cfg, "gw2").unwrap().unwrap();
        assert!(!by_name(&back, "gw1").active, "and the higher one waits");

        // The other gateway carries every node's routes: c1, c2, c3 one prefix each, ext (an
        // external speaker) up to the site-wide 50.
        assert_eq!(gw2.peer.policy.max_prefix, 53);
        assert_eq!(gw2.peer.policy.allow.len(), 4);
        assert_eq!(by_name(&s, "ext").peer.policy.max_prefix, 50);

        let c3 = by_name(&s, "c3");
        assert_eq!(c3.peer.policy.max_prefix, 1, "c3 announces its one prefix");
        assert_eq!(c3.peer.kind, PeerKind::Client);
        assert!(!c3.active, "nodes dial in");
        assert_eq!(c3.address, "10.200.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            c3.peer.policy.allow,
            vec![net("10.200.2.0/28")],
            "a node may announce its assignment only"
        );
    }

    #[test]
    fn a_node_dials_every_gateway_over_the_tunnels_and_announces_its_prefixes() {
        let cfg = site();
        let s = sessions(&cfg, "c3").unwrap().unwrap();
        assert_eq!(s.router_id.to_string(), "10.200.2.1");
        assert_eq!(s.local_address, "10.200.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(s.listen, None);
        assert_eq!(s.learn, Learn::FromAll);
        let gws: Vec<(&str, String, bool)> = s
            .peers
            .iter()
            .map(|p| (p.peer.name.as_str(), p.address.to_string(), p.active))
            .collect();
        assert_eq!(
            gws,
            [
                ("gw1", "10.10.0.2".to_string(), true),
                ("gw2", "10.10.0.3".to_string(), true)
            ]
        );
        let deny = &s.peers[0].peer.policy.deny;
        for must in ["10.200.2.0/28", "192.0.2.1/32", "192.0.2.2/32"] {
            assert!(deny.contains(&net(must)), "{must} not denied: {deny:?}");
        }
        let announced: Vec<String> = s.originate.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(announced, ["10.200.2.0/28"]);
        assert!(s
            .originate
            .iter()
            .all(|(_, a)| a.next_hop == Some("10.200.2.1".parse().unwrap())));
    }

    #[test]
    fn an_external_speaker_node_and_a_relay_run_no_speaker() {
        let cfg = site();
        assert_eq!(sessions(&cfg, "ext").unwrap(), None);
        assert_eq!(sessions(&cfg, "r1").unwrap(), None);
        assert_eq!(sessions(&cfg, "nobody").unwrap(), None);
    }

    #[test]
    fn limits_follow_the_role_so_a_site_of_150_nodes_keeps_its_gateway_session() {
        // Before: one `max-prefix` (default 100) for every session, so the gateway-gateway
        // session, which carries every node's prefix, stopped at the 101st node, in a loop.
        let mut text = String::from(
            "site \"lab\" {\n asn 65010\n cloud-block \"10.200.0.0/16\"\n site-prefix \"10.10.0.0/16\"\n}\n\
             gateway \"gw1\" {\n endpoint \"192.0.2.1\"\n site-address \"10.10.0.2\"\n public-key \"W9kCAm5zEojpFYsCHUPGlGxhpRVd9mM7hPik2A5dEQo=\"\n}\n\
             gateway \"gw2\" {\n endpoint \"192.0.2.3\"\n site-address \"10.10.0.3\"\n public-key \"aUt+EqDNSYIKfcUP/H5qCQpfON1jd73Zz9kMecso9zc=\"\n}\n\
             bgp {\n neighbor \"r1\" {\n  address \"10.10.0.1\"\n }\n neighbor \"r2\" {\n  address \"10.10.0.4\"\n  max-prefix 2000\n }\n}\n",
        );
        for i in 0..150u32 {
            let key = crate::model::key::PrivateKey::generate().public();
            text.push_str(&format!(
                "node \"c{i}\" {{\n address \"10.200.{}.{}\"\n public-key \"{key}\"\n}}\n",
                i / 200,
                i % 200 + 10
            ));
        }
        let cfg = parse("site.kdl", &text).unwrap();
        let gw1 = sessions(&cfg, "gw1").unwrap().unwrap();
        let gw2 = by_name(&gw1, "gw2");
        assert_eq!(gw2.peer.policy.max_prefix, 150);
        assert_eq!(
            gw2.peer.policy.allow.len(),
            150,
            "and only the nodes' prefixes"
        );
        assert_eq!(by_name(&gw1, "c7").peer.policy.max_prefix, 1);
        assert_eq!(
            by_name(&gw1, "r1").peer.policy.max_prefix,
            100,
            "the default"
        );
        assert_eq!(by_name(&gw1, "r2").peer.policy.max_prefix, 2000, "its own");
        // A node takes from each gateway what the two site routers may send.
        let c7 = sessions(&cfg, "c7").unwrap().unwrap();
        assert_eq!(by_name(&c7, "gw1").peer.policy.max_prefix, 2100);
    }

    #[test]
    fn a_gateway_runs_bfd_with_the_neighbours_that_ask_for_it_and_nobody_else_does() {
        let mut text = include_str!("../../tests/golden/two-gateways/config.kdl").to_string();
        text.push_str(
            "bgp {\n bfd-interval-ms 50\n bfd-multiplier 4\n neighbor \"r1\" {\n  address \"10.10.0.1\"\n  bfd #true\n }\n neighbor \"r2\" {\n  address \"10.10.0.4\"\n }\n}\n",
        );
        let cfg = parse("site.kdl", &text).unwrap();
        let b = bfd_sessions(&cfg, "gw1").unwrap();
        assert_eq!(b.local.to_string(), "10.10.0.2");
        assert_eq!(
            b.peers,
            vec![
                ("r1".to_string(), "10.10.0.1".parse().unwrap()),
                ("gw2".to_string(), "10.10.0.3".parse().unwrap())
            ],
            "the router that asks for it and the other gateway"
        );
        assert_eq!(
            b.timers.desired_min_tx,
            std::time::Duration::from_millis(50)
        );
        assert_eq!(b.timers.detect_mult, 4);
        assert_eq!(bfd_sessions(&cfg, "c1"), None, "nodes run no BFD");
        let plain = parse(
            "site.kdl",
            include_str!("../../tests/golden/two-gateways/config.kdl"),
        );
        let plain = plain.unwrap();
        assert_eq!(
            bfd_sessions(&plain, "gw2").unwrap().peers,
            vec![("gw1".to_string(), "10.10.0.2".parse().unwrap())],
            "between the gateways by default, with no router asking"
        );
        let off = parse(
            "site.kdl",
            &format!(
                "{}bgp {{\n gateway-bfd #false\n}}\n",
                include_str!("../../tests/golden/two-gateways/config.kdl")
            ),
        )
        .unwrap();
        assert_eq!(bfd_sessions(&off, "gw1"), None, "gateway-bfd #false");
    }
}
