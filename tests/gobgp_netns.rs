//! The embedded route reflector against GoBGP, an independent BGP implementation, in namespaces,
//! first as a non-client (the site router's place), then as a reflector client (a node's own
//! routing daemon, further below). The non-client case:
//!
//! ```text
//!  site ns: gobgpd, bridge 10.10.0.9/24 ── gw1 ns 10.10.0.2 ── 192.0.2.1 ─┬─ inet ns (bridge)
//!                                              c1 ns 192.0.2.11 ──────────┘
//! ```
//! c1 is a route-reflector client of gw1 and announces 10.200.0.11/32 over iBGP through its
//! tunnels. gobgpd is gw1's `bgp { neighbor }`, a non-client: RFC 4456 has gw1 reflect the
//! client's route to it with next-hop-self, ORIGINATOR_ID (c1's router ID, its address) and a
//! CLUSTER_LIST holding gw1's cluster ID (its router ID, its site address). GoBGP decodes both
//! attributes on its own, so a wrong flag, length or encoding would show as a missing or
//! withdrawn route, not a pass.

mod common;
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// gobgpd's gRPC API inside the site namespace (the port is per namespace).
const API_PORT: &str = "50051";

/// GoBGP's best path for `prefix` in its global RIB, as `gobgp -j` prints it:
/// `{"PREFIX":[{"nlri":..,"best":true,"attrs":[{"type":N,..},..],..}]}`. None while gobgpd is
/// not answering yet or has no such path; the second value is what gobgp printed.
fn gobgp_best(site: &Netns, prefix: &str) -> (Option<Value>, String) {
    let out = site.exec(&[
        "gobgp",
        "-u",
        "127.0.0.1",
        "-p",
        API_PORT,
        "global",
        "rib",
        "-a",
        "ipv4",
        "-j",
    ]);
    let shown = text(&out);
    if !out.status.success() {
        return (None, shown);
    }
    let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
        return (None, shown);
    };
    let best = v
        .get(prefix)
        .and_then(Value::as_array)
        .and_then(|paths| {
            paths
                .iter()
                .find(|p| p.get("best").and_then(Value::as_bool) == Some(true))
        })
        .cloned();
    (best, shown)
}

