//! The daemon's reactions, driven by real engines on the tests' clock: no namespaces, no
//! sleeping, no kernel. The kernel edge is the plan the reaction carries.

use super::*;
use crate::datapath::engine::MAX_PACKET;
use crate::intent::plan::{Change, Item, Op};
use crate::intent::state::Route;
use crate::model::key::PrivateKey;
use std::net::SocketAddr;
use std::sync::Arc;

const LINKS: u32 = 4;

struct Lab {
    gw: Core,
    node: Core,
    gw_links: Vec<Arc<Link>>,
    node_links: Vec<Arc<Link>>,
    t0: Instant,
}

fn site(gw: &PrivateKey, c1: &PrivateKey) -> Config {
    let text = format!(
        "site \"lab\" {{\n asn 65010\n cloud-block \"10.200.0.0/16\"\n site-prefix \"10.10.0.0/16\"\n links {LINKS}\n keepalive-ms 200\n dead-after 3\n}}\n\
         gateway \"gw1\" {{\n endpoint \"192.0.2.1\"\n site-address \"10.10.0.2\"\n public-key \"{}\"\n}}\n\
         node \"c1\" {{\n address \"10.200.0.11\"\n public-key \"{}\"\n}}\n",
        gw.public(),
        c1.public()
    );
    crate::model::config::parse("lab.kdl", &text).unwrap()
}

/// A gateway and a node, each with its engines built from its intent at t0, and each with the
/// kernel state a daemon installs at start (every link still dead).
fn lab() -> Lab {
    let (gk, nk) = (PrivateKey::generate(), PrivateKey::generate());
    let cfg = site(&gk, &nk);
    let t0 = Instant::now();
    let start = |host: &str, key: &PrivateKey| {
        let mut core = Core::new(cfg.clone(), host).unwrap();
        let links = core
            .all_live()
            .unwrap()
            .links
            .iter()
            .map(|s| Arc::new(Link::new(s, key, t0)))
            .collect::<Vec<_>>();
        let installed = core.intent().unwrap().kernel;
        core.installed(installed);
        (core, links)
    };
    let (gw, gw_links) = start("gw1", &gk);
    let (node, node_links) = start("c1", &nk);
    assert_eq!((gw_links.len(), node_links.len()), (4, 4));
    Lab {
        gw,
        node,
        gw_links,
        node_links,
        t0,
    }
}

impl Lab {
    /// One round of timers and probes on every link at `now`; datagrams from the node to the
    /// gateway on link `cut` are lost.
    fn exchange(&self, now: Instant, cut: Option<u32>) {
        let policy = self.gw.policy();
        let mut out = vec![0u8; MAX_PACKET];
        for i in 0..LINKS as usize {
            let (g, n) = (&self.gw_links[i], &self.node_links[i]);
            let from_node: SocketAddr = format!("198.51.100.7:{}", 40000 + i).parse().unwrap();
            let gw_at: SocketAddr = format!("192.0.2.1:{}", 51820 + i).parse().unwrap();
            let mut to_gw: Vec<Vec<u8>> = n.tick(policy, now).into_iter().map(|d| d.1).collect();
            let mut to_node: Vec<Vec<u8>> = g.tick(policy, now).into_iter().map(|d| d.1).collect();
            for _ in 0..4 {
                for d in std::mem::take(&mut to_gw) {
                    if cut != Some(i as u32) {
                        let r = g.inbound(from_node, &d, &mut out, now);
                        to_node.extend(r.to_net.into_iter().map(|x| x.1));
                    }
                }
                for d in std::mem::take(&mut to_node) {
                    let r = n.inbound(gw_at, &d, &mut out, now);
                    to_gw.extend(r.to_net.into_iter().map(|x| x.1));
                }
            }
        }
    }

    fn gw_verdicts(&mut self, now: Instant) -> Reaction {
        let policy = self.gw.policy();
        let v = verdicts(self.gw_links.iter().map(|l| &**l), policy, now);
        self.gw.verdicts(v).unwrap()
    }

    fn node_verdicts(&mut self, now: Instant) -> Reaction {
        let policy = self.node.policy();
        let v = verdicts(self.node_links.iter().map(|l| &**l), policy, now);
        self.node.verdicts(v).unwrap()
    }
}

