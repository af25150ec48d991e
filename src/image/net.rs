//! The image's underlay network: loopback up, DHCP on every Ethernet interface the user-data
//! does not configure statically, static addresses from the `appliance` block. Runs on its own
//! thread so config discovery can poll the other sources meanwhile.

use super::{dhcp, say};
use crate::image::userdata::Interface;
use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Shared between the network thread and discovery.
#[derive(Default)]
pub struct NetState {
    /// Some interface has an address (metadata is worth asking).
    pub up: AtomicBool,
    /// Interfaces the user-data configures: DHCP leaves them alone.
    pub static_ifaces: Mutex<Vec<String>>,
    /// What DHCP routes may not touch, and what each interface's lease installed. One lock:
    /// a lease applied while the site file arrives is screened by one or the other.
    routes: Mutex<LeaseRoutes>,
}

impl NetState {
    /// The addresses DHCP leased so far (a pool user-data's slot is chosen from them).
    pub fn lease_addresses(&self) -> Vec<IpAddr> {
        let held = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        held.addresses
            .values()
            .flatten()
            .map(|a| a.addr())
            .collect()
    }
}

#[derive(Default)]
struct LeaseRoutes {
    /// None until a site file is accepted: until then nothing routes through tunnels, and the
    /// routes may be needed to reach the metadata service.
    protected: Option<Protected>,
    /// The routes and address the interface's current lease asked for, recorded before they
    /// are installed: one that went in before a later one failed is still known here when
    /// [`protect`] screens. A renewal removes what it no longer names.
    installed: std::collections::BTreeMap<String, Vec<Route>>,
    addresses: std::collections::BTreeMap<String, Vec<IpNet>>,
    /// What was last said refused, per interface: a renewal that refuses the same says nothing.
    refused: std::collections::BTreeMap<String, Vec<String>>,
}

/// A DHCP route: destination, prefix length, router (0.0.0.0 for on-link).
pub type Route = (Ipv4Addr, u8, Ipv4Addr);

/// What a DHCP server's routes may not touch (TunnelVision, CVE-2024-3661): a classless
/// static route (option 121) installed as given would take site traffic out of the tunnels by
/// being more specific than the tunnels' routes, or lower in metric than an equal one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protected {
    /// A route equal to or inside one of these is refused; each says what it is. A route
    /// that only covers one (a default route, say) is kept: the tunnels' longer routes win,
    /// and the reconcile's blackhole on the same prefix keeps it closed when they are down.
    pub inside: Vec<(ipnet::Ipv4Net, String)>,
    /// The underlay addresses tunnels go to, in groups that serve one purpose: the gateways'
    /// endpoints, the relays' private addresses (what a node without a public IP sends to),
    /// the relays' public ones. A route must cover all of a group or none of it, so a DHCP
    /// server cannot steer a chosen part of a node's links; a route to the relays only is fine.
    pub endpoints: Vec<(&'static str, Vec<Ipv4Addr>)>,
}

