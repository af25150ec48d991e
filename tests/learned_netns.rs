//! Traffic to a prefix the site router announces that the site file does not list, in the
//! dual-stack two-gateway lab of `tests/bgp_netns.rs`:
//!
//! ```text
//!  site ns: bird2, 10.10.0.1/24 + 2001:db8:10::1/64, host 10.12.0.1 and 2001:db8:12::1 on lo
//!     │  bird announces 10.12.0.0/16 and 2001:db8:12::/48 to both gateways
//!     ├── gw1 10.10.0.2 ── 192.0.2.1 ─┐
//!     └── gw2 10.10.0.3 ── 192.0.2.3 ─┼─ inet ns (bridge 192.0.2.254: a would-be underlay
//!                   c1 192.0.2.11 ────┘            default route, counting what leaks)
//! ```
//! The node learns both prefixes over iBGP; it must send to them through the tunnels (the
//! kernel route *and* the datapath's table) and accept the replies. Once bird withdraws them,
//! the node's tunnel routes and datapath entries leave and traffic hits the fail-closed
//! blackhole, never the underlay.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// The prefixes c1's datapath sends to gateway `gw` on link `dev` (`appliance status`).
fn datapath_routes(c1: &Netns, dev: &str) -> Vec<String> {
    let st = c1.appliance(&["status", "--output", "json"]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
    st["links"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["link"] == dev)
        .flat_map(|l| l["routes"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r.as_str().map(String::from))
        .collect()
}

/// Packets towards `dst_prefix` that reached the inet namespace (the underlay).
fn leaked(inet: &Netns) -> u64 {
    let out = inet.exec(&["nft", "-j", "list", "table", "inet", "leak"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["rule"]["expr"].as_array())
        .flatten()
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .sum()
}

#[test]
fn a_node_reaches_a_prefix_only_bird_announces_and_fails_closed_when_it_is_withdrawn() {
    if !root_or_skip("learned_prefix_traffic") {
        return;
    }
    let (site, gw1, gw2, inet, c1, dir) = two_gateways("learned");
    dual_stack(&site, &gw1, &gw2, &dir);
    // The host inside the announced prefixes, on the site side.
    site.ip(&["addr", "add", "10.12.0.1/32", "dev", "lo"]);
    site.ip(&["addr", "add", "2001:db8:12::1/128", "dev", "lo"]);
    // The gateways route the site's prefixes to the site router (their own LAN routing).
    for gw in [&gw1, &gw2] {
        gw.ip(&["route", "add", "10.12.0.0/16", "via", "10.10.0.1"]);
        gw.ip(&[
            "-6",
            "route",
            "add",
            "2001:db8:12::/48",
            "via",
            "2001:db8:10::1",
        ]);
    }
    // An underlay default route on the node, and a counter of what would leak through it.
    inet.ip(&["addr", "add", "192.0.2.254/24", "dev", "br0"]);
    inet.ip(&["addr", "add", "2001:db8:2::254/64", "dev", "br0", "nodad"]);
    c1.ip(&["addr", "add", "2001:db8:2::11/64", "dev", "wan", "nodad"]);
    c1.ip(&["route", "add", "default", "via", "192.0.2.254"]);
    c1.ip(&["-6", "route", "add", "default", "via", "2001:db8:2::254"]);
    for cmd in [
        "add table inet leak",
        "add chain inet leak pre { type filter hook prerouting priority 0 ; }",
        "add rule inet leak pre ip daddr 10.12.0.0/16 counter",
        "add rule inet leak pre ip6 daddr 2001:db8:12::/48 counter",
    ] {
        let args: Vec<&str> = std::iter::once("nft").chain(cmd.split(' ')).collect();
        let r = inet.exec(&args);
        assert!(r.status.success(), "{cmd}: {}", text(&r));
    }
    c1.ip(&["addr", "add", "2001:db8:200:11::1/128", "dev", "lo"]);
    let (bird_proc, sock) = bird(
        &site,
        &dir,
        "bird",
        &dual_stack_bird_conf(
            "protocol static static4 { ipv4; route 10.12.0.0/16 blackhole; route 192.0.2.128/25 blackhole; }\nprotocol static static6 { ipv6; route 2001:db8:12::/48 blackhole; }",
            "where source = RTS_STATIC",
        ),
    );
    let mut procs = vec![bird_proc];
    for (ns, host) in [(&gw1, "gw1"), (&gw2, "gw2"), (&c1, "c1")] {
        procs.push(daemon(ns, &dir, host));
    }
    let all = ["ap-gw1-0", "ap-gw1-1", "ap-gw2-0", "ap-gw2-1"];
    let limit = Duration::from_secs(40);
    wait_route_devs(&c1, "10.12.0.0/16", &all, limit, &procs);
    wait_route_devs(&c1, "2001:db8:12::/48", &all, limit, &procs);
    // The site router must have the node's prefixes before replies can come back.
    let t0 = Instant::now();
    while kernel_nexthops(&site, "10.200.0.11/32").len() != 2
        || kernel_nexthops(&site, "2001:db8:200:11::/64").len() != 2
    {
        assert!(
            t0.elapsed() < limit,
            "bird lacks c1's prefixes\n{}",
            logs(&procs)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Bytes from the node to the learned prefixes and back, IPv4 and IPv6.
    let ping = c1.exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.12.0.1"]);
    assert!(ping.status.success(), "{}\n{}", text(&ping), logs(&procs));
    let ping6 = c1.exec(&[
        "ping",
        "-6",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "2",
        "-I",
        "2001:db8:200:11::1",
        "2001:db8:12::1",
    ]);
    assert!(ping6.status.success(), "{}\n{}", text(&ping6), logs(&procs));
    // A short iperf3 to the site host: the site sees the node's own address as the source.
    let server = Proc::spawn(
        &site,
        &["iperf3", "-s", "-1", "-J", "-B", "10.12.0.1"],
        dir.join("iperf3-server.json"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let client = c1.exec(&["iperf3", "-c", "10.12.0.1", "-t", "2", "-J"]);
    assert!(
        client.status.success(),
        "{}\n{}",
        text(&client),
        logs(&procs)
    );
    let c: serde_json::Value = serde_json::from_slice(&client.stdout).unwrap();
    let received = c["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(
        received > 1_000_000,
        "iperf3 moved only {received} bytes: {c}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let s: serde_json::Value = serde_json::from_str(&server.log()).unwrap_or_default();
    assert_eq!(
        s["start"]["connected"][0]["remote_host"],
        "10.200.0.11",
        "the site saw another source: {}",
        server.log()
    );
    drop(server);
    eprintln!("c1 -> 10.12.0.1: {received} bytes through the tunnels");
    // The datapath sends the learned prefixes to the gateways that advertise them.
    for dev in all {
        let r = datapath_routes(&c1, dev);
        assert!(
            r.iter().any(|p| p == "10.12.0.0/16") && r.iter().any(|p| p == "2001:db8:12::/48"),
            "{dev}'s datapath does not send the learned prefixes: {r:?}"
        );
    }
    assert_eq!(
        leaked(&inet),
        0,
        "traffic for the site left by the underlay"
    );
    // bird also announces 192.0.2.128/25, inside c1's own underlay network 192.0.2.0/24: the
    // node learned it, but its import policy (fed the observed underlay) refuses to route it.
    let st: serde_json::Value =
        serde_json::from_slice(&c1.appliance(&["status", "--output", "json"]).stdout).unwrap();
    let learned: Vec<&str> = st["bgp"]["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["prefix"].as_str())
        .collect();
    assert!(
        learned.contains(&"192.0.2.128/25"),
        "not learned: {learned:?}"
    );
    assert!(
        route_devs(&c1, "192.0.2.128/25").is_empty(),
        "routed into the tunnels"
    );
    assert!(
        !c1.our_routes()
            .iter()
            .any(|(d, _, _)| d == "192.0.2.128/25"),
        "not even a blackhole: the underlay must keep reaching it"
    );
    for dev in all {
        assert!(!datapath_routes(&c1, dev)
            .iter()
            .any(|p| p == "192.0.2.128/25"));
    }
    let cfg = dir.join("site.kdl");
    let state = c1.appliance(&[
        "state",
        "-c",
        cfg.to_str().unwrap(),
        "--node",
        "c1",
        "-o",
        "json",
    ]);
    let state: serde_json::Value = serde_json::from_slice(&state.stdout).unwrap();
    assert!(
        state["underlay"]
            .as_array()
            .is_some_and(|u| u.iter().any(|n| n == "192.0.2.0/24")),
        "the observed underlay: {}",
        state["underlay"]
    );
    // bird withdraws both: the tunnel routes and datapath entries leave, the blackholes stay.
    for p in ["static4", "static6"] {
        let r = site.exec(&["birdc", "-s", &sock, "disable", p]);
        assert!(r.status.success(), "{}", text(&r));
    }
    let t1 = Instant::now();
    while !route_devs(&c1, "10.12.0.0/16").is_empty()
        || !route_devs(&c1, "2001:db8:12::/48").is_empty()
    {
        assert!(
            t1.elapsed() < Duration::from_secs(10),
            "c1 kept a withdrawn route: {:?}\n{}",
            c1.our_routes(),
            logs(&procs)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "withdrawn by bird: c1's tunnel routes gone after {:?}",
        t1.elapsed()
    );
    let routes = c1.our_routes();
    for p in ["10.12.0.0/16", "2001:db8:12::/48"] {
        assert!(
            routes
                .iter()
                .any(|(d, m, via)| d == p && *m == 4000 && (via.is_empty() || via == &["lo"])),
            "no fail-closed blackhole for {p}: {routes:?}"
        );
    }
    for dev in all {
        let r = datapath_routes(&c1, dev);
        assert!(
            !r.iter()
                .any(|p| p == "10.12.0.0/16" || p == "2001:db8:12::/48"),
            "{dev}'s datapath still sends a withdrawn prefix: {r:?}"
        );
    }
    let ping = c1.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.12.0.1"]);
    assert!(!ping.status.success(), "{}", text(&ping));
    let ping6 = c1.exec(&[
        "ping",
        "-6",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "1",
        "2001:db8:12::1",
    ]);
    assert!(!ping6.status.success(), "{}", text(&ping6));
    assert_eq!(
        leaked(&inet),
        0,
        "a withdrawn prefix leaked to the underlay"
    );
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}
