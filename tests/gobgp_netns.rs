//! The embedded route reflector against GoBGP, an independent BGP implementation, in namespaces:
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

/// The attribute of type code `code` (3 NEXT_HOP, 9 ORIGINATOR_ID, 10 CLUSTER_LIST) of a path.
fn attr(path: &Value, code: u64) -> Option<&Value> {
    path["attrs"]
        .as_array()?
        .iter()
        .find(|a| a.get("type").and_then(Value::as_u64) == Some(code))
}

#[test]
fn gobgp_receives_a_reflected_client_route_with_originator_id_and_cluster_list() {
    if !root_or_skip("gobgp_interop") {
        return;
    }
    let (site, gw1, inet, c1) = (Netns::new(), Netns::new(), Netns::new(), Netns::new());
    let dir = std::env::temp_dir().join(format!("{}-gobgp", site.name));
    std::fs::create_dir_all(&dir).unwrap();
    // Site LAN: gobgpd on the bridge itself.
    bridge(
        &site,
        Some("10.10.0.9/24"),
        &[(&gw1, "lan", "10.10.0.2/24")],
    );
    bridge(
        &inet,
        None,
        &[(&gw1, "wan", "192.0.2.1/24"), (&c1, "wan", "192.0.2.11/24")],
    );
    bgp_site(
        &dir,
        &[("gw1", "192.0.2.1", "10.10.0.2")],
        ("gobgp", "10.10.0.9"),
    );
    // Both sides connect actively and accept on port 179; either session wins.
    let gobgp_conf = dir.join("gobgpd.toml");
    std::fs::write(
        &gobgp_conf,
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
    )
    .unwrap();
    let api = format!("127.0.0.1:{API_PORT}");
    let mut procs = vec![Proc::spawn(
        &site,
        &[
            "gobgpd",
            "-f",
            gobgp_conf.to_str().unwrap(),
            "-t",
            "toml",
            "--api-hosts",
            &api,
            "--pprof-disable",
        ],
        dir.join("gobgpd.log"),
    )];
    for (ns, host) in [(&gw1, "gw1"), (&c1, "c1")] {
        procs.push(daemon(ns, &dir, host));
    }
    let logs = |procs: &[Proc]| {
        procs
            .iter()
            .map(Proc::log)
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
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
