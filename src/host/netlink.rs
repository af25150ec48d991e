//! rtnetlink edge: read what appliance owns into a [`HostState`] and apply single plan changes.
//! Nothing here decides anything; it translates between plan values and kernel messages.

use crate::host::{nft, sysctl, tundev};
use crate::intent::plan::{Change, Item, Op};
use crate::intent::state::{
    Address, Device, DeviceKind, HostState, Route, Rule, ADDRESS_DEVICE, LINK_PREFIX, MAIN_TABLE,
    MAX_RELAYS, OWNER_ALIAS, RELAY_TABLE, ROUTE_PROTOCOL,
};
use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use rtnetlink::packet_route::IpProtocol;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder, RouteNextHopBuilder};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("device {0} not found")]
    NoDevice(String),
}

impl NetlinkError {
    /// errno of a kernel refusal, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Netlink(rtnetlink::Error::NetlinkError(m)) => m.code.map(|c| -c.get()),
            NetlinkError::Io(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

pub struct Netlink {
    handle: Handle,
    /// name → ifindex, filled on first use and dropped whenever we add or remove a device.
    index_cache: std::sync::Mutex<Option<HashMap<String, u32>>>,
    counters: Counters,
}

/// What this handle cost the kernel: requests sent, and messages read back from dumps.
#[derive(Debug, Default)]
pub struct Counters {
    requests: AtomicU64,
    dumped: AtomicU64,
}

/// A snapshot of [`Counters`], shown by `appliance status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetlinkCounters {
    /// Requests sent (a dump is one request).
    pub requests: u64,
    /// Messages received from dumps (links, addresses, routes).
    pub dump_messages: u64,
}

impl Netlink {
    /// Open a route-netlink socket in the current network namespace. Must run inside a tokio
    /// runtime: the connection is driven by a spawned task.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            index_cache: Default::default(),
            counters: Counters::default(),
        })
    }

    pub fn counters(&self) -> NetlinkCounters {
        NetlinkCounters {
            requests: self.counters.requests.load(Ordering::Relaxed),
            dump_messages: self.counters.dumped.load(Ordering::Relaxed),
        }
    }

    /// Count one request about to be sent.
    fn request(&self) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Count `n` messages a dump returned.
    fn dumped(&self, n: usize) {
        self.counters.dumped.fetch_add(n as u64, Ordering::Relaxed);
    }

    async fn links(&self) -> Result<Vec<LinkMessage>, NetlinkError> {
        self.request();
        let v: Vec<LinkMessage> = self.handle.link().get().execute().try_collect().await?;
        self.dumped(v.len());
        Ok(v)
    }

    async fn index_of(&self, name: &str) -> Result<u32, NetlinkError> {
        self.index_map()
            .await?
            .get(name)
            .copied()
            .ok_or_else(|| NetlinkError::NoDevice(name.to_string()))
    }

    async fn index_map(&self) -> Result<HashMap<String, u32>, NetlinkError> {
        if let Some(m) = self.index_cache.lock().expect("not poisoned").as_ref() {
            return Ok(m.clone());
        }
        let map: HashMap<String, u32> = self
            .links()
            .await?
            .iter()
            .filter_map(|m| link_name(m).map(|n| (n.to_string(), m.header.index)))
            .collect();
        *self.index_cache.lock().expect("not poisoned") = Some(map.clone());
        Ok(map)
    }

    fn forget_indexes(&self) {
        *self.index_cache.lock().expect("not poisoned") = None;
    }

    /// Read everything appliance owns, plus the current values of the sysctls `want` names
    /// (reading nf_tables needs CAP_NET_ADMIN: without it our NAT table is reported absent,
    /// so an unprivileged `--dry-run` still plans).
    pub async fn observe(&self, want: &HostState) -> Result<HostState, NetlinkError> {
        let mut s = HostState::default();
        let mut names: HashMap<u32, String> = HashMap::new();
        for m in self.links().await? {
            let Some(name) = link_name(&m) else { continue };
            names.insert(m.header.index, name.to_string());
            if !name.starts_with(LINK_PREFIX) {
                continue;
            }
            let alias = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfAlias(s) => Some(s.as_str()),
                _ => None,
            });
            if alias != Some(OWNER_ALIAS) {
                s.foreign_links.insert(name.to_string());
                continue;
            }
            let mtu = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                })
                .unwrap_or(0);
            let kind = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(InfoKind::Tun) => Some(DeviceKind::Tun),
                        LinkInfo::Kind(_) => Some(DeviceKind::Other),
                        _ => None,
                    }),
                    _ => None,
                })
                .unwrap_or(DeviceKind::Other);
            s.devices.insert(
                name.to_string(),
                Device {
                    name: name.to_string(),
                    kind,
                    mtu,
                    up: m.header.flags.contains(LinkFlags::Up),
                },
            );
        }

        self.request();
        let addrs: Vec<_> = self.handle.address().get().execute().try_collect().await?;
        self.dumped(addrs.len());
        for m in addrs {
            // Only the address device's addresses are ours. An address someone else puts on a
            // tunnel device (a transfer net, a benchmark's inner address) is not: removing it
            // would be wrong, and removing a device's last IPv4 address makes the kernel flush
            // every route through that device.
            let Some(dev) = names.get(&m.header.index) else {
                continue;
            };
            let ip = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                })
                .or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                });
            let Some(ip) = ip else { continue };
            if matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80) {
                continue; // kernel-made link-local, not ours and not an underlay network
            }
            if dev != ADDRESS_DEVICE || !s.devices.contains_key(dev) {
                if !dev.starts_with(LINK_PREFIX) && dev != "lo" {
                    if let Ok(net) = IpNet::new(ip, m.header.prefix_len) {
                        s.underlay.insert(net.trunc());
                    }
                }
                continue;
            }
            if let Ok(addr) = IpNet::new(ip, m.header.prefix_len) {
                s.addresses.insert(Address {
                    dev: dev.clone(),
                    addr,
                });
            }
        }

        for dump in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            self.request();
            let routes: Vec<_> = self
                .handle
                .route()
                .get(dump)
                .execute()
                .try_collect()
                .await?;
            self.dumped(routes.len());
            for m in routes {
                if let Some(r) = owned_route(&m, &names) {
                    s.routes.insert(r.key(), r);
                }
            }
        }

        self.request();
        let rules: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(rtnetlink::IpVersion::V4)
            .execute()
            .try_collect()
            .await?;
        self.dumped(rules.len());
        s.rules.extend(rules.iter().filter_map(owned_rule));
        // Always, so a NAT table of ours that is no longer wanted is seen and removed; but
        // a host that wants none does not need nf_tables at all (a kernel without it, an
        // unprivileged dry-run): there, failing to read it means there is nothing of ours.
        match nft::observe() {
            Ok(o) => {
                s.nat = o.ours;
                s.foreign_nat = o.foreign;
            }
            Err(e) if want.nat.is_none() => {
                tracing::debug!(error = %e, "nf_tables not readable; no NAT table wanted here");
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                tracing::warn!("cannot read nf_tables without CAP_NET_ADMIN: planning as if the NAT table were absent");
            }
            Err(e) => return Err(e.into()),
        }
        for key in want.sysctls.keys() {
            if let Some(v) = sysctl::read(key)? {
                s.sysctls.insert(key.clone(), v);
            }
        }
        Ok(s)
    }

    /// Perform one change of a plan.
    pub async fn apply(&self, change: &Change) -> Result<(), NetlinkError> {
        match (change.op, &change.before, &change.after) {
            (Op::Add, _, Some(Item::Device(l))) => self.add_link(l).await,
            (Op::Change, _, Some(Item::Device(l))) => self.set_link(l).await,
            (Op::Remove, Some(Item::Device(l)), _) => {
                let ix = self.index_of(&l.name).await?;
                self.forget_indexes();
                self.request();
                Ok(self.handle.link().del(ix).execute().await?)
            }
            (Op::Add, _, Some(Item::Address(a))) => {
                let ix = self.index_of(&a.dev).await?;
                let mut req = self
                    .handle
                    .address()
                    .add(ix, a.addr.addr(), a.addr.prefix_len());
                if a.addr.addr().is_ipv6() {
                    // The address device has no carrier: without NODAD the address would stay
                    // tentative and unusable as a source.
                    req.message_mut()
                        .attributes
                        .push(AddressAttribute::Flags(AddressFlags::Nodad));
                }
                self.request();
                req.execute().await?;
                Ok(())
            }
            (Op::Remove, Some(Item::Address(a)), _) => {
                let ix = self.index_of(&a.dev).await?;
                self.request();
                let all: Vec<_> = self
                    .handle
                    .address()
                    .get()
                    .set_link_index_filter(ix)
                    .set_address_filter(a.addr.addr())
                    .execute()
                    .try_collect()
                    .await?;
                self.dumped(all.len());
                for m in all {
                    self.request();
                    self.handle.address().del(m).execute().await?;
                }
                Ok(())
            }
            (Op::Add | Op::Change, _, Some(Item::Route(r))) => {
                let msg = self.route_message(r).await?;
                let req = self.handle.route().add(msg);
                let req = if change.op == Op::Change {
                    req.replace()
                } else {
                    req
                };
                self.request();
                Ok(req.execute().await?)
            }
            (Op::Remove, Some(Item::Route(r)), _) => {
                let mut msg = route_key_message(r);
                // Any scope: a route of ours someone added by hand (`ip route add … dev X`
                // makes it scope link) must still go; like `ip route del`.
                msg.header.scope = RouteScope::NoWhere;
                self.request();
                Ok(self.handle.route().del(msg).execute().await?)
            }
            (Op::Add | Op::Change, _, Some(Item::Sysctl(s))) => {
                Ok(sysctl::write(&s.key, &s.value)?)
            }
            (Op::Add, _, Some(Item::Rule(r))) => {
                let mut req = self
                    .handle
                    .rule()
                    .add()
                    .v4()
                    .table_id(r.table)
                    .priority(r.priority)
                    .action(RuleAction::ToTable);
                rule_match(req.message_mut(), r);
                self.request();
                Ok(req.execute().await?)
            }
            (Op::Remove, Some(Item::Rule(r)), _) => {
                // Named by priority and protocol only (the kernel matches the attributes
                // given): a rule of ours edited by hand, whose match no longer parses, goes
                // too, and a rule with another protocol never does.
                let mut msg = RuleMessage::default();
                msg.header.family = rtnetlink::packet_route::AddressFamily::Inet;
                msg.attributes.push(RuleAttribute::Priority(r.priority));
                msg.attributes
                    .push(RuleAttribute::Protocol(RouteProtocol::Other(
                        ROUTE_PROTOCOL,
                    )));
                self.request();
                Ok(self.handle.rule().del(msg).execute().await?)
            }
            (Op::Add | Op::Change, _, Some(Item::Nat(t))) => {
                self.request();
                Ok(nft::replace(Some(t))?)
            }
            (Op::Remove, Some(Item::Nat(_)), _) => {
                self.request();
                Ok(nft::replace(None)?)
            }
            _ => unreachable!("a plan never holds {change:?}"),
        }
    }

    async fn add_link(&self, l: &Device) -> Result<(), NetlinkError> {
        match l.kind {
            DeviceKind::Tun => {
                self.forget_indexes();
                tundev::create_persistent(&l.name)?
            }
            DeviceKind::Other => unreachable!("appliance never creates other devices"),
        }
        // Mark ownership before anything else can fail, so a revert or a later run finds it.
        self.request();
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_name(&l.name)
                    .alias(OWNER_ALIAS)
                    .build(),
            )
            .execute()
            .await?;
        self.set_link(l).await
    }

    async fn set_link(&self, l: &Device) -> Result<(), NetlinkError> {
        let b = LinkUnspec::new_with_name(&l.name).mtu(l.mtu);
        let b = if l.up { b.up() } else { b.down() };
        self.request();
        Ok(self.handle.link().set(b.build()).execute().await?)
    }

    async fn route_message(&self, r: &Route) -> Result<RouteMessage, NetlinkError> {
        let mut msg = route_key_message(r);
        if r.blackhole {
            msg.header.kind = RouteType::BlackHole;
            return Ok(msg);
        }
        if let Some(gw) = r.gateway {
            msg.attributes.push(RouteAttribute::Gateway(match gw {
                IpAddr::V4(a) => RouteAddress::Inet(a),
                IpAddr::V6(a) => RouteAddress::Inet6(a),
            }));
            return Ok(msg);
        }
        let index = self.index_map().await?;
        let mut hops = Vec::with_capacity(r.via.len());
        for dev in &r.via {
            let ix = *index
                .get(dev)
                .ok_or_else(|| NetlinkError::NoDevice(dev.clone()))?;
            let b = match r.dst {
                IpNet::V4(_) => RouteNextHopBuilder::new_ipv4().interface(ix),
                // Linux refuses device-only IPv6 nexthops in a multipath route ("device only
                // routes can not be added for IPv6 using the multipath API"). Tunnels are
                // point-to-point and NOARP, so a link-local gateway on each is never resolved:
                // it only makes the nexthop acceptable.
                IpNet::V6(_) => RouteNextHopBuilder::new_ipv6()
                    .interface(ix)
                    .via(IpAddr::V6(V6_TUNNEL_GATEWAY))
                    .expect("an IPv6 gateway fits an IPv6 nexthop"),
            };
            hops.push(b.build());
        }
        msg.attributes.push(RouteAttribute::MultiPath(hops));
        if let Some(src) = r.src {
            msg.attributes.push(RouteAttribute::PrefSource(match src {
                IpAddr::V4(a) => RouteAddress::Inet(a),
                IpAddr::V6(a) => RouteAddress::Inet6(a),
            }));
        }
        Ok(msg)
    }
}

