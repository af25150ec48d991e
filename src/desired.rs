//! What one host should look like, derived from the site config. Pure.
//!
//! - gateway: tun `ap-l{i}` per link index (shared by all nodes); each node prefix routed over
//!   all of them; forwarding on.
//! - node: tun `ap-{gw}-{i}` per (gateway, link); its address on `ap-lo` (see [`ADDRESS_DEVICE`]); site prefixes
//!   and the cloud block routed over every tunnel; each gateway's site address over that
//!   gateway's tunnels only (so its BGP session uses its own links).
//! - relay: forwarding on (it NATs the nodes' WireGuard UDP; it never sees plaintext).
//!
//! Every routed prefix family gets a fail-closed blackhole behind it, and every tunnel device
//! gets `ignore_routes_with_linkdown`: a tun with no datapath attached has no carrier, so a
//! crashed daemon makes lookups fall to the blackhole instead of the default route.

use crate::config::{gateway_link_name, node_link_name, Config, Role};
use crate::diag::suggest;
use crate::state::{HostState, LinkKind, ADDRESS_DEVICE, BLACKHOLE_METRIC, TUNNEL_METRIC};
use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("host {name:?} is not in the config{}", hint.as_ref().map(|h| format!(" (did you mean {h:?}?)")).unwrap_or_default())]
    Unknown { name: String, hint: Option<String> },
}

/// Which (peer, link index) tunnels are alive, as the datapath sees them. `peer` is the node
/// name on a gateway and the gateway name on a node.
pub type Live<'a> = &'a dyn Fn(&str, u32) -> bool;

/// The desired state of host `name` and its role, with every tunnel counted as alive (what a
/// one-shot reconcile installs).
pub fn desired(cfg: &Config, name: &str) -> Result<(Role, HostState), HostError> {
    desired_live(cfg, name, &|_, _| true)
}

/// The desired state when only the tunnels `live` accepts carry traffic: a dead link's
/// nexthop leaves every route, and a route with no live nexthop is left out so the
/// fail-closed blackhole behind it takes over.
pub fn desired_live(
    cfg: &Config,
    name: &str,
    live: Live<'_>,
) -> Result<(Role, HostState), HostError> {
    desired_with(cfg, name, live, &config_view(cfg, name))
}

/// Prefixes learned over iBGP, each with the peers that advertise it: on a node, the gateways;
/// on a gateway, the nodes (only a node's own, policy-accepted prefixes count).
pub type Learned = std::collections::BTreeMap<IpNet, Vec<String>>;

/// What iBGP would teach this host if every peer announced everything the config allows it:
/// on a gateway, each node's assigned prefixes from that node; nothing on a node (the site
/// prefixes it needs are in the config). One-shot `reconcile` and `--dry-run` plan with this.
pub fn config_view(cfg: &Config, name: &str) -> Learned {
    let mut l = Learned::new();
    if cfg.role_of(name) == Some(Role::Gateway) {
        for n in &cfg.nodes {
            for p in &n.prefixes {
                l.entry(*p).or_default().push(n.name.clone());
            }
        }
    }
    l
}

/// The prefixes a gateway routes to node `n`: its address (the iBGP session runs from it, so
/// it is routed before any route is learned), then each assigned prefix the node announces.
pub fn node_routes(n: &crate::config::Node, learned: &Learned) -> Vec<IpNet> {
    let own = IpNet::from(n.address);
    let mut v = vec![own];
    v.extend(
        n.prefixes
            .iter()
            .copied()
            .filter(|p| *p != own && learned.get(p).is_some_and(|by| by.contains(&n.name))),
    );
    v
}

/// The desired state with what iBGP taught: on a node, each learned prefix becomes a
/// multipath route over the live links of the gateways that advertise it (with a fail-closed
/// blackhole), unless the config already routes exactly that prefix; on a gateway, each node
/// prefix is routed to the node only while the node announces it ([`node_routes`]).
pub fn desired_with(
    cfg: &Config,
    name: &str,
    live: Live<'_>,
    learned: &Learned,
) -> Result<(Role, HostState), HostError> {
    let role = cfg.role_of(name).ok_or_else(|| HostError::Unknown {
        name: name.to_string(),
        hint: suggest(name, &cfg.host_names()).map(str::to_string),
    })?;
    let state = match role {
        Role::Gateway => gateway(cfg, live, learned),
        Role::Node => node(cfg, name, live, learned),
        Role::Relay => relay(),
    };
    Ok((role, state))
}

