use super::*;
use crate::model::config::parse;
use proptest::prelude::*;

fn cfg() -> Config {
    parse(
        "t.kdl",
        include_str!("../../tests/golden/two-gateways/config.kdl"),
    )
    .unwrap()
}

fn with(cfg: &Config, host: &str, live: Live<'_>, learned: &Learned) -> HostIntent {
    derive(
        cfg,
        host,
        Inputs {
            live,
            draining: &std::collections::BTreeSet::new(),
            learned,
            underlay: &[],
        },
    )
    .unwrap()
}

fn learned(entries: &[(&str, &[&str])]) -> Learned {
    entries
        .iter()
        .map(|(p, by)| {
            (
                p.parse().unwrap(),
                by.iter().map(|s| s.to_string()).collect(),
            )
        })
        .collect()
}

fn tunnel_route<'a>(s: &'a HostState, dst: &str) -> Option<&'a state::Route> {
    s.routes
        .values()
        .find(|r| r.dst.to_string() == dst && !r.blackhole)
}

fn blackholed(s: &HostState, dst: &str) -> bool {
    s.routes
        .values()
        .any(|r| r.dst.to_string() == dst && r.blackhole)
}

/// The prefixes the datapath sends to the peer of device `dev`.
fn sent_on(i: &HostIntent, dev: &str) -> Vec<String> {
    i.links
        .iter()
        .find(|l| l.dev == dev)
        .unwrap()
        .peers
        .iter()
        .flat_map(|p| p.routes.iter().map(|r| r.to_string()))
        .collect()
}

#[test]
fn gateway_routes_every_node_prefix_over_all_links() {
    let i = one_shot(&cfg(), "gw1", &[]).unwrap();
    assert_eq!(i.role, Role::Gateway);
    let r = tunnel_route(&i.kernel, "10.200.0.11/32").unwrap();
    assert_eq!(r.via, vec!["ap-l0", "ap-l1", "ap-l2", "ap-l3"]);
    assert_eq!(i.kernel.sysctls["net.ipv4.ip_forward"], "1");
}

#[test]
fn node_reaches_each_gateway_address_only_through_that_gateway() {
    let i = one_shot(&cfg(), "c1", &[]).unwrap();
    let r = tunnel_route(&i.kernel, "10.10.0.2/32").unwrap();
    assert!(
        r.via.iter().all(|d| d.starts_with("ap-gw1-")),
        "{:?}",
        r.via
    );
    assert_eq!(
        tunnel_route(&i.kernel, "10.10.0.0/16").unwrap().via.len(),
        8
    );
    assert!(blackholed(&i.kernel, "10.10.0.0/16"));
    assert!(sent_on(&i, "ap-gw1-0").contains(&"10.10.0.2/32".to_string()));
    assert!(!sent_on(&i, "ap-gw2-0").contains(&"10.10.0.2/32".to_string()));
}

#[test]
fn a_dead_link_leaves_the_routes_and_all_dead_leaves_only_the_blackhole() {
    let cfg = cfg();
    let none = Learned::new();
    let i = with(
        &cfg,
        "gw1",
        &|peer, link| !(peer == "c1" && link == 2),
        &none,
    );
    let r = tunnel_route(&i.kernel, "10.200.0.11/32").unwrap();
    assert_eq!(r.via, vec!["ap-l0", "ap-l1", "ap-l3"]);
    let i = with(&cfg, "c1", &|_, _| false, &none);
    assert!(
        i.kernel.routes.values().all(|r| r.blackhole),
        "{:?}",
        i.kernel.routes
    );
    assert_eq!(i.kernel.devices.len(), 9, "devices stay when links die");
    assert!(
        sent_on(&i, "ap-gw1-0").contains(&"10.10.0.0/16".to_string()),
        "a dead link keeps its table, so it carries traffic the moment it is back"
    );
}

