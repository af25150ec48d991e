//! What one host must be: the single derivation from (config, host, live links, learned routes,
//! underlay networks) to everything the host runs. Pure.
//!
//! ```text
//!  Config ─┐                               ┌─▶ kernel: HostState (devices, addresses, routes, sysctls)
//!  host ───┤                               │
//!  live ───┼─▶ per-peer prefixes ──────────┼─▶ datapath: LinkSpec per device (sends / accepts per peer)
//!  learned ┤   (PeerPrefixes: the one list │
//!  underlay┘    both are built from)       └─▶ bgp: SpeakerConfig (sessions and their policies)
//! ```
//!
//! Kernel routes and datapath tables come from the same [`PeerPrefixes`] list, so they cannot
//! disagree: a prefix routed into a tunnel device is a prefix the datapath sends to a peer on
//! that device, and the reverse holds for every live link (a property test checks both).
//!
//! - gateway: tun `ap-l{i}` per link index (shared by all nodes). Node n is sent its address
//!   (its iBGP session runs from it) and each prefix it announces inside its assignment
//!   ([`node_routes`]); it may send from any assigned prefix. Forwarding on.
//! - node: tun `ap-{gw}-{i}` per (gateway, link); its address on `ap-lo` (see
//!   [`state::ADDRESS_DEVICE`]). Gateway g is sent its own site address (so its BGP session
//!   uses its own links), the site prefixes, the cloud block, and each learned prefix g
//!   advertises that the import policy ([`import`]) accepts. Any gateway may send from any of
//!   those (the site router may return a flow through the other gateway).
//! - relay: forwarding on, and the source NAT of its private network's WireGuard UDP to the
//!   gateway endpoints' link ports ([`relay`]; it never sees plaintext). A node behind relays
//!   sends link i through relay i mod R ([`relays_of`], rules and per-relay tables).
//!
//! Every routed prefix family gets a fail-closed blackhole behind it, and every tunnel device
//! gets `ignore_routes_with_linkdown`: a tun with no datapath attached has no carrier, so a
//! crashed daemon makes lookups fall to the blackhole instead of the default route.

pub mod bgp;
pub mod import;
pub mod links;
pub mod plan;
pub mod state;

use crate::bgp::setup::SpeakerConfig;
use crate::model::config::{gateway_link_name, node_link_name, Config, Node, Role};
use crate::model::diag::suggest;
use ipnet::IpNet;
use links::{LinkSpec, PeerSpec};
use state::{
    DeviceKind, HostState, NatRule, NatTable, ADDRESS_DEVICE, BLACKHOLE_METRIC, TUNNEL_METRIC,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("host {name:?} is not in the config{}", hint.as_ref().map(|h| format!(" (did you mean {h:?}?)")).unwrap_or_default())]
    Unknown { name: String, hint: Option<String> },
    #[error("{0}")]
    Bgp(String),
}

/// Which (peer, link index) tunnels are alive, as the datapath sees them. `peer` is the node
/// name on a gateway and the gateway name on a node.
pub type Live<'a> = &'a dyn Fn(&str, u32) -> bool;

/// Prefixes learned over iBGP, each with the peers (host names of the config) that advertise
/// it: on a node, gateways; on a gateway, nodes (other advertisers are ignored). An empty set
/// is a prefix that was learned and withdrawn since: it keeps its fail-closed blackhole on a
/// node, so its traffic never falls to the underlay's default route.
pub type Learned = BTreeMap<IpNet, BTreeSet<String>>;

/// Everything the derivation reads besides the config.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub live: Live<'a>,
    /// Gateways whose probes say they are drained: a node routes through them only what no
    /// other gateway's live link carries.
    pub draining: &'a BTreeSet<String>,
    pub learned: &'a Learned,
    /// The networks of the host's own (non-appliance) interfaces: a node never routes a
    /// learned prefix inside one of them into the tunnels.
    pub underlay: &'a [IpNet],
}