/// The protected set of a site file: its site prefixes and cloud blocks, the gateways' site
/// addresses, and the underlay addresses of the gateways and relays.
pub fn protected(cfg: &crate::model::config::Config) -> Protected {
    let v4 = |n: &IpNet| match n {
        IpNet::V4(n) => Some(n.trunc()),
        IpNet::V6(_) => None,
    };
    let mut inside = Vec::new();
    for n in cfg.site.site_prefixes.iter().filter_map(v4) {
        inside.push((n, format!("site prefix {n}")));
    }
    for n in cfg.site.cloud_blocks.iter().filter_map(v4) {
        inside.push((n, format!("the cloud block {n}")));
    }
    for g in &cfg.gateways {
        if let IpAddr::V4(a) = g.site_address {
            inside.push((a.into(), format!("{}'s site address {a}", g.name)));
        }
    }
    let v4s = |it: &mut dyn Iterator<Item = IpAddr>| {
        let mut v: Vec<Ipv4Addr> = it
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let endpoints = [
        (
            "gateway endpoints",
            v4s(&mut cfg.gateways.iter().map(|g| g.endpoint)),
        ),
        (
            "relays' private addresses",
            v4s(&mut cfg.relays.iter().filter_map(|r| r.private_address)),
        ),
        (
            "relays' public addresses",
            v4s(&mut cfg.relays.iter().map(|r| r.public_address)),
        ),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .collect();
    Protected { inside, endpoints }
}

/// Why a lease's address is refused, if it is: its subnet (the connected route the kernel adds
/// with it) is equal to or inside a protected prefix, which would put that part of the site on
/// the underlay's link. Only the inside rule applies: gateways and relays on the lease's own
/// subnet are the usual case (a private network), not an attack.
pub fn screen_address(p: &Protected, addr: IpNet) -> Option<String> {
    let IpNet::V4(a) = addr else {
        return None;
    };
    let net = a.trunc();
    p.inside
        .iter()
        .find(|(n, _)| n.contains(&net))
        .map(|(_, what)| {
            format!("{addr}: its subnet {net} is inside {what}, which goes through the tunnels")
        })
}

/// Split a lease's routes into those to install and a reason for each refused one.
pub fn screen(p: &Protected, routes: &[Route]) -> (Vec<Route>, Vec<String>) {
    let mut keep = Vec::new();
    let mut refused = Vec::new();
    for &(dst, len, via) in routes {
        let shown = format!("{dst}/{len} via {via}");
        let Ok(net) = ipnet::Ipv4Net::new(dst, len).map(|n| n.trunc()) else {
            refused.push(format!("{shown}: not a prefix"));
            continue;
        };
        if let Some((_, what)) = p.inside.iter().find(|(n, _)| n.contains(&net)) {
            refused.push(format!(
                "{shown}: inside {what}, which goes through the tunnels"
            ));
            continue;
        }
        let partly = p.endpoints.iter().find_map(|(what, group)| {
            let some: Vec<String> = group
                .iter()
                .filter(|a| net.contains(*a))
                .map(|a| a.to_string())
                .collect();
            (!some.is_empty() && some.len() < group.len()).then(|| {
                format!(
                    "{shown}: covers {} of the {} {what} only ({})",
                    some.len(),
                    group.len(),
                    some.join(", ")
                )
            })
        });
        if let Some(why) = partly {
            refused.push(why);
            continue;
        }
        keep.push((dst, len, via));
    }
    (keep, refused)
}

fn rt() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))
}

async fn index_of(h: &rtnetlink::Handle, name: &str) -> Result<u32, String> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(m.header.index),
        Ok(None) => Err(format!("no interface {name}")),
        Err(e) => Err(format!("{name}: {e}")),
    }
}

/// The netlink message for `route` on interface `ix` (on-link when its router is 0.0.0.0).
fn route_message(ix: u32, (dst, len, gw): Route) -> rtnetlink::packet_route::route::RouteMessage {
    let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, len)
        .output_interface(ix);
    if !gw.is_unspecified() {
        msg = msg.gateway(gw);
    }
    msg.build()
}

/// Bring `name` up, optionally set its MTU, add addresses and routes (dst, prefix, gateway).
pub fn configure(
    name: &str,
    mtu: Option<u32>,
    addrs: &[IpNet],
    routes: &[(Ipv4Addr, u8, Ipv4Addr)],
) -> Result<(), String> {
    rt()?.block_on(async {
        let (conn, h, _) = rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
        tokio::spawn(conn);
        let ix = index_of(&h, name).await?;
        let mut b = LinkUnspec::new_with_index(ix).up();
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        h.link()
            .set(b.build())
            .execute()
            .await
            .map_err(|e| format!("{name} up: {e}"))?;
        for a in addrs {
            match h
                .address()
                .add(ix, a.addr(), a.prefix_len())
                .execute()
                .await
            {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                Err(e) => return Err(format!("{name}: address {a}: {e}")),
            }
        }
        for (dst, len, gw) in routes {
            h.route()
                .add(route_message(ix, (*dst, *len, *gw)))
                .replace()
                .execute()
                .await
                .map_err(|e| format!("{name}: route {dst}/{len} via {gw}: {e}"))?;
        }
        Ok(())
    })
}

/// Ethernet-like interfaces backed by a device (not lo, not our tunnels), sorted by name.
pub fn physical_interfaces() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("device").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn mac_of(name: &str) -> Option<[u8; 6]> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).ok()?;
    let bytes: Vec<u8> = s
        .trim()
        .split(':')
        .filter_map(|x| u8::from_str_radix(x, 16).ok())
        .collect();
    bytes.try_into().ok()
}

