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

/// eth0's routes, sorted; `connected` keeps the kernel's own (an address's subnet).
fn routes(ns: &Netns, connected: bool) -> Vec<String> {
    let mut v: Vec<String> = ns
        .ip_json(&["-4", "route", "show", "dev", "eth0"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| connected || r["protocol"] != "kernel")
        .map(|r| r["dst"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// A namespace with an `eth0` (a veth: no dummy module here; the far end up for a carrier).
fn with_eth0() -> Netns {
    let ns = Netns::new();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    ns.ip(&["link", "set", "eth1", "up"]);
    ns
}

/// A lease of `address/prefix_len` from router `via`, with classless routes "PREFIX via ROUTER".
fn lease(address: &str, prefix_len: u8, via: &str, routes: &[(&str, &str)]) -> Lease {
    let via: std::net::Ipv4Addr = via.parse().unwrap();
    Lease {
        address: address.parse().unwrap(),
        prefix_len,
        server: via,
        routers: vec![via],
        classless_routes: routes
            .iter()
            .map(|(dst, router)| {
                let n: ipnet::Ipv4Net = dst.parse().unwrap();
                (n.addr(), n.prefix_len(), router.parse().unwrap())
            })
            .collect(),
        mtu: None,
        lease_secs: 3600,
    }
}

/// What the two-gateway lab's site file protects.
fn two_gateways() -> net::Protected {
    let cfg = appliance::model::config::parse(
        "config.kdl",
        &std::fs::read_to_string(repo("tests/golden/two-gateways/config.kdl")).unwrap(),
    )
    .unwrap();
    net::protected(&cfg)
}

const VIA: &str = "198.18.0.1";

#[test]
fn a_hostile_dhcp_servers_routes_into_the_site_are_removed_and_refused() {
    if !root_or_skip("a_hostile_dhcp_servers_routes") {
        return;
    }
    let ns = with_eth0();
    let hostile = lease(
        "198.18.0.15",
        24,
        VIA,
        &[
            ("0.0.0.0/0", VIA),
            ("10.10.0.0/17", VIA),
            ("10.200.0.0/16", VIA),
            ("192.0.2.1/32", VIA),
        ],
    );
    let state = net::NetState::default();
    // Before the site file is known, the lease is applied as given (nothing routes through
    // tunnels yet, and the metadata service may need these routes).
    in_ns(&ns, || net::apply_lease(&state, "eth0", &hostile)).unwrap();
    assert_eq!(
        routes(&ns, false),
        ["10.10.0.0/17", "10.200.0.0/16", "192.0.2.1", "default"]
    );
    // The site file arrives: what it protects leaves the table at once.
    in_ns(&ns, || net::protect(&state, two_gateways()));
    assert_eq!(routes(&ns, false), ["default"]);
    // A renewal offering them again installs only what passes.
    in_ns(&ns, || net::apply_lease(&state, "eth0", &hostile)).unwrap();
    assert_eq!(routes(&ns, false), ["default"]);
}

/// A lease that fails half-way still has its first routes screened, and a renewal removes what
/// the lease before it named and it does not: a server that answers differently every time
/// cannot pile up routes.
#[test]
fn a_half_applied_lease_is_screened_and_a_renewal_replaces_the_last() {
    if !root_or_skip("a_half_applied_lease") {
        return;
    }
    let ns = with_eth0();
    let state = net::NetState::default();
    // A hostile route, then one through a router the kernel cannot reach.
    let half = lease(
        "198.18.0.15",
        24,
        VIA,
        &[
            ("0.0.0.0/0", VIA),
            ("10.10.0.0/17", VIA),
            ("10.12.0.0/16", "203.0.113.1"),
        ],
    );
    assert!(in_ns(&ns, || net::apply_lease(&state, "eth0", &half)).is_err());
    assert_eq!(routes(&ns, false), ["10.10.0.0/17", "default"]);
    in_ns(&ns, || net::protect(&state, two_gateways()));
    assert_eq!(routes(&ns, false), ["default"]);
    let elsewhere = lease(
        "198.18.0.15",
        24,
        VIA,
        &[("0.0.0.0/0", VIA), ("10.20.0.0/16", VIA)],
    );
    in_ns(&ns, || net::apply_lease(&state, "eth0", &elsewhere)).unwrap();
    assert_eq!(routes(&ns, false), ["10.20.0.0/16", "default"]);
    let plain = lease("198.18.0.15", 24, VIA, &[]);
    in_ns(&ns, || net::apply_lease(&state, "eth0", &plain)).unwrap();
    assert_eq!(
        routes(&ns, false),
        ["default"],
        "the renewal dropped 10.20.0.0/16"
    );
}

/// TunnelVision without option 121: a lease whose own subnet is half the site prefix puts
/// that half on the underlay's link through the kernel's connected route. Once the site file
/// is known the address goes (and everything through it), and such a lease is refused.
#[test]
fn a_lease_whose_subnet_lies_inside_the_site_is_removed_and_refused() {
    if !root_or_skip("a_lease_whose_subnet_lies_inside_the_site") {
        return;
    }
    let ns = with_eth0();
    let state = net::NetState::default();
    let on_link = lease("10.10.9.9", 17, "10.10.0.1", &[]);
    in_ns(&ns, || net::apply_lease(&state, "eth0", &on_link)).unwrap();
    assert_eq!(routes(&ns, true), ["10.10.0.0/17", "default"]);
    in_ns(&ns, || net::protect(&state, two_gateways()));
    assert_eq!(routes(&ns, true), Vec::<String>::new());
    let addrs = || ns.ip(&["-4", "addr", "show", "dev", "eth0"]);
    assert!(!addrs().contains("10.10.9.9"), "{}", addrs());
    let e = in_ns(&ns, || net::apply_lease(&state, "eth0", &on_link)).unwrap_err();
    assert!(e.contains("inside site prefix 10.10.0.0/16"), "{e}");
    assert!(!addrs().contains("10.10.9.9"), "{}", addrs());
}