/// One peer's prefixes: what is sent to it inside the tunnels, and the inner sources it may
/// send from. The one list kernel routes and datapath tables are both built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPrefixes {
    pub peer: String,
    pub sends: Vec<IpNet>,
    pub accepts: Vec<IpNet>,
}

/// Everything host `host` must be.
#[derive(Debug, Clone)]
pub struct HostIntent {
    pub host: String,
    pub role: Role,
    /// Devices, addresses, routes and sysctls appliance owns on the host.
    pub kernel: HostState,
    /// One spec per tunnel device, in device-name order: its port and its peers' tables.
    pub links: Vec<LinkSpec>,
    /// The iBGP speaker's sessions and policies; None when this host runs none.
    pub bgp: Option<SpeakerConfig>,
    /// Learned prefixes the node's import policy refused, with the reason.
    pub refused: BTreeMap<IpNet, String>,
}

/// What iBGP would teach this host if every peer announced everything the config allows it:
/// on a gateway, each node's assigned prefixes from that node; nothing on a node (the site
/// prefixes it needs are in the config). One-shot `reconcile` and `--dry-run` plan with this.
pub fn config_view(cfg: &Config, name: &str) -> Learned {
    let mut l = Learned::new();
    if cfg.role_of(name) == Some(Role::Gateway) {
        for n in &cfg.nodes {
            for p in &n.prefixes {
                l.entry(*p).or_default().insert(n.name.clone());
            }
        }
    }
    l
}

/// The intent of a one-shot reconcile: every tunnel counted alive, every assignment as if
/// announced ([`config_view`]).
pub fn one_shot(cfg: &Config, name: &str, underlay: &[IpNet]) -> Result<HostIntent, HostError> {
    let learned = config_view(cfg, name);
    derive(
        cfg,
        name,
        Inputs {
            live: &|_, _| true,
            draining: &BTreeSet::new(),
            learned: &learned,
            underlay,
        },
    )
}

/// The prefixes a gateway routes to node `n`: its address (the iBGP session runs from it, so
/// it is routed before any route is learned), then each prefix the node announces inside its
/// assignment: an assigned prefix, or a more specific part of one. The RIB accepts and reflects
/// a part as readily as the whole, so the gateway must route it too: before, only exact
/// assignments were routed, and a node announcing half its /28 had the site send that half to
/// a gateway whose only route for it was the fail-closed blackhole.
pub fn node_routes(n: &Node, learned: &Learned) -> Vec<IpNet> {
    let own = IpNet::from(n.address);
    let mut v = vec![own];
    for p in &n.prefixes {
        for (l, by) in learned {
            if *l != own && p.contains(l) && by.contains(&n.name) && !v.contains(l) {
                v.push(*l);
            }
        }
    }
    v
}

/// Derive everything host `name` must be from the config and the inputs.
pub fn derive(cfg: &Config, name: &str, inputs: Inputs<'_>) -> Result<HostIntent, HostError> {
    let role = cfg.role_of(name).ok_or_else(|| HostError::Unknown {
        name: name.to_string(),
        hint: suggest(name, &cfg.host_names()).map(str::to_string),
    })?;
    let bgp = bgp::sessions(cfg, name).map_err(HostError::Bgp)?;
    let (kernel, links, refused) = match role {
        Role::Gateway => {
            let (k, l) = gateway(cfg, name, inputs);
            (k, l, BTreeMap::new())
        }
        Role::Node => node(cfg, name, inputs),
        Role::Relay => (
            relay(cfg, name, inputs.underlay),
            Vec::new(),
            BTreeMap::new(),
        ),
    };
    Ok(HostIntent {
        host: name.to_string(),
        role,
        kernel,
        links,
        bgp,
        refused,
    })
}

/// A tunnel device and the peers it carries, as the routes see it.
struct Tunnel<'a> {
    dev: String,
    index: u32,
    peers: Vec<&'a PeerPrefixes>,
}

