//! The embedded iBGP speaker against FRR's bgpd (a third independent implementation) as the
//! site router, in namespaces: the same lab as the bird test (two appliance gateways, one
//! appliance node with two links to each), with FRR instead of bird.
//!
//! ```text
//!  site ns: bgpd, bridge 10.10.0.1/24 ──┬── gw1 ns 10.10.0.2 ── 192.0.2.1 ─┐
//!                                       └── gw2 ns 10.10.0.3 ── 192.0.2.3 ─┼─ inet ns (bridge)
//!                                                     c1 ns 192.0.2.11 ────┘
//! ```
//! bgpd runs without zebra (`-Z`): it touches no kernel table, and its RIB is read with vtysh.

mod common;
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// FRR's paths for `prefix`: (next hop, ORIGINATOR_ID, CLUSTER_LIST) each, sorted.
fn frr_paths(site: &Netns, vty: &str, prefix: &str) -> Vec<(String, String, Vec<String>)> {
    let out = site.exec(&[
        "vtysh",
        "--vty_socket",
        vty,
        "-c",
        &format!("show bgp ipv4 unicast {prefix} json"),
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let mut paths: Vec<(String, String, Vec<String>)> = v["paths"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["nexthops"][0]["ip"].as_str().unwrap_or("").to_string(),
                p["originatorId"].as_str().unwrap_or("").to_string(),
                p["clusterList"]["list"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect(),
            )
        })
        .collect();
    paths.sort();
    paths
}

#[test]
fn frr_learns_each_node_prefix_once_per_gateway_with_originator_and_cluster_list() {
    if !root_or_skip("frr_interop") {
        return;
    }
    let (site, gw1, gw2, _inet, c1, dir) = two_gateways("frr");
    let conf = dir.join("bgpd.conf");
    std::fs::write(
        &conf,
        "frr defaults traditional\n\
         hostname site\n\
         router bgp 65010\n\
         \x20bgp router-id 10.10.0.1\n\
         \x20no bgp network import-check\n\
         \x20neighbor 10.10.0.2 remote-as 65010\n\
         \x20neighbor 10.10.0.3 remote-as 65010\n\
         \x20address-family ipv4 unicast\n\
         \x20 network 10.12.0.0/16\n\
         \x20 maximum-paths ibgp 4\n\
         \x20exit-address-family\n",
    )
    .unwrap();
    let vty = dir.to_str().unwrap().to_string();
    let mut procs = vec![Proc::spawn(
        &site,
        &[
            "/usr/lib/frr/bgpd",
            "-Z",
            "-S",
            "-f",
            conf.to_str().unwrap(),
            "--vty_socket",
            &vty,
            "-i",
            dir.join("bgpd.pid").to_str().unwrap(),
            "-P",
            "0",
        ],
        dir.join("bgpd.log"),
    )];
    for (ns, host) in [(&gw1, "gw1"), (&gw2, "gw2"), (&c1, "c1")] {
        procs.push(daemon(ns, &dir, host));
    }
    let want = vec![
        (
            "10.10.0.2".to_string(),
            "10.200.0.11".to_string(),
            vec!["10.10.0.2".to_string()],
        ),
        (
            "10.10.0.3".to_string(),
            "10.200.0.11".to_string(),
            vec!["10.10.0.3".to_string()],
        ),
    ];
    let t0 = Instant::now();
    while frr_paths(&site, &vty, "10.200.0.11/32") != want {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "FRR never had both paths with ORIGINATOR_ID and CLUSTER_LIST: {:?}\n{}",
            frr_paths(&site, &vty, "10.200.0.11/32"),
            logs(&procs)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "FRR has 10.200.0.11/32 via both gateways after {:?}",
        t0.elapsed()
    );
    // FRR's prefix reaches the node, routed over both gateways' live links.
    wait_route_devs(
        &c1,
        "10.12.0.0/16",
        &["ap-gw1-0", "ap-gw1-1", "ap-gw2-0", "ap-gw2-1"],
        Duration::from_secs(20),
        &procs,
    );
    // A stopped gateway sends Cease: FRR drops its path at once.
    procs[1].signal("-TERM");
    let t2 = Instant::now();
    while frr_paths(&site, &vty, "10.200.0.11/32") != want[1..] {
        assert!(
            t2.elapsed() < Duration::from_secs(20),
            "gw1's path stayed in FRR: {:?}",
            frr_paths(&site, &vty, "10.200.0.11/32")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("gw1 stopped: FRR down to one path after {:?}", t2.elapsed());
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// BFD with FRR: zebra, bfdd and bgpd (`neighbor X bfd profile fast`, 100 ms × 3). A gateway
/// that vanishes without a word leaves FRR's paths after the detection time.
#[test]
fn frr_drops_a_silently_dead_gateway_by_bfd_in_under_a_second() {
    if !root_or_skip("frr_bfd") {
        return;
    }
    let (site, gw1, gw2, _inet, c1, dir) = two_gateways("frrbfd");
    site_router_bfd(&dir);
    let vty = dir.to_str().unwrap().to_string();
    // zebra and bfdd drop to FRR's own user: the directory for their sockets and PID files
    // must be theirs.
    run("chown", &["frr:frr", &vty]);
    let zserv = dir.join("zserv.api").to_str().unwrap().to_string();
    std::fs::write(dir.join("zebra.conf"), "hostname site\n").unwrap();
    std::fs::write(
        dir.join("bfdd.conf"),
        "bfd\n profile fast\n  receive-interval 100\n  transmit-interval 100\n  detect-multiplier 3\n !\n!\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("bgpd.conf"),
        "frr defaults traditional\n\
         hostname site\n\
         router bgp 65010\n\
         \x20bgp router-id 10.10.0.1\n\
         \x20neighbor 10.10.0.2 remote-as 65010\n\
         \x20neighbor 10.10.0.2 bfd profile fast\n\
         \x20neighbor 10.10.0.3 remote-as 65010\n\
         \x20neighbor 10.10.0.3 bfd profile fast\n\
         \x20address-family ipv4 unicast\n\
         \x20 maximum-paths ibgp 4\n\
         \x20exit-address-family\n",
    )
    .unwrap();
    let frr = |daemon: &str, extra: &[&str]| {
        let conf = dir.join(format!("{daemon}.conf"));
        let pid = dir.join(format!("{daemon}.pid"));
        let mut args = vec![
            format!("/usr/lib/frr/{daemon}"),
            "-f".into(),
            conf.to_str().unwrap().into(),
            "--vty_socket".into(),
            vty.clone(),
            "-i".into(),
            pid.to_str().unwrap().into(),
            "-z".into(),
            zserv.clone(),
            "-P".into(),
            "0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::spawn(&site, &args, dir.join(format!("{daemon}.log")))
    };
    let mut procs = vec![frr("zebra", &[])];
    std::thread::sleep(Duration::from_millis(500));
    let bfdctl = dir.join("bfdd.sock").to_str().unwrap().to_string();
    procs.push(frr("bfdd", &["--bfdctl", &bfdctl]));
    procs.push(frr("bgpd", &["-S"]));
    for (ns, host) in [(&gw1, "gw1"), (&gw2, "gw2"), (&c1, "c1")] {
        procs.push(daemon(ns, &dir, host));
    }
    let peers_up = || {
        let o = site.exec(&["vtysh", "--vty_socket", &vty, "-c", "show bfd peers json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let up = |a: &str| {
            v.as_array()
                .into_iter()
                .flatten()
                .any(|p| p["peer"].as_str() == Some(a) && p["status"].as_str() == Some("up"))
        };
        (up("10.10.0.2"), up("10.10.0.3"), v)
    };
    let both = |site: &Netns| frr_paths(site, &vty, "10.200.0.11/32").len() == 2;
    let t0 = Instant::now();
    loop {
        let (a, b, v) = peers_up();
        if a && b && both(&site) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "FRR's BFD or BGP never came up: {v}\n{:?}\n{}",
            frr_paths(&site, &vty, "10.200.0.11/32"),
            logs(&procs)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("FRR: BFD up with both gateways after {:?}", t0.elapsed());

    for dev in ["lan", "wan"] {
        gw2.ip(&["link", "set", dev, "down"]);
    }
    let t1 = Instant::now();
    procs[4].signal("-KILL");
    while frr_paths(&site, &vty, "10.200.0.11/32").len() != 1 {
        assert!(
            t1.elapsed() < Duration::from_secs(10),
            "FRR kept the dead gateway: {:?}",
            frr_paths(&site, &vty, "10.200.0.11/32")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let gone = t1.elapsed();
    eprintln!("gw2 silently dead: FRR dropped its path after {gone:?} (BFD 100 ms x 3)");
    assert!(gone <= Duration::from_millis(1500), "{gone:?}");
    assert_eq!(frr_paths(&site, &vty, "10.200.0.11/32")[0].0, "10.10.0.2");
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}
