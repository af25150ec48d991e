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
            let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(*dst, *len)
                .output_interface(ix);
            if !gw.is_unspecified() {
                msg = msg.gateway(*gw);
            }
            h.route()
                .add(msg.build())
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

/// Apply a lease: address, routes (RFC 3442 routes replace the routers option), MTU.
fn apply_lease(name: &str, l: &dhcp::Lease) -> Result<(), String> {
    let addr = IpNet::new(IpAddr::V4(l.address), l.prefix_len).map_err(|e| e.to_string())?;
    let routes: Vec<(Ipv4Addr, u8, Ipv4Addr)> = if !l.classless_routes.is_empty() {
        l.classless_routes.clone()
    } else {
        l.routers
            .first()
            .map(|r| vec![(Ipv4Addr::UNSPECIFIED, 0, *r)])
            .unwrap_or_default()
    };
    configure(name, l.mtu.map(u32::from), &[addr], &routes)
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
                match apply_lease(&name, &l) {
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

/// Loopback up, then a DHCP thread per physical interface.
pub fn start(state: Arc<NetState>) {
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