fn gateway(cfg: &Config, live: Live<'_>, learned: &Learned) -> HostState {
    let mut s = HostState::default();
    let devs: Vec<String> = (0..cfg.site.links).map(gateway_link_name).collect();
    for d in &devs {
        s.add_link(d, LinkKind::Tun, cfg.site.mtu);
    }
    let mut routed = Vec::new();
    for n in &cfg.nodes {
        let via: Vec<String> = (0..cfg.site.links)
            .filter(|i| live(&n.name, *i))
            .map(gateway_link_name)
            .collect();
        if !via.is_empty() {
            for p in node_routes(n, learned) {
                s.add_route(p, TUNNEL_METRIC, via.clone(), false);
            }
        }
        routed.extend(n.prefixes.iter().copied());
    }
    for cb in &cfg.site.cloud_blocks {
        s.add_route(*cb, BLACKHOLE_METRIC, vec![], true);
        routed.push(*cb);
    }
    forwarding(&mut s, &routed);
    tunnel_sysctls(&mut s, &devs, &routed);
    s
}

fn node(cfg: &Config, name: &str, live: Live<'_>, learned: &Learned) -> HostState {
    let me = cfg
        .nodes
        .iter()
        .find(|n| n.name == name)
        .expect("role_of found it");
    let mut s = HostState::default();
    let mut all = Vec::new();
    let mut all_live = Vec::new();
    for g in &cfg.gateways {
        let devs: Vec<String> = (0..cfg.site.links)
            .map(|i| node_link_name(&g.name, i))
            .collect();
        for d in &devs {
            s.add_link(d, LinkKind::Tun, cfg.site.mtu);
        }
        let live_devs: Vec<String> = (0..cfg.site.links)
            .filter(|i| live(&g.name, *i))
            .map(|i| node_link_name(&g.name, i))
            .collect();
        if !live_devs.is_empty() {
            s.add_route_from(IpNet::from(g.site_address), live_devs.clone(), me.address);
        }
        all.extend(devs);
        all_live.extend(live_devs);
    }
    let mut routed: Vec<IpNet> = cfg.gateways.iter().map(|g| g.site_address.into()).collect();
    for p in cfg.site.site_prefixes.iter().chain(&cfg.site.cloud_blocks) {
        if !all_live.is_empty() {
            s.add_route_from(*p, all_live.clone(), me.address);
        }
        s.add_route(*p, BLACKHOLE_METRIC, vec![], true);
        routed.push(*p);
    }
    let statically: Vec<IpNet> = routed.clone();
    for (prefix, gateways) in learned {
        if statically.contains(prefix) {
            continue;
        }
        let via: Vec<String> = (0..cfg.site.links)
            .flat_map(|i| gateways.iter().map(move |g| (g, i)))
            .filter(|(g, i)| live(g, *i))
            .map(|(g, i)| node_link_name(g, i))
            .collect();
        if !via.is_empty() {
            s.add_route_from(*prefix, via, me.address);
        }
        s.add_route(*prefix, BLACKHOLE_METRIC, vec![], true);
        routed.push(*prefix);
    }
    s.add_link(ADDRESS_DEVICE, LinkKind::Tun, cfg.site.mtu);
    s.addresses.insert(crate::state::Address {
        dev: ADDRESS_DEVICE.to_string(),
        addr: IpNet::from(me.address),
    });
    // A node that holds more than its own address (containers, VMs behind it) forwards.
    if me.prefixes.iter().any(|p| *p != IpNet::from(me.address)) {
        forwarding(&mut s, &me.prefixes);
    }
    s.set_sysctl("net.ipv4.fib_multipath_hash_policy", "1");
    if routed.iter().any(|p| matches!(p, IpNet::V6(_))) {
        s.set_sysctl("net.ipv6.fib_multipath_hash_policy", "1");
    }
    tunnel_sysctls(&mut s, &all, &routed);
    s
}

fn relay() -> HostState {
    let mut s = HostState::default();
    s.set_sysctl("net.ipv4.ip_forward", "1");
    s
}

/// Forwarding and L4 multipath hashing for the families of `routed`.
fn forwarding(s: &mut HostState, routed: &[IpNet]) {
    s.set_sysctl("net.ipv4.ip_forward", "1");
    s.set_sysctl("net.ipv4.fib_multipath_hash_policy", "1");
    if routed.iter().any(|p| matches!(p, IpNet::V6(_))) {
        s.set_sysctl("net.ipv6.conf.all.forwarding", "1");
        s.set_sysctl("net.ipv6.fib_multipath_hash_policy", "1");
    }
}