#[test]
fn a_learned_prefix_is_routed_and_sent_over_the_live_links_of_the_gateways_that_advertise_it() {
    let cfg = cfg();
    let l = learned(&[("10.12.0.0/16", &["gw2"]), ("10.10.0.0/16", &["gw1"])]);
    let i = with(&cfg, "c1", &|g, i| !(g == "gw2" && i == 0), &l);
    let r = tunnel_route(&i.kernel, "10.12.0.0/16").unwrap();
    assert_eq!(r.via, vec!["ap-gw2-1", "ap-gw2-2", "ap-gw2-3"]);
    assert_eq!(r.src, Some("10.200.0.11".parse().unwrap()));
    assert!(blackholed(&i.kernel, "10.12.0.0/16"));
    // The datapath agrees: gw2's links send it, gw1's do not.
    assert!(sent_on(&i, "ap-gw2-1").contains(&"10.12.0.0/16".to_string()));
    assert!(!sent_on(&i, "ap-gw1-1").contains(&"10.12.0.0/16".to_string()));
    // Replies from it are accepted from either gateway (the site may return a flow through
    // the other one).
    for l in &i.links {
        assert!(l.peers[0]
            .allowed
            .contains(&"10.12.0.0/16".parse().unwrap()));
    }
    let site = tunnel_route(&i.kernel, "10.10.0.0/16").unwrap();
    assert_eq!(
        site.via.len(),
        7,
        "a prefix the config routes keeps its static route"
    );
}

#[test]
fn a_withdrawn_prefix_keeps_only_its_blackhole_and_leaves_the_datapath() {
    let cfg = cfg();
    let i = with(&cfg, "c1", &|_, _| true, &learned(&[("10.12.0.0/16", &[])]));
    assert!(tunnel_route(&i.kernel, "10.12.0.0/16").is_none());
    assert!(blackholed(&i.kernel, "10.12.0.0/16"));
    for l in &i.links {
        assert!(!l.peers[0].routes.contains(&"10.12.0.0/16".parse().unwrap()));
    }
}

#[test]
fn a_refused_learned_prefix_is_neither_routed_nor_sent_and_says_why() {
    let cfg = cfg();
    let l = learned(&[
        ("169.254.0.0/16", &["gw1"]),
        ("172.16.0.0/25", &["gw1"]),
        ("0.0.0.0/0", &["gw1"]),
    ]);
    let underlay: Vec<IpNet> = vec!["172.16.0.0/24".parse().unwrap()];
    let i = derive(
        &cfg,
        "c1",
        Inputs {
            draining: &std::collections::BTreeSet::new(),
            live: &|_, _| true,
            learned: &l,
            underlay: &underlay,
        },
    )
    .unwrap();
    assert_eq!(i.refused.len(), 3, "{:?}", i.refused);
    for p in l.keys() {
        assert!(!i.kernel.routes.values().any(|r| r.dst == *p), "{p} routed");
        assert!(!sent_on(&i, "ap-gw1-0").contains(&p.to_string()));
    }
    assert!(i.refused[&"172.16.0.0/25".parse().unwrap()].contains("underlay"));
}

#[test]
fn a_gateway_routes_a_node_prefix_only_while_that_node_announces_it() {
    let text = include_str!("../../tests/golden/two-gateways/config.kdl").replace(
        "node \"c1\" {",
        "node \"c1\" {\n    prefix \"10.200.0.11/32\"\n    prefix \"10.200.1.0/28\"\n    prefix \"10.200.1.16/28\"",
    );
    let cfg = parse("t.kdl", &text).unwrap();
    let routes = |l: &Learned| {
        let i = with(&cfg, "gw1", &|_, _| true, l);
        let mut v: Vec<String> = i
            .kernel
            .routes
            .values()
            .filter(|r| !r.blackhole && r.dst.to_string().starts_with("10.200."))
            .map(|r| r.dst.to_string())
            .collect();
        v.sort();
        let mut sent = sent_on(&i, "ap-l0");
        sent.sort();
        assert_eq!(v, sent, "kernel and datapath agree");
        v
    };
    assert_eq!(
        routes(&Learned::new()),
        ["10.200.0.11/32", "10.200.0.12/32"],
        "before iBGP: only the node addresses the sessions run from"
    );
    let l = learned(&[("10.200.1.16/28", &["c1"]), ("10.200.1.0/28", &["c2"])]);
    assert_eq!(
        routes(&l),
        ["10.200.0.11/32", "10.200.0.12/32", "10.200.1.16/28"],
        "c1's announced prefix is routed; c1's prefix announced by c2 is not"
    );
    assert_eq!(
        routes(&config_view(&cfg, "gw1")),
        [
            "10.200.0.11/32",
            "10.200.0.12/32",
            "10.200.1.0/28",
            "10.200.1.16/28"
        ],
        "a one-shot reconcile plans every assignment"
    );
    // A more specific part of an assignment, announced by its node, is routed as the whole
    // would be (the RIB reflects it to the site router: unrouted, it was a blackhole); a part
    // of someone else's assignment is not.
    let l = learned(&[
        ("10.200.1.0/29", &["c1"]),
        ("10.200.1.24/30", &["c1"]),
        ("10.200.1.64/29", &["c1"]),
        ("10.200.1.8/29", &["c2"]),
    ]);
    assert_eq!(
        routes(&l),
        [
            "10.200.0.11/32",
            "10.200.0.12/32",
            "10.200.1.0/29",
            "10.200.1.24/30"
        ],
        "parts of c1's assignment are routed to c1"
    );
}