/// Apply a lease: address, routes (RFC 3442 routes replace the routers option), MTU. Once a
/// site file is known its routes are screened ([`screen`]) and what is refused is said.
pub fn apply_lease(state: &NetState, name: &str, l: &dhcp::Lease) -> Result<(), String> {
    let addr = IpNet::new(IpAddr::V4(l.address), l.prefix_len).map_err(|e| e.to_string())?;
    let routes: Vec<Route> = if !l.classless_routes.is_empty() {
        l.classless_routes.clone()
    } else {
        l.routers
            .first()
            .map(|r| vec![(Ipv4Addr::UNSPECIFIED, 0, *r)])
            .unwrap_or_default()
    };
    let mut held = state.routes.lock().expect("not poisoned");
    if let Some(why) = held
        .protected
        .as_ref()
        .and_then(|p| screen_address(p, addr))
    {
        say_refused(&mut held, name, vec![format!("lease {why}")]);
        return Err(format!("refused the lease {why}"));
    }
    let (keep, refused) = match &held.protected {
        Some(p) => screen(p, &routes),
        None => (routes, Vec::new()),
    };
    say_refused(&mut held, name, refused);
    // Recorded before they go in: a lease whose third route fails leaves the first two in the
    // kernel, and they must still be screened. A renewal replaces the lease before it: what
    // it no longer names leaves the kernel, so a server that answers differently at every
    // renewal cannot pile up routes or addresses.
    let old_routes = held
        .installed
        .insert(name.to_string(), keep.clone())
        .unwrap_or_default();
    let old_addrs = held
        .addresses
        .insert(name.to_string(), vec![addr])
        .unwrap_or_default();
    let applied = configure(name, l.mtu.map(u32::from), &[addr], &keep);
    let stale: Vec<Route> = old_routes
        .into_iter()
        .filter(|r| !keep.contains(r))
        .collect();
    if let Err(e) = unroute(name, &stale) {
        say(&format!(
            "{name}: cannot remove a route of the last lease: {e}"
        ));
    }
    for a in old_addrs.into_iter().filter(|a| *a != addr) {
        if let Err(e) = unaddress(name, a) {
            say(&format!("{name}: cannot remove {a} of the last lease: {e}"));
        }
    }
    applied
}

fn say_refused(held: &mut LeaseRoutes, name: &str, refused: Vec<String>) {
    if held.refused.get(name) != Some(&refused) {
        for r in &refused {
            say(&format!(
                "{name}: refused the DHCP {}{r}",
                if r.starts_with("lease ") {
                    ""
                } else {
                    "route "
                }
            ));
        }
        held.refused.insert(name.to_string(), refused);
    }
}

/// The site file is known: screen every lease's routes from now on, and remove those already
/// installed that it refuses, before the daemon starts routing into the tunnels.
pub fn protect(state: &NetState, p: Protected) {
    let mut held = state.routes.lock().expect("not poisoned");
    let addresses = std::mem::take(&mut held.addresses);
    for (name, addrs) in addresses {
        let mut keep = Vec::new();
        for a in addrs {
            match screen_address(&p, a) {
                None => keep.push(a),
                Some(why) => {
                    say(&format!("{name}: removed the DHCP lease {why}"));
                    if let Err(e) = unaddress(&name, a) {
                        say(&format!("{name}: cannot remove the address {a}: {e}"));
                    }
                }
            }
        }
        held.addresses.insert(name, keep);
    }
    let installed = std::mem::take(&mut held.installed);
    for (name, routes) in installed {
        let (keep, refused) = screen(&p, &routes);
        let gone: Vec<Route> = routes.into_iter().filter(|r| !keep.contains(r)).collect();
        if let Err(e) = unroute(&name, &gone) {
            say(&format!("{name}: cannot remove a refused DHCP route: {e}"));
        }
        say_refused(&mut held, &name, refused);
        held.installed.insert(name, keep);
    }
    held.protected = Some(p);
}

