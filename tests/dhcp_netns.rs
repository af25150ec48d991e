//! The image's DHCP routes against a real kernel, in a namespace of its own: a hostile DHCP
//! server's classless static routes (TunnelVision) never stay in the table once the site file
//! is known.

mod common;
use appliance::image::{dhcp::Lease, net};
use common::*;

/// Run `f` on a thread that has entered `ns` (the image's network code opens its netlink
/// sockets on the calling thread).
fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

fn routes(ns: &Netns) -> Vec<String> {
    ns.ip_json(&["-4", "route", "show", "dev", "eth0"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["protocol"] != "kernel")
        .map(|r| r["dst"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_hostile_dhcp_servers_routes_into_the_site_are_removed_and_refused() {
    if !root_or_skip("a_hostile_dhcp_servers_routes") {
        return;
    }
    let ns = Netns::new();
    // No dummy module here: a veth pair, the far end up so eth0 has a carrier.
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    ns.ip(&["link", "set", "eth1", "up"]);
    let via = "198.18.0.1".parse().unwrap();
    let route = |s: &str| {
        let n: ipnet::Ipv4Net = s.parse().unwrap();
        (n.addr(), n.prefix_len(), via)
    };
    let lease = Lease {
        address: "198.18.0.15".parse().unwrap(),
        prefix_len: 24,
        server: via,
        routers: vec![via],
        classless_routes: ["0.0.0.0/0", "10.10.0.0/17", "10.200.0.0/16", "192.0.2.1/32"]
            .map(route)
            .to_vec(),
        mtu: None,
        lease_secs: 3600,
    };
    let state = net::NetState::default();
    // Before the site file is known, the lease is applied as given (nothing routes through
    // tunnels yet, and the metadata service may need these routes).
    in_ns(&ns, || net::apply_lease(&state, "eth0", &lease)).unwrap();
    assert_eq!(
        routes(&ns),
        ["default", "10.10.0.0/17", "10.200.0.0/16", "192.0.2.1"]
    );
    let cfg = appliance::model::config::parse(
        "config.kdl",
        &std::fs::read_to_string(repo("tests/golden/two-gateways/config.kdl")).unwrap(),
    )
    .unwrap();
    // The site file arrives: what it protects leaves the table at once.
    in_ns(&ns, || net::protect(&state, net::protected(&cfg)));
    assert_eq!(routes(&ns), ["default"]);
    // A renewal offering them again installs only what passes.
    in_ns(&ns, || net::apply_lease(&state, "eth0", &lease)).unwrap();
    assert_eq!(routes(&ns), ["default"]);
}

/// Every route in eth0's table, the kernel's connected ones included.
fn all_routes(ns: &Netns) -> Vec<String> {
    ns.ip_json(&["-4", "route", "show", "dev", "eth0"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["dst"].as_str().unwrap().to_string())
        .collect()
}

/// The screen does not depend on a lease going in cleanly or being the latest: a route that
/// went in before a later one failed, a route only an earlier lease named, and a lease address
/// whose subnet lies inside the site (TunnelVision without option 121: the kernel's connected
/// route) are all removed once the site file is known, and such a lease is refused after.
#[test]
fn half_applied_earlier_and_on_link_leases_into_the_site_are_removed_too() {
    if !root_or_skip("half_applied_earlier_and_on_link_leases") {
        return;
    }
    let ns = Netns::new();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    ns.ip(&["link", "set", "eth1", "up"]);
    let via: std::net::Ipv4Addr = "198.18.0.1".parse().unwrap();
    let route = |s: &str, via: &str| {
        let n: ipnet::Ipv4Net = s.parse().unwrap();
        (n.addr(), n.prefix_len(), via.parse().unwrap())
    };
    let lease = |address: &str,
                 prefix_len,
                 routes: Vec<(std::net::Ipv4Addr, u8, std::net::Ipv4Addr)>| Lease {
        address: address.parse().unwrap(),
        prefix_len,
        server: via,
        routers: vec![via],
        classless_routes: routes,
        mtu: None,
        lease_secs: 3600,
    };
    let state = net::NetState::default();
    // A hostile route, then one through a router the kernel cannot reach: the lease fails
    // half-way, with the first route in.
    let first = lease(
        "198.18.0.15",
        24,
        vec![
            route("0.0.0.0/0", "198.18.0.1"),
            route("10.10.0.0/17", "198.18.0.1"),
            route("10.12.0.0/16", "203.0.113.1"),
        ],
    );
    assert!(in_ns(&ns, || net::apply_lease(&state, "eth0", &first)).is_err());
    // A renewal with another address, whose subnet is half the site prefix.
    let second = lease("10.10.9.9", 17, vec![]);
    in_ns(&ns, || net::apply_lease(&state, "eth0", &second)).unwrap();
    let mut before = all_routes(&ns);
    before.sort();
    assert_eq!(
        before,
        ["10.10.0.0/17", "10.10.0.0/17", "198.18.0.0/24", "default"]
    );
    let cfg = appliance::model::config::parse(
        "config.kdl",
        &std::fs::read_to_string(repo("tests/golden/two-gateways/config.kdl")).unwrap(),
    )
    .unwrap();
    in_ns(&ns, || net::protect(&state, net::protected(&cfg)));
    let mut after = all_routes(&ns);
    after.sort();
    assert_eq!(after, ["198.18.0.0/24", "default"]);
    let addrs = ns.ip(&["-4", "addr", "show", "dev", "eth0"]);
    assert!(!addrs.contains("10.10.9.9"), "{addrs}");
    // Offered again, the on-link lease is refused, and nothing of it goes in.
    let e = in_ns(&ns, || net::apply_lease(&state, "eth0", &second)).unwrap_err();
    assert!(e.contains("inside site prefix 10.10.0.0/16"), "{e}");
    assert!(!ns
        .ip(&["-4", "addr", "show", "dev", "eth0"])
        .contains("10.10.9.9"));
}