#[test]
fn a_gateway_listens_on_one_port_per_link_and_knows_every_node() {
    let i = one_shot(&cfg(), "gw1", &[]).unwrap();
    assert_eq!(i.links.len(), 4);
    assert_eq!(i.links[3].dev, "ap-l3");
    assert_eq!(i.links[3].listen_port, Some(51823));
    assert_eq!(i.links[0].peers.len(), 2);
    assert!(i.links[0].peers.iter().all(|p| p.endpoint.is_none()));
}

#[test]
fn a_node_dials_each_gateway_on_each_link_port() {
    let i = one_shot(&cfg(), "c1", &[]).unwrap();
    assert_eq!(i.links.len(), 8);
    let l = i.links.iter().find(|l| l.dev == "ap-gw2-1").unwrap();
    assert_eq!(
        l.peers[0].endpoint,
        Some("192.0.2.2:51821".parse().unwrap())
    );
    assert!(l.peers[0]
        .allowed
        .contains(&"10.10.0.0/16".parse().unwrap()));
}

#[test]
fn unknown_host_suggests_the_closest_name() {
    let e = one_shot(&cfg(), "gw3", &[]).unwrap_err();
    assert!(e.to_string().contains("did you mean"), "{e}");
}

// ---- property: kernel routes and datapath tables agree ----

/// A site with `gateways` gateways, `links` links, and nodes each with extra prefixes.
fn site_text(gateways: usize, links: u32, extras: &[u8]) -> String {
    let key = |i: usize| crate::model::key::encode_key(&[i as u8 + 1; 32]);
    let mut s = format!(
        "site \"p\" {{\n asn 65010\n cloud-block \"10.200.0.0/16\"\n cloud-block \"2001:db8:200::/48\"\n \
         site-prefix \"10.10.0.0/16\"\n links {links}\n}}\n"
    );
    for g in 0..gateways {
        s.push_str(&format!(
            "gateway \"gw{g}\" {{\n endpoint \"192.0.2.{}\"\n site-address \"10.10.0.{}\"\n public-key \"{}\"\n}}\n",
            g + 1,
            g + 2,
            key(g)
        ));
    }
    for (n, extra) in extras.iter().enumerate() {
        s.push_str(&format!(
            "node \"c{n}\" {{\n address \"10.200.0.{}\"\n prefix \"10.200.0.{}/32\"\n",
            n + 10,
            n + 10
        ));
        for e in 0..*extra {
            s.push_str(&format!(" prefix \"10.200.{}.{}/28\"\n", n + 1, e * 16));
        }
        s.push_str(&format!(" public-key \"{}\"\n}}\n", key(100 + n)));
    }
    s
}

/// Prefixes a learned map may hold: some the site announces, some nodes' assignments, some
/// the import policy refuses, some the config already routes.
const POOL: &[&str] = &[
    "10.12.0.0/16",
    "10.13.1.0/24",
    "2001:db8:12::/48",
    "10.200.1.0/28",
    "10.200.1.16/28",
    "10.200.2.0/28",
    "10.10.0.0/16",
    "169.254.0.0/16",
    "0.0.0.0/0",
    "10.200.0.10/32",
];