/// The gateway of every IPv6 nexthop over a tunnel (see `route_message`).
const V6_TUNNEL_GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xad);

/// The message naming a route of ours: destination, metric, main table, our protocol.
fn route_key_message(r: &Route) -> RouteMessage {
    let b = match r.dst {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.addr(), n.prefix_len())
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.addr(), n.prefix_len())
            .build(),
    };
    let mut msg = b;
    msg.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = if r.blackhole {
        RouteType::BlackHole
    } else {
        RouteType::Unicast
    };
    msg.attributes.push(RouteAttribute::Priority(r.metric));
    if r.table != MAIN_TABLE {
        msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
        msg.attributes.push(RouteAttribute::Table(r.table));
    }
    msg
}

/// The match of one of our rules: our protocol, UDP, its destination port.
fn rule_match(m: &mut RuleMessage, r: &Rule) {
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Other(
            ROUTE_PROTOCOL,
        )));
    m.attributes
        .push(RuleAttribute::IpProtocol(IpProtocol::Udp));
    m.attributes
        .push(RuleAttribute::DestinationPortRange(RulePortRange {
            start: r.dport,
            end: r.dport,
        }));
}

/// Our rule, if `m` is one: our protocol, UDP to one port, looking up one of our tables.
fn owned_rule(m: &RuleMessage) -> Option<Rule> {
    let mut ours = false;
    let (mut priority, mut table, mut dport, mut udp) = (None, None, None, false);
    for a in &m.attributes {
        match a {
            RuleAttribute::Protocol(RouteProtocol::Other(p)) if *p == ROUTE_PROTOCOL => ours = true,
            RuleAttribute::Priority(p) => priority = Some(*p),
            RuleAttribute::Table(t) => table = Some(*t),
            RuleAttribute::IpProtocol(IpProtocol::Udp) => udp = true,
            RuleAttribute::DestinationPortRange(r) if r.start == r.end => dport = Some(r.start),
            _ => {}
        }
    }
    if !ours {
        return None;
    }
    // A rule of ours someone changed by hand still counts as ours (it is removed and the
    // wanted one added); fields it lacks read as impossible values so it never matches.
    Some(Rule {
        priority: priority.unwrap_or(0),
        dport: if udp { dport.unwrap_or(0) } else { 0 },
        table: table.unwrap_or(m.header.table as u32),
    })
}

fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table as u32)
}

/// Our route, if `m` is one (our protocol, in the main table or a relay table of ours).
fn owned_route(m: &RouteMessage, names: &HashMap<u32, String>) -> Option<Route> {
    let table = table_of(m);
    let ours = table == RouteHeader::RT_TABLE_MAIN as u32
        || (RELAY_TABLE..RELAY_TABLE + MAX_RELAYS).contains(&table);
    if m.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) || !ours {
        return None;
    }
    let plen = m.header.destination_prefix_length;
    let dst = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                IpNet::new((*ip).into(), plen).ok()
            }
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                IpNet::new((*ip).into(), plen).ok()
            }
            _ => None,
        })
        .or_else(|| match m.header.address_family {
            rtnetlink::packet_route::AddressFamily::Inet6 => {
                IpNet::new(Ipv6Addr::UNSPECIFIED.into(), 0).ok()
            }
            _ => IpNet::new(Ipv4Addr::UNSPECIFIED.into(), 0).ok(),
        })?;
    let metric = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0);
    let mut via: Vec<String> = Vec::new();
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(ix) => via.extend(names.get(ix).cloned()),
            RouteAttribute::MultiPath(hops) => via.extend(
                hops.iter()
                    .filter_map(|h| names.get(&h.interface_index).cloned()),
            ),
            _ => {}
        }
    }
    let blackhole = m.header.kind == RouteType::BlackHole;
    if blackhole {
        // The kernel gives IPv6 blackholes the loopback device as output: not a nexthop.
        via.clear();
    }
    via.sort();
    let src = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::PrefSource(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    });
    let gateway = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Gateway(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    });
    // A one-nexthop IPv6 tunnel route comes back as a plain route via our placeholder
    // gateway (see `route_message`): it is a device route like the multipath ones.
    let gateway = gateway.filter(|g| *g != IpAddr::V6(V6_TUNNEL_GATEWAY));
    if gateway.is_some() {
        // A route via an address: the kernel's chosen device is not part of what we own.
        via.clear();
    }
    Some(Route {
        dst,
        metric,
        via,
        blackhole,
        src,
        gateway,
        table,
    })
}