/// Remove address `a` from `name` (and with it the routes through its subnet).
fn unaddress(name: &str, a: IpNet) -> Result<(), String> {
    rt()?.block_on(async {
        let (conn, h, _) = rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
        tokio::spawn(conn);
        let ix = index_of(&h, name).await?;
        let mut addrs = h
            .address()
            .get()
            .set_link_index_filter(ix)
            .set_address_filter(a.addr())
            .set_prefix_length_filter(a.prefix_len())
            .execute();
        while let Some(m) = addrs.try_next().await.map_err(|e| e.to_string())? {
            h.address()
                .del(m)
                .execute()
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

/// Remove routes [`configure`] added on `name`.
fn unroute(name: &str, routes: &[Route]) -> Result<(), String> {
    if routes.is_empty() {
        return Ok(());
    }
    rt()?.block_on(async {
        let (conn, h, _) = rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
        tokio::spawn(conn);
        let ix = index_of(&h, name).await?;
        for (dst, len, gw) in routes {
            match h
                .route()
                .del(route_message(ix, (*dst, *len, *gw)))
                .execute()
                .await
            {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
                Err(e) => return Err(format!("route {dst}/{len} via {gw}: {e}")),
            }
        }
        Ok(())
    })
}

/// DHCP on one interface until it has a lease, then renew at half the lease time.
fn dhcp_loop(name: String, state: Arc<NetState>) {
    let Some(mac) = mac_of(&name) else {
        say(&format!("{name}: no MAC address; no DHCP"));
        return;
    };
    if let Err(e) = configure(&name, None, &[], &[]) {
        say(&format!("{name}: cannot bring up: {e}"));
        return;
    }
    // Static addressing for this interface, from the config, ends DHCP on it.
    let now_static = || {
        state
            .static_ifaces
            .lock()
            .expect("not poisoned")
            .contains(&name)
    };
    let mut quiet = Duration::from_secs(5);
    let mut announced = false;
    loop {
        if now_static() {
            return;
        }
        match dhcp::lease(&name, mac, Duration::from_secs(10)) {
            Ok(Some(l)) => {
                if now_static() {
                    return;
                }
                match apply_lease(&state, &name, &l) {
                    Ok(()) => {
                        if !announced {
                            say(&format!(
                                "{name}: DHCP lease {}/{} from {}, router {}, lease {} s",
                                l.address,
                                l.prefix_len,
                                l.server,
                                l.routers
                                    .first()
                                    .map(|r| r.to_string())
                                    .unwrap_or_else(|| "none".into()),
                                l.lease_secs
                            ));
                            announced = true;
                        }
                        state.up.store(true, Ordering::SeqCst);
                    }
                    Err(e) => say(&format!("{name}: cannot apply the DHCP lease: {e}")),
                }
                std::thread::sleep(Duration::from_secs(u64::from(l.lease_secs / 2).max(30)));
            }
            Ok(None) => {
                std::thread::sleep(quiet);
                quiet = (quiet * 2).min(Duration::from_secs(120));
            }
            Err(e) => {
                say(&format!("{name}: DHCP: {e}"));
                std::thread::sleep(Duration::from_secs(30));
            }
        }
    }
}

/// Loopback up, then a DHCP thread per physical interface. IPv6 router advertisements are
/// ignored on them: an advertised on-link prefix inside an IPv6 site prefix would take that
/// traffic out of the tunnels as a DHCP route would, and nothing here needs SLAAC.
pub fn start(state: Arc<NetState>) {
    for name in physical_interfaces() {
        for key in ["accept_ra", "autoconf"] {
            let path = format!("/proc/sys/net/ipv6/conf/{name}/{key}");
            if let Err(e) = std::fs::write(&path, "0") {
                say(&format!("{path}: {e}"));
            }
        }
    }
    if let Err(e) = configure("lo", None, &[], &[]) {
        say(&format!("lo: {e}"));
    }
    for name in physical_interfaces() {
        let st = state.clone();
        let _ = std::thread::Builder::new()
            .name(format!("dhcp-{name}"))
            .spawn(move || dhcp_loop(name, st));
    }
}

/// Static addresses from the user-data.
pub fn apply_static(state: &NetState, ifaces: &[Interface]) {
    for i in ifaces {
        state
            .static_ifaces
            .lock()
            .expect("not poisoned")
            .push(i.name.clone());
        let routes: Vec<(Ipv4Addr, u8, Ipv4Addr)> = match i.gateway {
            Some(IpAddr::V4(g)) => vec![(Ipv4Addr::UNSPECIFIED, 0, g)],
            _ => Vec::new(),
        };
        match configure(&i.name, None, &i.addresses, &routes) {
            Ok(()) => {
                let list: Vec<String> = i.addresses.iter().map(|a| a.to_string()).collect();
                say(&format!("{}: static address {}", i.name, list.join(", ")));
                state.up.store(true, Ordering::SeqCst);
            }
            Err(e) => say(&format!("{}: static configuration failed: {e}", i.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_gateways() -> Protected {
        let cfg = crate::model::config::parse(
            "config.kdl",
            include_str!("../../tests/golden/two-gateways/config.kdl"),
        )
        .unwrap();
        protected(&cfg)
    }

    fn r(s: &str, via: &str) -> Route {
        let n: ipnet::Ipv4Net = s.parse().unwrap();
        (n.addr(), n.prefix_len(), via.parse().unwrap())
    }

    #[test]
    fn the_protected_set_is_the_sites_prefixes_blocks_gateways_and_endpoints() {
        let p = two_gateways();
        let inside: Vec<String> = p.inside.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(
            inside,
            [
                "10.10.0.0/16",
                "10.200.0.0/16",
                "10.10.0.2/32",
                "10.10.0.3/32"
            ]
        );
        assert_eq!(
            p.endpoints,
            [(
                "gateway endpoints",
                vec![
                    "192.0.2.1".parse::<Ipv4Addr>().unwrap(),
                    "192.0.2.2".parse().unwrap()
                ]
            )]
        );
    }

    /// TunnelVision (CVE-2024-3661): option-121 routes into the site or the cloud block, or
    /// onto part of the tunnels' endpoints, are refused with the reason; the default route
    /// and routes elsewhere stay.
    #[test]
    fn dhcp_routes_into_the_site_or_onto_part_of_the_endpoints_are_refused() {
        let p = two_gateways();
        let routes = [
            r("0.0.0.0/0", "172.31.0.1"),
            r("169.254.169.254/32", "172.31.0.1"),
            r("10.10.0.0/17", "172.31.0.1"),
            r("10.10.0.0/16", "172.31.0.1"),
            r("10.200.0.11/32", "172.31.0.1"),
            r("10.0.0.0/8", "172.31.0.1"),
            r("192.0.2.1/32", "172.31.0.1"),
            r("192.0.2.0/24", "172.31.0.1"),
        ];
        let (keep, refused) = screen(&p, &routes);
        assert_eq!(
            keep,
            [routes[0], routes[1], routes[5], routes[7]],
            "{refused:?}"
        );
        assert_eq!(refused.len(), 4, "{refused:?}");
        assert!(refused[0].contains("10.10.0.0/17 via 172.31.0.1: inside site prefix 10.10.0.0/16"));
        assert!(refused[1].contains("10.10.0.0/16 via 172.31.0.1: inside site prefix"));
        assert!(refused[2].contains("inside the cloud block 10.200.0.0/16"));
        assert!(refused[3].contains("covers 1 of the 2 gateway endpoints only (192.0.2.1)"));
        assert!(screen(&Protected::default(), &routes).1.is_empty());
    }

    /// A node behind relays sends only to the relays' private addresses: a route to all of
    /// them is its underlay and stays; one to some of them steers part of its links and goes.
    #[test]
    fn the_partial_rule_holds_per_group_of_endpoints() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let p = Protected {
            inside: vec![],
            endpoints: vec![
                (
                    "gateway endpoints",
                    vec![a("198.51.100.10"), a("198.51.100.11")],
                ),
                (
                    "relays' private addresses",
                    vec![a("172.16.0.5"), a("172.16.0.6")],
                ),
            ],
        };
        let (keep, refused) = screen(
            &p,
            &[
                r("172.16.0.0/24", "0.0.0.0"),
                r("172.16.0.5/32", "172.16.0.1"),
                r("198.51.100.0/24", "172.16.0.1"),
            ],
        );
        assert_eq!(
            keep,
            [
                r("172.16.0.0/24", "0.0.0.0"),
                r("198.51.100.0/24", "172.16.0.1")
            ]
        );
        assert_eq!(refused.len(), 1);
        assert!(
            refused[0].contains("covers 1 of the 2 relays' private addresses only"),
            "{refused:?}"
        );
    }
}