/// Kernel routes from the tunnels: each prefix a peer is sent goes over every device whose
/// link to that peer is alive. A prefix with no live device gets no tunnel route (its
/// blackhole, if any, takes over).
fn tunnel_routes(
    s: &mut HostState,
    tunnels: &[Tunnel<'_>],
    live: Live<'_>,
    draining: &BTreeSet<String>,
    src: Option<std::net::IpAddr>,
) {
    // Per prefix: the live links to peers in service, and those to drained peers (used only
    // when there is nothing else: a drained gateway still beats a blackhole).
    let mut via: BTreeMap<IpNet, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for t in tunnels {
        for p in &t.peers {
            if !live(&p.peer, t.index) {
                continue;
            }
            for prefix in &p.sends {
                let e = via.entry(*prefix).or_default();
                match draining.contains(&p.peer) {
                    false => e.0.push(t.dev.clone()),
                    true => e.1.push(t.dev.clone()),
                }
            }
        }
    }
    for (prefix, (active, drained)) in via {
        let devs = if active.is_empty() { drained } else { active };
        match src {
            Some(src) => s.add_route_from(prefix, devs, src),
            None => s.add_route(prefix, TUNNEL_METRIC, devs, false),
        }
    }
}

fn gateway(cfg: &Config, name: &str, inputs: Inputs<'_>) -> (HostState, Vec<LinkSpec>) {
    let me = cfg
        .gateways
        .iter()
        .find(|g| g.name == name)
        .expect("role_of found it");
    let peers: Vec<PeerPrefixes> = cfg
        .nodes
        .iter()
        .map(|n| PeerPrefixes {
            peer: n.name.clone(),
            sends: node_routes(n, inputs.learned),
            accepts: n.prefixes.clone(),
        })
        .collect();
    let tunnels: Vec<Tunnel<'_>> = (0..cfg.site.links)
        .map(|i| Tunnel {
            dev: gateway_link_name(i),
            index: i,
            peers: peers.iter().collect(),
        })
        .collect();
    let mut s = HostState::default();
    for t in &tunnels {
        s.add_device(&t.dev, DeviceKind::Tun, cfg.site.mtu);
    }
    tunnel_routes(&mut s, &tunnels, inputs.live, inputs.draining, None);
    let mut routed: Vec<IpNet> = cfg.nodes.iter().flat_map(|n| n.prefixes.clone()).collect();
    for cb in &cfg.site.cloud_blocks {
        s.add_route(*cb, BLACKHOLE_METRIC, vec![], true);
        routed.push(*cb);
    }
    forwarding(&mut s, &routed);
    let devs: Vec<String> = tunnels.iter().map(|t| t.dev.clone()).collect();
    tunnel_sysctls(&mut s, &devs, &routed);
    let links = tunnels
        .iter()
        .map(|t| LinkSpec {
            dev: t.dev.clone(),
            index: t.index,
            listen_port: Some(cfg.site.link_port(t.index)),
            v6_underlay: me.endpoint.is_ipv6(),
            clamp_mtu: cfg.site.clamp_mss.then_some(cfg.site.mtu),
            keepalive_ms: cfg.site.keepalive_ms,
            draining: me.drain,
            peers: cfg
                .nodes
                .iter()
                .zip(&t.peers)
                .map(|(n, p)| PeerSpec {
                    name: n.name.clone(),
                    public_key: n.public_key,
                    next_key: n.next_public_key,
                    // Learned from the node's handshakes: nodes may sit behind NAT.
                    endpoint: None,
                    allowed: p.accepts.clone(),
                    routes: p.sends.clone(),
                    drain: n.drain,
                })
                .collect(),
        })
        .collect();
    (s, links)
}

fn node(
    cfg: &Config,
    name: &str,
    inputs: Inputs<'_>,
) -> (HostState, Vec<LinkSpec>, BTreeMap<IpNet, String>) {
    let me = cfg
        .nodes
        .iter()
        .find(|n| n.name == name)
        .expect("role_of found it");
    // What the config routes: each gateway's site address (over that gateway only), the site
    // prefixes and the cloud block (over every gateway).
    let statically: BTreeSet<IpNet> = cfg
        .gateways
        .iter()
        .map(|g| IpNet::from(g.site_address))
        .chain(cfg.site.site_prefixes.iter().copied())
        .chain(cfg.site.cloud_blocks.iter().copied())
        .collect();
    // What iBGP taught, through the import policy. A prefix the config routes keeps its static
    // route.
    let mut refused = BTreeMap::new();
    let mut learned: Vec<(IpNet, &BTreeSet<String>)> = Vec::new();
    for (prefix, by) in inputs.learned {
        if statically.contains(prefix) {
            continue;
        }
        match import::refusal(cfg, me, inputs.underlay, prefix) {
            Some(why) => {
                refused.insert(*prefix, why);
            }
            None => learned.push((*prefix, by)),
        }
    }
    let accepts: Vec<IpNet> = statically
        .iter()
        .copied()
        .chain(learned.iter().map(|(p, _)| *p))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let peers: Vec<PeerPrefixes> = cfg
        .gateways
        .iter()
        .map(|g| {
            let mut sends = vec![IpNet::from(g.site_address)];
            sends.extend(cfg.site.site_prefixes.iter().copied());
            sends.extend(cfg.site.cloud_blocks.iter().copied());
            sends.extend(
                learned
                    .iter()
                    .filter(|(_, by)| by.contains(&g.name))
                    .map(|(p, _)| *p),
            );
            PeerPrefixes {
                peer: g.name.clone(),
                sends,
                accepts: accepts.clone(),
            }
        })
        .collect();
    let tunnels: Vec<Tunnel<'_>> = cfg
        .gateways
        .iter()
        .zip(&peers)
        .flat_map(|(g, p)| {
            (0..cfg.site.links).map(move |i| Tunnel {
                dev: node_link_name(&g.name, i),
                index: i,
                peers: vec![p],
            })
        })
        .collect();
    let mut s = HostState::default();
    for t in &tunnels {
        s.add_device(&t.dev, DeviceKind::Tun, cfg.site.mtu);
    }
    tunnel_routes(
        &mut s,
        &tunnels,
        inputs.live,
        inputs.draining,
        Some(me.address),
    );
    let mut routed: Vec<IpNet> = cfg.gateways.iter().map(|g| g.site_address.into()).collect();
    for p in cfg
        .site
        .site_prefixes
        .iter()
        .chain(&cfg.site.cloud_blocks)
        .chain(learned.iter().map(|(p, _)| p))
    {
        s.add_route(*p, BLACKHOLE_METRIC, vec![], true);
        routed.push(*p);
    }
    s.add_device(ADDRESS_DEVICE, DeviceKind::Tun, cfg.site.mtu);
    s.addresses.insert(state::Address {
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
    through_relays(&mut s, cfg, inputs.underlay);
    let devs: Vec<String> = tunnels.iter().map(|t| t.dev.clone()).collect();
    tunnel_sysctls(&mut s, &devs, &routed);
    let links = tunnels
        .iter()
        .map(|t| {
            let g = cfg
                .gateways
                .iter()
                .find(|g| g.name == t.peers[0].peer)
                .expect("tunnels come from the gateways");
            LinkSpec {
                dev: t.dev.clone(),
                index: t.index,
                listen_port: None,
                v6_underlay: g.endpoint.is_ipv6(),
                clamp_mtu: cfg.site.clamp_mss.then_some(cfg.site.mtu),
                keepalive_ms: cfg.site.keepalive_ms,
                draining: false,
                peers: vec![PeerSpec {
                    name: g.name.clone(),
                    public_key: g.public_key,
                    next_key: g.next_public_key,
                    endpoint: Some(SocketAddr::new(g.endpoint, cfg.site.link_port(t.index))),
                    allowed: t.peers[0].accepts.clone(),
                    routes: t.peers[0].sends.clone(),
                    drain: false,
                }],
            }
        })
        .collect();
    (s, links, refused)
}

/// The relays on a node's private network (their `private-address` inside one of its
/// underlay networks), in config order; at most [`state::MAX_RELAYS`].
pub fn relays_of<'a>(cfg: &'a Config, underlay: &[IpNet]) -> Vec<&'a crate::model::config::Relay> {
    cfg.relays
        .iter()
        .filter(|r| {
            r.private_address
                .is_some_and(|a| underlay.iter().any(|n| n.contains(&a)))
        })
        .take(state::MAX_RELAYS as usize)
        .collect()
}

/// A node behind relays spreads its links over them: link i's UDP (to every gateway's port
/// `base-port + i`) leaves through relay `i mod R`, by a rule that matches the destination
/// port and a table per relay routing each IPv4 gateway endpoint via that relay. One relay's
/// death then kills only the links through it, and traffic moves to the others by link
/// liveness. Without relays on its networks a node uses its own routing (a default route).
fn through_relays(s: &mut HostState, cfg: &Config, underlay: &[IpNet]) {
    let relays = relays_of(cfg, underlay);
    if relays.is_empty() {
        return;
    }
    for (r, relay) in relays.iter().enumerate() {
        let table = state::RELAY_TABLE + r as u32;
        let via = relay
            .private_address
            .expect("relays_of keeps relays with one");
        for g in &cfg.gateways {
            if g.endpoint.is_ipv4() == via.is_ipv4() {
                s.add_route_via(IpNet::from(g.endpoint), via, table);
            }
        }
    }
    for i in 0..cfg.site.links {
        s.rules.insert(state::Rule {
            priority: state::RELAY_RULE + i,
            dport: cfg.site.link_port(i),
            table: state::RELAY_TABLE + i % relays.len() as u32,
        });
    }
}

/// A relay forwards its private network's WireGuard UDP to the gateways and translates its
/// source: one masquerade rule per IPv4 gateway endpoint, for that endpoint's link ports
/// only. The private network is the underlay network holding the relay's `private-address`
/// (any source when it is not given or not on an interface: only hosts that route through
/// the relay reach the rule).
fn relay(cfg: &Config, name: &str, underlay: &[IpNet]) -> HostState {
    let mut s = HostState::default();
    s.set_sysctl("net.ipv4.ip_forward", "1");
    let me = cfg
        .relays
        .iter()
        .find(|r| r.name == name)
        .expect("role is relay");
    let from = me.private_address.and_then(|a| {
        underlay.iter().find_map(|n| match n {
            IpNet::V4(n) if IpNet::V4(*n).contains(&a) => Some(*n),
            _ => None,
        })
    });
    let last = cfg.site.link_port(cfg.site.links - 1);
    let mut rules: Vec<NatRule> = cfg
        .gateways
        .iter()
        .filter_map(|g| match g.endpoint {
            std::net::IpAddr::V4(to) => Some(NatRule {
                from,
                to,
                ports: (cfg.site.link_port(0), last),
            }),
            std::net::IpAddr::V6(_) => None,
        })
        .collect();
    rules.sort();
    rules.dedup();
    s.nat = Some(NatTable { rules });
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
mod tests;

/// Where `host` serves `/metrics`, from the site file's `metrics-port`: on its own address
/// (a gateway's site address, a node's cloud address, a relay's private address), which the
/// site reaches and the internet does not. `None`: off, or a relay without a private address.
pub fn metrics_listen(cfg: &Config, host: &str) -> Option<SocketAddr> {
    let port = cfg.site.metrics_port?;
    let addr = match cfg.role_of(host)? {
        Role::Gateway => cfg.gateways.iter().find(|g| g.name == host)?.site_address,
        Role::Node => cfg.nodes.iter().find(|n| n.name == host)?.address,
        Role::Relay => {
            cfg.relays
                .iter()
                .find(|r| r.name == host)?
                .private_address?
        }
    };
    Some(SocketAddr::new(addr, port))
}
