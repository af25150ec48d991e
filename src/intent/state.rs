//! The host state appliance owns, as plain values: the same type describes what the config
//! wants ([`crate::intent`]) and what the kernel has ([`crate::host::netlink::observe`]), so the
//! planner compares like with like. Pure.
//!
//! Ownership: links whose name starts with [`LINK_PREFIX`] *and* whose ifalias is
//! [`OWNER_ALIAS`]; addresses on [`ADDRESS_DEVICE`] (not on tunnel devices, where others may
//! add their own); routes in the main table with protocol
//! [`ROUTE_PROTOCOL`]; the sysctls the desired state names. Nothing else is observed as ours.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Name prefix of every device appliance creates.
pub const LINK_PREFIX: &str = "ap-";
/// ifalias written on every device appliance creates: a foreign `ap-foo` is never ours.
pub const OWNER_ALIAS: &str = "appliance";
/// `rtm_protocol` of our routes (unassigned in iproute2's rt_protos; `ip route` prints 173).
pub const ROUTE_PROTOCOL: u8 = 173;
/// Metric of routes into the tunnels.
pub const TUNNEL_METRIC: u32 = 20;
/// Metric of the fail-closed blackholes behind them: when every tunnel nexthop is down
/// (linkdown is ignored), lookups fall through to these instead of leaking to the default route.
pub const BLACKHOLE_METRIC: u32 = 4000;
/// Device holding a node's cloud-block address. It is a tun device like the tunnels (no
/// datapath ever attaches to it): some kernels have no dummy driver, and the address must not
/// sit on a tunnel device, or every packet sourced from it leaves by that one tunnel.
pub const ADDRESS_DEVICE: &str = "ap-lo";
/// The nf_tables table (family ip) a relay owns, and the comment that marks it ours.
pub const NAT_TABLE: &str = "appliance";
pub const NAT_COMMENT: &str = "owned by appliance";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Tun,
    /// Something else with our name and alias (only ever observed).
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Device {
    pub name: String,
    pub kind: DeviceKind,
    pub mtu: u32,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Address {
    pub dev: String,
    pub addr: IpNet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RouteKey {
    pub dst: IpNet,
    pub metric: u32,
    pub table: u32,
}

/// The kernel's main routing table.
pub const MAIN_TABLE: u32 = 254;
/// A node's per-relay tables: table `RELAY_TABLE + r` routes the gateway endpoints through
/// relay r of its private network (at most [`MAX_RELAYS`]).
pub const RELAY_TABLE: u32 = 17300;
pub const MAX_RELAYS: u32 = 16;
/// Priority of the rule that sends link i's UDP to its relay's table: `RELAY_RULE + i`.
pub const RELAY_RULE: u32 = 17300;

fn is_main(t: &u32) -> bool {
    *t == MAIN_TABLE
}

fn main_table() -> u32 {
    MAIN_TABLE
}

/// `ip rule add priority P ipproto udp dport PORT lookup TABLE proto 173`: a node's link
/// whose tunnel UDP goes to this port leaves through the relay of that table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rule {
    pub priority: u32,
    pub dport: u16,
    pub table: u32,
}

/// The source NAT a relay owns: nf_tables table `ip appliance`, chain `postrouting` (nat hook,
/// priority srcnat), one masquerade rule per gateway endpoint. Replaced as a whole, in one
/// atomic batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatTable {
    pub rules: Vec<NatRule>,
}

/// `ip saddr FROM ip daddr TO udp dport PORTS masquerade`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NatRule {
    /// The private network whose UDP is translated; None: any source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<ipnet::Ipv4Net>,
    /// A gateway endpoint.
    pub to: std::net::Ipv4Addr,
    /// Its link ports, first and last.
    pub ports: (u16, u16),
}