/// Loose reverse-path filtering (ECMP returns may arrive on any link) and fail-closed linkdown.
fn tunnel_sysctls(s: &mut HostState, devs: &[String], routed: &[IpNet]) {
    let v6 = routed.iter().any(|p| matches!(p, IpNet::V6(_)));
    for d in devs {
        s.set_sysctl(&format!("net.ipv4.conf.{d}.rp_filter"), "2");
        s.set_sysctl(
            &format!("net.ipv4.conf.{d}.ignore_routes_with_linkdown"),
            "1",
        );
        if v6 {
            s.set_sysctl(
                &format!("net.ipv6.conf.{d}.ignore_routes_with_linkdown"),
                "1",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn cfg() -> Config {
        parse(
            "t.kdl",
            include_str!("../tests/golden/two-gateways/config.kdl"),
        )
        .unwrap()
    }

    #[test]
    fn gateway_routes_every_node_prefix_over_all_links() {
        let (role, s) = desired(&cfg(), "gw1").unwrap();
        assert_eq!(role, Role::Gateway);
        let r = s
            .routes
            .values()
            .find(|r| r.dst.to_string() == "10.200.0.11/32")
            .unwrap();
        assert_eq!(r.via, vec!["ap-l0", "ap-l1", "ap-l2", "ap-l3"]);
        assert_eq!(s.sysctls["net.ipv4.ip_forward"], "1");
    }

    #[test]
    fn node_reaches_each_gateway_address_only_through_that_gateway() {
        let (_, s) = desired(&cfg(), "c1").unwrap();
        let r = s
            .routes
            .values()
            .find(|r| r.dst.to_string() == "10.10.0.2/32")
            .unwrap();
        assert!(
            r.via.iter().all(|d| d.starts_with("ap-gw1-")),
            "{:?}",
            r.via
        );
        let site = s
            .routes
            .values()
            .find(|r| r.dst.to_string() == "10.10.0.0/16" && !r.blackhole)
            .unwrap();
        assert_eq!(site.via.len(), 8);
        assert!(s
            .routes
            .values()
            .any(|r| r.dst.to_string() == "10.10.0.0/16" && r.blackhole));
    }

    #[test]
    fn a_dead_link_leaves_the_routes_and_all_dead_leaves_only_the_blackhole() {
        let cfg = cfg();
        let (_, s) = desired_live(&cfg, "gw1", &|peer, link| !(peer == "c1" && link == 2)).unwrap();
        let r = s
            .routes
            .values()
            .find(|r| r.dst.to_string() == "10.200.0.11/32")
            .unwrap();
        assert_eq!(r.via, vec!["ap-l0", "ap-l1", "ap-l3"]);
        let (_, s) = desired_live(&cfg, "c1", &|_, _| false).unwrap();
        assert!(s.routes.values().all(|r| r.blackhole), "{:?}", s.routes);
        assert_eq!(s.links.len(), 9, "devices stay when links die");
    }

    #[test]
    fn a_learned_prefix_is_routed_over_the_live_links_of_the_gateways_that_advertise_it() {
        let cfg = cfg();
        let mut learned = Learned::new();
        learned.insert("10.12.0.0/16".parse().unwrap(), vec!["gw2".to_string()]);
        learned.insert("10.10.0.0/16".parse().unwrap(), vec!["gw1".to_string()]);
        let (_, s) = desired_with(&cfg, "c1", &|g, i| !(g == "gw2" && i == 0), &learned).unwrap();
        let r = s
            .routes
            .values()
            .find(|r| r.dst.to_string() == "10.12.0.0/16" && !r.blackhole)
            .unwrap();
        assert_eq!(r.via, vec!["ap-gw2-1", "ap-gw2-2", "ap-gw2-3"]);
        assert!(s
            .routes
            .values()
            .any(|r| r.dst.to_string() == "10.12.0.0/16" && r.blackhole));
        let site = s
            .routes
            .values()
            .find(|r| r.dst.to_string() == "10.10.0.0/16" && !r.blackhole)
            .unwrap();
        assert_eq!(
            site.via.len(),
            7,
            "a prefix the config routes keeps its static route"
        );
    }

    #[test]
    fn a_gateway_routes_a_node_prefix_only_while_that_node_announces_it() {
        let text = include_str!("../tests/golden/two-gateways/config.kdl").replace(
            "node \"c1\" {",
            "node \"c1\" {\n    prefix \"10.200.0.11/32\"\n    prefix \"10.200.1.0/28\"\n    prefix \"10.200.1.16/28\"",
        );
        let cfg = parse("t.kdl", &text).unwrap();
        let routes = |learned: &Learned| {
            let (_, s) = desired_with(&cfg, "gw1", &|_, _| true, learned).unwrap();
            let mut v: Vec<String> = s
                .routes
                .values()
                .filter(|r| !r.blackhole && r.dst.to_string().starts_with("10.200."))
                .map(|r| r.dst.to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            routes(&Learned::new()),
            ["10.200.0.11/32", "10.200.0.12/32"],
            "before iBGP: only the node addresses the sessions run from"
        );
        let mut learned = Learned::new();
        learned.insert("10.200.1.16/28".parse().unwrap(), vec!["c1".into()]);
        learned.insert("10.200.1.0/28".parse().unwrap(), vec!["c2".into()]);
        assert_eq!(
            routes(&learned),
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
    }

    #[test]
    fn unknown_host_suggests_the_closest_name() {
        let e = desired(&cfg(), "gw3").unwrap_err();
        assert!(e.to_string().contains("did you mean"), "{e}");
    }
}