fn check_agreement(i: &HostIntent, live: Live<'_>) -> Result<(), TestCaseError> {
    let spec = |dev: &str| i.links.iter().find(|l| l.dev == dev);
    // Every kernel route into a tunnel device is sent to a peer on that device.
    for r in i.kernel.routes.values().filter(|r| !r.blackhole) {
        for dev in &r.via {
            let l = spec(dev);
            prop_assert!(
                l.is_some(),
                "{} routed via {dev}, which has no datapath",
                r.dst
            );
            let l = l.unwrap();
            prop_assert!(
                l.peers
                    .iter()
                    .any(|p| p.routes.contains(&r.dst) && live(&p.name, l.index)),
                "{}: kernel routes {} via {dev}, no live peer there is sent it",
                i.host,
                r.dst
            );
        }
    }
    // Every datapath entry on a live link has a kernel route over that device.
    for l in &i.links {
        for p in &l.peers {
            if !live(&p.name, l.index) {
                continue;
            }
            for prefix in &p.routes {
                let r = i
                    .kernel
                    .routes
                    .values()
                    .find(|r| r.dst == *prefix && !r.blackhole);
                prop_assert!(
                    r.is_some_and(|r| r.via.contains(&l.dev)),
                    "{}: datapath sends {prefix} to {} on {}, the kernel does not route it there",
                    i.host,
                    p.name,
                    l.dev
                );
            }
        }
    }
    // Nothing refused reaches either.
    for p in i.refused.keys() {
        prop_assert!(!i.kernel.routes.values().any(|r| r.dst == *p));
        prop_assert!(!i
            .links
            .iter()
            .any(|l| l.peers.iter().any(|x| x.routes.contains(p))));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn kernel_routes_and_datapath_tables_agree_for_every_host(
        gateways in 1usize..4,
        links in 1u32..5,
        extras in proptest::collection::vec(0u8..3, 1..4),
        learned_bits in proptest::collection::vec((0usize..POOL.len(), 0u8..16), 0..8),
        live_seed in any::<u64>(),
    ) {
        let cfg = parse("p.kdl", &site_text(gateways, links, &extras)).unwrap();
        let live = |peer: &str, link: u32| {
            let h = peer.bytes().fold(live_seed ^ (u64::from(link) * 0x9e37), |h, b| {
                h.rotate_left(7) ^ u64::from(b).wrapping_mul(0x100000001b3)
            });
            h % 3 != 0
        };
        for host in cfg.host_names() {
            // On a gateway the advertisers are nodes, on a node gateways.
            let peers: Vec<String> = if cfg.role_of(host) == Some(Role::Gateway) {
                cfg.nodes.iter().map(|n| n.name.clone()).collect()
            } else {
                cfg.gateways.iter().map(|g| g.name.clone()).collect()
            };
            let mut l = Learned::new();
            for (p, mask) in &learned_bits {
                let by = peers
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| mask & (1 << k) != 0)
                    .map(|(_, n)| n.clone())
                    .collect();
                l.insert(POOL[*p].parse().unwrap(), by);
            }
            let i = derive(&cfg, host, Inputs { live: &live, draining: &BTreeSet::new(), learned: &l, underlay: &[] }).unwrap();
            check_agreement(&i, &live)?;
        }
    }
}

fn relay_site() -> Config {
    let mut text = include_str!("../../tests/golden/two-gateways/config.kdl").to_string();
    text.push_str(
        "relay \"r1\" {\n public-address \"203.0.113.5\"\n private-address \"172.31.0.1\"\n}\n\
         gateway \"gw6\" {\n endpoint \"2001:db8::6\"\n site-address \"10.10.0.6\"\n public-key \"Yv/7p9TBowqS327ezLJ0y0qDFu1eWh6tlOG0wxZybZE=\"\n}\n",
    );
    parse("relay.kdl", &text).unwrap()
}

#[test]
fn a_relay_translates_its_private_networks_udp_to_each_ipv4_gateway_endpoint_only() {
    let cfg = relay_site();
    let private: IpNet = "172.31.0.0/24".parse().unwrap();
    let other: IpNet = "198.51.100.0/24".parse().unwrap();
    let i = derive(
        &cfg,
        "r1",
        Inputs {
            draining: &std::collections::BTreeSet::new(),
            live: &|_, _| true,
            learned: &Learned::new(),
            underlay: &[other, private],
        },
    )
    .unwrap();
    let rules: Vec<String> = i
        .kernel
        .nat
        .unwrap()
        .rules
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        rules,
        [
            "ip saddr 172.31.0.0/24 ip daddr 192.0.2.1 udp dport 51820-51823 masquerade",
            "ip saddr 172.31.0.0/24 ip daddr 192.0.2.2 udp dport 51820-51823 masquerade",
        ],
        "one rule per IPv4 endpoint, the link ports only; no NAT66 for the IPv6 gateway"
    );
    assert_eq!(
        i.kernel
            .sysctls
            .get("net.ipv4.ip_forward")
            .map(String::as_str),
        Some("1")
    );
    // Not observed yet (a plan on another machine): any source.
    let blind = one_shot(&cfg, "r1", &[]).unwrap();
    assert!(blind
        .kernel
        .nat
        .unwrap()
        .rules
        .iter()
        .all(|r| r.from.is_none()));
    // Gateways and nodes own no NAT.
    assert!(one_shot(&cfg, "gw1", &[]).unwrap().kernel.nat.is_none());
    assert!(one_shot(&cfg, "c1", &[]).unwrap().kernel.nat.is_none());
}