impl std::fmt::Display for NatRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(from) = self.from {
            write!(f, "ip saddr {from} ")?;
        }
        write!(
            f,
            "ip daddr {} udp dport {}-{} masquerade",
            self.to, self.ports.0, self.ports.1
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    pub metric: u32,
    /// Output devices, sorted, each an equal-weight nexthop. Empty for a blackhole.
    pub via: Vec<String>,
    pub blackhole: bool,
    /// Preferred source address (a node's own address: tunnels are unnumbered, and without it
    /// the kernel could pick the underlay address, which the gateway drops as spoofed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<std::net::IpAddr>,
    /// Next-hop address (a relay, for a node's relay tables); None: device nexthops only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::IpAddr>,
    #[serde(default = "main_table", skip_serializing_if = "is_main")]
    pub table: u32,
}

impl Route {
    pub fn key(&self) -> RouteKey {
        RouteKey {
            dst: self.dst,
            metric: self.metric,
            table: self.table,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sysctl {
    /// Dotted name, as `sysctl` prints it: `net.ipv4.ip_forward`.
    pub key: String,
    pub value: String,
}

/// Everything appliance owns on one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    #[serde(rename = "links")]
    pub devices: BTreeMap<String, Device>,
    pub addresses: BTreeSet<Address>,
    #[serde(with = "routes_as_list")]
    pub routes: BTreeMap<RouteKey, Route>,
    /// Desired: values to hold. Observed: current values of the keys asked for (absent when the
    /// file does not exist, e.g. a device that is not there yet).
    pub sysctls: BTreeMap<String, String>,
    /// Observed only: devices named like ours but without our ifalias. Never touched; a
    /// desired link with such a name is a conflict the planner reports.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub foreign_links: BTreeSet<String>,
    /// Observed only: the networks of the host's own interfaces (not appliance's, not
    /// loopback, no IPv6 link-local): the underlay input of the node import policy.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub underlay: BTreeSet<ipnet::IpNet>,
    /// A node's rules sending each link's UDP to its relay's table.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub rules: BTreeSet<Rule>,
    /// A relay's source NAT (None: appliance owns no NAT table on this host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatTable>,
    /// Observed only: an nf_tables table named like ours that appliance did not create.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub foreign_nat: bool,
}

impl HostState {
    pub fn add_device(&mut self, name: &str, kind: DeviceKind, mtu: u32) {
        self.devices.insert(
            name.to_string(),
            Device {
                name: name.to_string(),
                kind,
                mtu,
                up: true,
            },
        );
    }

    pub fn add_route(&mut self, dst: IpNet, metric: u32, via: Vec<String>, blackhole: bool) {
        let mut via = via;
        via.sort();
        via.dedup();
        let r = Route {
            dst,
            metric,
            via,
            blackhole,
            src: None,
            gateway: None,
            table: MAIN_TABLE,
        };
        self.routes.insert(r.key(), r);
    }

    /// `dst via gateway table table`.
    pub fn add_route_via(&mut self, dst: IpNet, gateway: std::net::IpAddr, table: u32) {
        let r = Route {
            dst,
            metric: TUNNEL_METRIC,
            via: Vec::new(),
            blackhole: false,
            src: None,
            gateway: Some(gateway),
            table,
        };
        self.routes.insert(r.key(), r);
    }

    /// A route into the tunnels with a preferred source address.
    pub fn add_route_from(&mut self, dst: IpNet, via: Vec<String>, src: std::net::IpAddr) {
        self.add_route(dst, TUNNEL_METRIC, via, false);
        if dst.addr().is_ipv4() == src.is_ipv4() {
            if let Some(r) = self.routes.get_mut(&RouteKey {
                dst,
                metric: TUNNEL_METRIC,
                table: MAIN_TABLE,
            }) {
                r.src = Some(src);
            }
        }
    }

    pub fn set_sysctl(&mut self, key: &str, value: &str) {
        self.sysctls.insert(key.to_string(), value.to_string());
    }
}

/// Routes serialise as a list (their key is inside each route; JSON keys must be strings).
mod routes_as_list {
    use super::{Route, RouteKey};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<RouteKey, Route>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<RouteKey, Route>, D::Error> {
        Ok(Vec::<Route>::deserialize(d)?
            .into_iter()
            .map(|r| (r.key(), r))
            .collect())
    }
}