/// Commit a reaction's plan as the daemon does after applying it; returns the plan.
fn commit(core: &mut Core, r: Reaction) -> Plan {
    let (plan, want) = r.kernel.expect("a kernel plan");
    core.installed(want);
    plan
}

fn route(c: &Change) -> (&Op, &Route) {
    match c.after.as_ref().or(c.before.as_ref()) {
        Some(Item::Route(r)) => (&c.op, r),
        other => panic!("not a route change: {other:?}"),
    }
}

fn devs(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_link_that_goes_silent_leaves_exactly_the_routes_it_carried() {
    let mut lab = lab();
    let t0 = lab.t0;
    lab.exchange(t0, None);
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let up = lab.gw_verdicts(ms(1));
    assert_eq!(up.transitions.len(), 4);
    assert_eq!(up.reachable, vec![("c1".to_string(), true)]);
    let plan = commit(&mut lab.gw, up);
    assert_eq!(plan.changes.len(), 1, "{}", plan.render_text());
    let (op, r) = route(&plan.changes[0]);
    assert_eq!(
        (op, r.dst.to_string().as_str()),
        (&Op::Add, "10.200.0.11/32")
    );
    assert_eq!(r.via, devs(&["ap-l0", "ap-l1", "ap-l2", "ap-l3"]));
    let r = lab.node_verdicts(ms(1));
    // The node's BGP session to gw1 may connect now: the speaker retries at once.
    assert_eq!(r.reachable, vec![("gw1".to_string(), true)]);
    commit(&mut lab.node, r);

    // Link 2 loses the node's packets; every 200 ms the other links carry probes.
    let mut t = 0;
    let (mut gw_r, mut node_r) = (None, None);
    while gw_r.is_none() || node_r.is_none() {
        t += 200;
        assert!(t <= 2000, "link 2 never died");
        lab.exchange(ms(t), Some(2));
        let g = lab.gw_verdicts(ms(t));
        if !g.transitions.is_empty() {
            gw_r = Some((t, g));
        }
        let n = lab.node_verdicts(ms(t));
        if !n.transitions.is_empty() {
            node_r = Some((t, n));
        }
    }
    let (tg, g) = gw_r.unwrap();
    assert!(
        (600..=800).contains(&tg),
        "the gateway judged link 2 dead at {tg} ms"
    );
    assert_eq!(g.transitions, vec![(("c1".to_string(), 2), false)]);
    assert!(
        g.reachable.is_empty(),
        "c1 is still reachable: {:?}",
        g.reachable
    );
    let plan = commit(&mut lab.gw, g);
    assert_eq!(plan.changes.len(), 1);
    let (op, r) = route(&plan.changes[0]);
    assert_eq!(op, &Op::Change, "one replace, not a delete and an add");
    assert_eq!(r.via, devs(&["ap-l0", "ap-l1", "ap-l3"]));

    // The node hears the gateway's probes saying "I do not hear you" on link 2.
    let (_, n) = node_r.unwrap();
    assert_eq!(n.transitions, vec![(("gw1".to_string(), 2), false)]);
    let plan = commit(&mut lab.node, n);
    assert!(!plan.changes.is_empty());
    for c in &plan.changes {
        let (op, r) = route(c);
        assert_eq!(op, &Op::Change, "{}", c.line());
        assert_eq!(
            r.via,
            devs(&["ap-gw1-0", "ap-gw1-1", "ap-gw1-3"]),
            "{}",
            c.line()
        );
    }

    // The loss ends: link 2 is back on both sides, and only its routes change again.
    let mut t2 = t;
    loop {
        t2 += 200;
        assert!(t2 <= t + 2000, "link 2 never came back");
        lab.exchange(ms(t2), None);
        let g = lab.gw_verdicts(ms(t2));
        if !g.transitions.is_empty() {
            let plan = commit(&mut lab.gw, g);
            assert_eq!(route(&plan.changes[0]).1.via.len(), 4);
            break;
        }
    }

    // Everything falls silent: c1 is unreachable, its route goes, its blackhole stays.
    let g = lab.gw_verdicts(ms(t2 + 5000));
    assert_eq!(g.transitions.len(), 4);
    assert_eq!(g.reachable, vec![("c1".to_string(), false)]);
    let n = lab.node_verdicts(ms(t2 + 5000));
    assert_eq!(n.reachable, vec![("gw1".to_string(), false)]);
    let plan = commit(&mut lab.gw, g);
    assert_eq!(plan.changes.len(), 1);
    let (op, r) = route(&plan.changes[0]);
    assert_eq!((op, r.blackhole), (&Op::Remove, false));
    let bh = lab.gw.intent().unwrap().kernel;
    assert!(bh.routes.values().any(|r| r.blackhole));
    // Nothing new: nothing to do.
    assert!(lab.gw_verdicts(ms(t2 + 5200)).is_empty());
}

#[test]
fn a_learned_prefix_is_routed_and_sent_then_withdrawn_to_its_blackhole() {
    let mut lab = lab();
    lab.exchange(lab.t0, None);
    let t1 = lab.t0 + Duration::from_millis(1);
    let r = lab.node_verdicts(t1);
    commit(&mut lab.node, r);
    let p: IpNet = "10.12.0.0/16".parse().unwrap();
    let learned = Learned::from([(p, BTreeSet::from(["gw1".to_string()]))]);
    let r = lab.node.learned_changed(&learned).unwrap();
    assert_eq!(r.tables.len(), 4);
    for spec in &r.tables {
        assert!(
            spec.peers[0].routes.contains(&p),
            "{} does not send {p}",
            spec.dev
        );
    }
    let plan = commit(&mut lab.node, r);
    let tunnel: Vec<_> = plan
        .changes
        .iter()
        .map(route)
        .filter(|(_, r)| r.dst == p)
        .collect();
    assert_eq!(
        tunnel.len(),
        2,
        "a route over the links and its blackhole: {}",
        plan.render_text()
    );
    assert!(tunnel.iter().all(|(op, _)| **op == Op::Add));
    assert!(tunnel.iter().any(|(_, r)| r.via.len() == 4));

    // The same routes again: no reaction at all.
    assert!(lab.node.learned_changed(&learned).unwrap().is_empty());

    // Withdrawn: the tunnel route and the datapath entry leave, the blackhole stays.
    let r = lab.node.learned_changed(&Learned::new()).unwrap();
    assert!(r.tables.iter().all(|s| !s.peers[0].routes.contains(&p)));
    let plan = commit(&mut lab.node, r);
    assert_eq!(plan.changes.len(), 1, "{}", plan.render_text());
    let (op, r) = route(&plan.changes[0]);
    assert_eq!((op, r.dst, r.blackhole), (&Op::Remove, p, false));
    assert!(lab
        .node
        .intent()
        .unwrap()
        .kernel
        .routes
        .values()
        .any(|r| r.dst == p && r.blackhole));
    assert!(lab
        .node
        .learned_changed(&Learned::new())
        .unwrap()
        .is_empty());
}

#[test]
fn a_learned_prefix_inside_the_underlay_is_refused_once_the_underlay_is_observed() {
    let mut lab = lab();
    lab.exchange(lab.t0, None);
    let r = lab.node_verdicts(lab.t0 + Duration::from_millis(1));
    commit(&mut lab.node, r);
    let p: IpNet = "172.16.5.0/24".parse().unwrap();
    let learned = Learned::from([(p, BTreeSet::from(["gw1".to_string()]))]);
    let r = lab.node.learned_changed(&learned).unwrap();
    commit(&mut lab.node, r);
    assert!(lab.node.set_underlay(["172.16.0.0/16".parse().unwrap()]));
    assert!(
        !lab.node.set_underlay(["172.16.0.0/16".parse().unwrap()]),
        "unchanged"
    );
    let r = lab.node.underlay_changed().unwrap();
    assert!(r.tables.iter().all(|s| !s.peers[0].routes.contains(&p)));
    let plan = commit(&mut lab.node, r);
    assert!(plan
        .changes
        .iter()
        .map(route)
        .any(|(op, r)| *op == Op::Remove && r.dst == p));
    assert!(lab.node.intent().unwrap().refused.contains_key(&p));
}

#[test]
fn withdrawn_prefixes_kept_for_their_blackholes_are_bounded() {
    let mut lab = lab();
    let many: Learned = (0..MAX_WITHDRAWN as u32 + 100)
        .map(|i| {
            let a = std::net::Ipv4Addr::from(0x0b00_0000 + (i << 8));
            (
                IpNet::new(a.into(), 24).unwrap(),
                BTreeSet::from(["gw1".to_string()]),
            )
        })
        .collect();
    lab.node.learned_changed(&many).unwrap();
    lab.node.learned_changed(&Learned::new()).unwrap();
    assert_eq!(lab.node.learned().len(), MAX_WITHDRAWN);
    assert!(lab.node.learned().values().all(BTreeSet::is_empty));
    // A prefix withdrawn now keeps its blackhole even with the bound full of older ones.
    let fresh: IpNet = "203.0.113.0/24".parse().unwrap();
    let one = Learned::from([(fresh, BTreeSet::from(["gw1".to_string()]))]);
    lab.node.learned_changed(&one).unwrap();
    lab.node.learned_changed(&Learned::new()).unwrap();
    assert_eq!(lab.node.learned().len(), MAX_WITHDRAWN);
    assert!(
        lab.node.learned().contains_key(&fresh),
        "the fresh withdrawal was evicted"
    );
}

#[test]
fn an_unknown_kernel_state_asks_for_a_full_reconcile() {
    let mut lab = lab();
    lab.exchange(lab.t0, None);
    lab.gw.forget_installed();
    let r = lab.gw_verdicts(lab.t0 + Duration::from_millis(1));
    assert!(r.full && r.kernel.is_none());
}

#[test]
fn a_reload_that_changes_the_role_is_refused_and_changes_nothing() {
    let mut lab = lab();
    let before = lab.gw.intent().unwrap().kernel;
    let other = site(&PrivateKey::generate(), &PrivateKey::generate());
    let text = "site \"lab\" {\n asn 65010\n cloud-block \"10.200.0.0/16\"\n site-prefix \"10.10.0.0/16\"\n}\n\
                gateway \"gw2\" {\n endpoint \"192.0.2.2\"\n site-address \"10.10.0.3\"\n public-key \"W9kCAm5zEojpFYsCHUPGlGxhpRVd9mM7hPik2A5dEQo=\"\n}\n\
                node \"gw1\" {\n address \"10.200.0.11\"\n public-key \"aUt+EqDNSYIKfcUP/H5qCQpfON1jd73Zz9kMecso9zc=\"\n}\n";
    let as_node = crate::model::config::parse("x.kdl", text).unwrap();
    let e = lab.gw.reload(as_node).unwrap_err();
    assert!(e.contains("changes role from gateway to node"), "{e}");
    assert_eq!(lab.gw.intent().unwrap().kernel, before);
    assert!(lab.gw.reload(other).is_ok(), "same role: accepted");
}

#[test]
fn a_reaction_names_only_the_datapath_tables_that_changed() {
    let text = include_str!("../../../tests/golden/two-gateways/config.kdl");
    let cfg = crate::model::config::parse("two.kdl", text).unwrap();
    let mut node = Core::new(cfg, "c1").unwrap();
    let p: IpNet = "10.12.0.0/16".parse().unwrap();
    let r = node
        .learned_changed(&Learned::from([(p, BTreeSet::from(["gw1".to_string()]))]))
        .unwrap();
    // gw1's links send it; gw2's only accept it (a reply may come back through gw2).
    assert_eq!(r.tables.len(), 8);
    for spec in &r.tables {
        let (sends, accepts) = (&spec.peers[0].routes, &spec.peers[0].allowed);
        assert_eq!(
            sends.contains(&p),
            spec.dev.starts_with("ap-gw1-"),
            "{}",
            spec.dev
        );
        assert!(accepts.iter().any(|a| a.contains(&p)), "{}", spec.dev);
    }
    assert!(r.full, "no kernel state installed yet: a full reconcile");
    // gw2 advertises it too: only gw2's tables change now.
    let both = BTreeSet::from(["gw1".to_string(), "gw2".to_string()]);
    let r = node.learned_changed(&Learned::from([(p, both)])).unwrap();
    assert!(
        r.tables.iter().all(|s| s.dev.starts_with("ap-gw2-")),
        "{:?}",
        r.tables
    );
    assert_eq!(r.tables.len(), 4);
}
