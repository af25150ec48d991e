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