/// Every path GoBGP holds for `prefix` (with ADD-PATH, one per path identifier).
fn gobgp_paths(ns: &Netns, prefix: &str) -> Vec<Value> {
    let out = gobgp(ns, &["global", "rib", "-a", "ipv4", "-j"]);
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.get(prefix).and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

/// The attribute of type code `code` (3 NEXT_HOP, 9 ORIGINATOR_ID, 10 CLUSTER_LIST) of a path.
fn attr(path: &Value, code: u64) -> Option<&Value> {
    path["attrs"]
        .as_array()?
        .iter()
        .find(|a| a.get("type").and_then(Value::as_u64) == Some(code))
}

/// One gateway's lab: a site bridge (in `site`, addressed `site_addr`) with gw1 at 10.10.0.2
/// on its `lan`; an internet bridge (in `inet`) with gw1 192.0.2.1 and c1 192.0.2.11 on their
/// `wan`; the site file of [`bgp_site`] with `neighbors` and `node_extra`, in a scratch
/// directory. Returns (site, gw1, inet, c1, dir).
fn one_gateway(
    tag: &str,
    site_addr: &str,
    neighbors: &[(&str, &str)],
    node_extra: &str,
) -> (Netns, Netns, Netns, Netns, std::path::PathBuf) {
    let (site, gw1, inet, c1) = (Netns::new(), Netns::new(), Netns::new(), Netns::new());
    let dir = std::env::temp_dir().join(format!("{}-{tag}", site.name));
    std::fs::create_dir_all(&dir).unwrap();
    bridge(&site, Some(site_addr), &[(&gw1, "lan", "10.10.0.2/24")]);
    bridge(
        &inet,
        None,
        &[(&gw1, "wan", "192.0.2.1/24"), (&c1, "wan", "192.0.2.11/24")],
    );
    bgp_site(
        &dir,
        &[("gw1", "192.0.2.1", "10.10.0.2")],
        neighbors,
        node_extra,
    );
    (site, gw1, inet, c1, dir)
}

/// gobgpd in `ns` with the TOML config `conf` (written to `dir/gobgpd.toml`), its API on
/// [`API_PORT`] of the namespace's loopback.
fn gobgpd(ns: &Netns, dir: &std::path::Path, conf: &str) -> Proc {
    let path = dir.join("gobgpd.toml");
    std::fs::write(&path, conf).unwrap();
    let api = format!("127.0.0.1:{API_PORT}");
    Proc::spawn(
        ns,
        &[
            "gobgpd",
            "-f",
            path.to_str().unwrap(),
            "-t",
            "toml",
            "--api-hosts",
            &api,
            "--pprof-disable",
        ],
        dir.join("gobgpd.log"),
    )
}

#[test]
fn gobgp_receives_a_reflected_client_route_with_originator_id_and_cluster_list() {
    if !root_or_skip("gobgp_interop") {
        return;
    }
    // Site LAN: gobgpd on the bridge itself.
    let (site, gw1, _inet, c1, dir) =
        one_gateway("gobgp", "10.10.0.9/24", &[("gobgp", "10.10.0.9")], "");
    // Both sides connect actively and accept on port 179; either session wins.
    let mut procs = vec![gobgpd(
        &site,
        &dir,
        "[global.config]\n\
         \x20 as = 65010\n\
         \x20 router-id = \"10.10.0.9\"\n\
         \x20 port = 179\n\
         \x20 local-address-list = [\"10.10.0.9\"]\n\
         [[neighbors]]\n\
         \x20 [neighbors.config]\n\
         \x20   neighbor-address = \"10.10.0.2\"\n\
         \x20   peer-as = 65010\n\
         \x20 [[neighbors.afi-safis]]\n\
         \x20   [neighbors.afi-safis.config]\n\
         \x20     afi-safi-name = \"ipv4-unicast\"\n",
    )];
    for (ns, host) in [(&gw1, "gw1"), (&c1, "c1")] {
        procs.push(daemon(ns, &dir, host));
    }
    let t0 = Instant::now();
    let path = loop {
        let (best, shown) = gobgp_best(&site, "10.200.0.11/32");
        if let Some(p) = best {
            break p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "gobgp never received 10.200.0.11/32; last `gobgp global rib -j`:\n{shown}\n{}",
            logs(&procs)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("gobgp has 10.200.0.11/32 after {:?}: {path}", t0.elapsed());
    // Towards a non-client the gateway sets itself as next hop.
    assert_eq!(
        attr(&path, 3).and_then(|a| a["nexthop"].as_str()),
        Some("10.10.0.2"),
        "next hop: {path}"
    );
    // ORIGINATOR_ID (type 9): the client's router ID.
    assert_eq!(
        attr(&path, 9).and_then(|a| a["value"].as_str()),
        Some("10.200.0.11"),
        "originator id: {path}"
    );
    // CLUSTER_LIST (type 10): the gateway's cluster ID, once, as the only reflector on the way.
    let clusters: Vec<&str> = attr(&path, 10)
        .and_then(|a| a["value"].as_array())
        .map(|l| l.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(clusters, ["10.10.0.2"], "cluster list: {path}");
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `gobgp` CLI against the gobgpd of `ns`.
fn gobgp(ns: &Netns, args: &[&str]) -> std::process::Output {
    let mut cmd = vec!["gobgp", "-u", "127.0.0.1", "-p", API_PORT];
    cmd.extend_from_slice(args);
    ns.exec(&cmd)
}

/// A cloud node whose own routing daemon speaks iBGP (`bgp-speaker "external"`, as a
/// Kubernetes node running a BGP CNI would): appliance runs the node's tunnels, and gobgpd on
/// the node is a route-reflector client of gw1, peering from the node address through them.
///
/// ```text
///  site ns: bird2 10.10.0.1 ── gw1 ns 10.10.0.2 ── 192.0.2.1 ─┬─ inet ns (bridge)
///             c1 ns 192.0.2.11: appliance (tunnels) + gobgpd ─┘
/// ```
/// - what gobgpd receives from gw1: bird's 10.12.0.0/16, reflected from a non-client to a
///   client, with ORIGINATOR_ID = bird's router ID and CLUSTER_LIST = [gw1];
/// - what gobgpd announces: its assigned 10.200.5.0/24 becomes a kernel route on gw1 over
///   c1's links and a route in bird's table, and the site reaches an address in it through the
///   tunnels; withdrawn, it leaves gw1's kernel while the tunnels stay up;
/// - a site prefix, a prefix outside the cloud block, another node's prefix and a prefix of
///   the cloud block that is nobody's are rejected, counted, and never reach bird.
#[test]
fn gobgp_as_a_reflector_client_gets_originator_id_and_cluster_list_and_its_announcements_are_policed(
) {
    if !root_or_skip("gobgp_client_interop") {
        return;
    }
    let (site, gw1, _inet, c1, dir) = one_gateway(
        "gobgp-client",
        "10.10.0.1/24",
        &[("site-router", "10.10.0.1"), ("site-router-b", "10.10.0.5")],
        " prefix \"10.200.0.11/32\"\n prefix \"10.200.5.0/24\"\n bgp-speaker \"external\"",
    );
    // A second node, whose prefix c1 must not be able to announce.
    let k2 = genkey(&dir, "c2");
    let mut kdl = std::fs::read_to_string(dir.join("site.kdl")).unwrap();
    kdl.push_str(&format!(
        "node \"c2\" {{\n address \"10.200.0.12\"\n public-key \"{k2}\"\n}}\n"
    ));
    std::fs::write(dir.join("site.kdl"), kdl).unwrap();
    // Two site routers (bird, 10.10.0.1 and 10.10.0.5) both announce 10.12.0.0/16: gw1 holds
    // two paths for it, and an ADD-PATH client receives both.
    site.ip(&["addr", "add", "10.10.0.5/24", "dev", "br0"]);
    // Only bird-a exports to the site's kernel (one kernel protocol per table).
    let site_router = |id: &str, kernel: &str| {
        format!(
            "router id {id};\n\
             protocol device {{}}\n\
             {kernel}\n\
             protocol static {{ ipv4; route 10.12.0.0/16 blackhole; }}\n\
             protocol bgp gw1 {{ local {id} as 65010; neighbor 10.10.0.2 as 65010; direct; strict bind on; hold time 30; ipv4 {{ import all; export where source = RTS_STATIC; }}; }}\n"
        )
    };
    let kernel = "protocol kernel { ipv4 { import none; export filter { if dest = RTD_UNICAST then accept; reject; }; }; }";
    let (bird_a, _) = bird(&site, &dir, "bird-a", &site_router("10.10.0.1", kernel));
    let (bird_b, _) = bird(&site, &dir, "bird-b", &site_router("10.10.0.5", ""));
    let mut procs = vec![
        bird_a,
        bird_b,
        daemon(&gw1, &dir, "gw1"),
        daemon(&c1, &dir, "c1"),
    ];
    // appliance puts the node address on ap-lo; gobgpd can bind it once that is done.
    let t = Instant::now();
    while !c1.ip(&["-4", "addr", "show"]).contains("10.200.0.11") {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", procs[3].log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // gobgpd on the node: no listener (port -1), it dials gw1 from the node address.
    procs.push(gobgpd(
        &c1,
        &dir,
        "[global.config]\n\
         \x20 as = 65010\n\
         \x20 router-id = \"10.200.0.11\"\n\
         \x20 port = -1\n\
         [[neighbors]]\n\
         \x20 [neighbors.config]\n\
         \x20   neighbor-address = \"10.10.0.2\"\n\
         \x20   peer-as = 65010\n\
         \x20 [neighbors.transport.config]\n\
         \x20   local-address = \"10.200.0.11\"\n\
         \x20 [[neighbors.afi-safis]]\n\
         \x20   [neighbors.afi-safis.config]\n\
         \x20     afi-safi-name = \"ipv4-unicast\"\n\
         \x20   [neighbors.afi-safis.add-paths.config]\n\
         \x20     receive = true\n\
         \x20     send-max = 8\n",
    ));
    // What the client receives: both site paths (ADD-PATH, RFC 7911: gobgpd asked for several
    // paths, told apart by the path identifiers gw1 gave them), each reflected from a
    // non-client with ORIGINATOR_ID = that site router's ID and CLUSTER_LIST = [gw1].
    let t0 = Instant::now();
    let paths = loop {
        let paths = gobgp_paths(&c1, "10.12.0.0/16");
        if paths.len() >= 2 {
            break paths;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "gobgp has {} path(s) for 10.12.0.0/16: {paths:?}\ngw1: {}\n{}",
            paths.len(),
            text(&gw1.appliance(&["status"])),
            logs(&procs)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "gobgp client has both paths of 10.12.0.0/16 after {:?}",
        t0.elapsed()
    );
    let mut hops = Vec::new();
    for path in &paths {
        let hop = attr(path, 3).and_then(|a| a["nexthop"].as_str()).unwrap();
        assert_eq!(
            attr(path, 9).and_then(|a| a["value"].as_str()),
            Some(hop),
            "ORIGINATOR_ID is the announcing site router's ID: {path}"
        );
        let clusters: Vec<&str> = attr(path, 10)
            .and_then(|a| a["value"].as_array())
            .map(|l| l.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert_eq!(clusters, ["10.10.0.2"], "CLUSTER_LIST is gw1: {path}");
        hops.push(hop.to_string());
    }
    hops.sort();
    assert_eq!(hops, ["10.10.0.1", "10.10.0.5"], "{paths:?}");
    // What the client announces.
    for p in [
        "10.200.0.11/32",
        "10.200.5.0/24",
        "10.10.5.0/24",
        "198.18.0.0/24",
        "10.200.9.0/24",
        "10.200.0.12/32",
    ] {
        let out = gobgp(&c1, &["global", "rib", "add", p, "-a", "ipv4"]);
        assert!(out.status.success(), "gobgp rib add {p}: {}", text(&out));
    }
    let gw_route = |p: &str| -> Vec<String> {
        gw1.our_routes()
            .into_iter()
            .find(|(d, m, _)| d == p && *m == 20)
            .map(|r| r.2)
            .unwrap_or_default()
    };
    let t1 = Instant::now();
    while gw_route("10.200.5.0/24") != ["ap-l0", "ap-l1"]
        || kernel_nexthops(&site, "10.200.5.0/24") != ["10.10.0.2"]
    {
        assert!(
            t1.elapsed() < Duration::from_secs(20),
            "gw1 {:?}, bird {:?}\n{}",
            gw_route("10.200.5.0/24"),
            kernel_nexthops(&site, "10.200.5.0/24"),
            logs(&procs)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "10.200.5.0/24 routed by gw1 and bird {:?} after the announcement",
        t1.elapsed()
    );
    // Bytes through the tunnels to an address inside the learned prefix.
    c1.ip(&["addr", "add", "10.200.5.1/32", "dev", "lo"]);
    let ping = site.exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.200.5.1"]);
    assert!(ping.status.success(), "{}", text(&ping));
    // Policy on the gateway: four announcements rejected and counted, none at the site.
    let st = gw1.appliance(&["status", "--output", "json"]);
    let st: Value = serde_json::from_slice(&st.stdout).unwrap();
    let c1_session = st["bgp"]["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "c1")
        .cloned()
        .unwrap();
    assert_eq!(c1_session["prefixes"]["accepted"], 2, "{st}");
    assert_eq!(
        c1_session["add_path_rx"]["ipv4"], true,
        "gobgpd sends path ids: {st}"
    );
    assert_eq!(c1_session["add_path_tx"]["ipv4"], true, "{st}");
    assert_eq!(c1_session["prefixes"]["rejected"], 4, "{st}");
    for p in [
        "10.10.5.0/24",
        "198.18.0.0/24",
        "10.200.9.0/24",
        "10.200.0.12/32",
    ] {
        assert!(
            kernel_nexthops(&site, p).is_empty(),
            "{p} leaked to the site"
        );
        assert!(gw_route(p).is_empty(), "{p} routed on gw1");
    }
    // Withdrawn by the node's daemon: the route leaves gw1's kernel (and bird's) while the
    // tunnels, and the route to the node address, stay.
    let out = gobgp(
        &c1,
        &["global", "rib", "del", "10.200.5.0/24", "-a", "ipv4"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let t2 = Instant::now();
    while !gw_route("10.200.5.0/24").is_empty()
        || !kernel_nexthops(&site, "10.200.5.0/24").is_empty()
    {
        assert!(
            t2.elapsed() < Duration::from_secs(20),
            "withdrawn 10.200.5.0/24 still routed: gw1 {:?}, bird {:?}",
            gw_route("10.200.5.0/24"),
            kernel_nexthops(&site, "10.200.5.0/24")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gw_route("10.200.0.11/32"), ["ap-l0", "ap-l1"]);
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}