#[test]
fn a_nat_table_is_planned_as_one_item_and_reverted_as_one() {
    let cfg = relay_site();
    let want = one_shot(&cfg, "r1", &[]).unwrap().kernel;
    let have = HostState::default();
    let p = plan::diff("r1", Role::Relay, &want, &have).unwrap();
    assert_eq!(p.simulate(&have).nat, want.nat);
    let nat = p
        .changes
        .iter()
        .position(|c| matches!(c.after, Some(plan::Item::Nat(_))))
        .unwrap();
    assert!(p.changes[nat]
        .line()
        .starts_with("+ nat table ip appliance (ip daddr 192.0.2.1"));
    let undo = p.revert(p.changes.len());
    assert!(undo
        .iter()
        .any(|c| c.op == plan::Op::Remove && matches!(c.before, Some(plan::Item::Nat(_)))));
    // A changed table is one replace; a foreign table of our name is a conflict.
    let mut drifted = want.clone();
    drifted.nat.as_mut().unwrap().rules.pop();
    let p = plan::diff("r1", Role::Relay, &want, &drifted).unwrap();
    assert_eq!(p.changes.len(), 1);
    assert!(
        p.changes[0]
            .line()
            .starts_with("~ nat table ip appliance: ("),
        "{}",
        p.changes[0].line()
    );
    let foreign = HostState {
        foreign_nat: true,
        ..Default::default()
    };
    assert_eq!(
        plan::diff("r1", Role::Relay, &want, &foreign).unwrap_err(),
        plan::Conflict::ForeignNat
    );
}

/// A node routes around a drained gateway while another one has a live link, keeps the
/// drained gateway's own address on it (its BGP session), and falls back to it when it is
/// the only gateway left: a drained gateway beats a blackhole.
#[test]
fn a_node_routes_around_a_drained_gateway_unless_it_is_the_only_one_left() {
    let cfg = cfg();
    let none = Learned::new();
    let drained = BTreeSet::from(["gw1".to_string()]);
    let derive_with = |live: Live<'_>| {
        derive(
            &cfg,
            "c1",
            Inputs {
                live,
                draining: &drained,
                learned: &none,
                underlay: &[],
            },
        )
        .unwrap()
    };
    let i = derive_with(&|_, _| true);
    let site = tunnel_route(&i.kernel, "10.10.0.0/16").unwrap();
    assert!(
        site.via.iter().all(|d| d.starts_with("ap-gw2-")),
        "{:?}",
        site.via
    );
    assert_eq!(site.via.len(), 4);
    let own = tunnel_route(&i.kernel, "10.10.0.2/32").unwrap();
    assert!(
        own.via.iter().all(|d| d.starts_with("ap-gw1-")),
        "{:?}",
        own.via
    );
    let i = derive_with(&|peer, _| peer == "gw1");
    let site = tunnel_route(&i.kernel, "10.10.0.0/16").unwrap();
    assert_eq!(
        site.via.len(),
        4,
        "gw2 dead: through the drained gw1 after all"
    );
    assert!(site.via.iter().all(|d| d.starts_with("ap-gw1-")));
}

#[test]
fn a_gateway_asks_only_the_nodes_its_site_file_drains_and_a_node_asks_no_one() {
    let text = include_str!("../../tests/golden/two-gateways/config.kdl").replacen(
        "node \"c1\" {",
        "node \"c1\" {\n    drain #true",
        1,
    );
    let cfg = parse("t.kdl", &text).unwrap();
    let gw = one_shot(&cfg, "gw1", &[]).unwrap();
    for link in &gw.links {
        let asked: Vec<(&str, bool)> = link
            .peers
            .iter()
            .map(|p| (p.name.as_str(), p.drain))
            .collect();
        assert_eq!(asked, [("c1", true), ("c2", false)], "{}", link.dev);
    }
    let node = one_shot(&cfg, "c1", &[]).unwrap();
    assert!(node.links.iter().flat_map(|l| &l.peers).all(|p| !p.drain));
}
