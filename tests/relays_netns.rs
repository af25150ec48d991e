//! A private node behind two relays, as on Exoscale with `--public-ip none`: the relays own
//! their NAT (`appliance reconcile`), the node spreads its links over them by destination
//! port, and losing one relay costs only the links through it.
//!
//! ```text
//!  gw ns: 10.10.0.2 (lo), 192.0.2.1 ─┐
//!                 relay1 192.0.2.2 ──┼── inet ns (bridge)
//!                 relay2 192.0.2.4 ──┘
//!  relay1 172.31.0.1 ─┐
//!  relay2 172.31.0.2 ─┼── private ns (bridge) ── c1 172.31.0.11 (no default route)
//! ```

mod common;
use common::*;
use std::time::{Duration, Instant};

struct Lab {
    gw: Netns,
    relays: [Netns; 2],
    node: Netns,
    _hubs: [Netns; 2],
    dir: std::path::PathBuf,
    procs: Vec<Proc>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.procs.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn status(ns: &Netns) -> serde_json::Value {
    let out = ns.appliance(&["status", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn live(ns: &Netns) -> Vec<u64> {
    let out = ns.appliance(&["status", "--output", "json"]);
    let Ok(s) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return vec![];
    };
    s["links"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["alive"] == true)
        .map(|l| l["link_index"].as_u64().unwrap())
        .collect()
}

fn wait(what: &str, lab: &Lab, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < timeout,
            "timed out waiting for {what}:\n{}",
            lab.procs
                .iter()
                .map(Proc::log)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lab() -> Lab {
    let (gw, r1, r2, node, inet, private) = (
        Netns::new(),
        Netns::new(),
        Netns::new(),
        Netns::new(),
        Netns::new(),
        Netns::new(),
    );
    let dir = std::env::temp_dir().join(format!("{}-relays", gw.name));
    std::fs::create_dir_all(&dir).unwrap();
    bridge(
        &inet,
        None,
        &[
            (&gw, "u0", "192.0.2.1/24"),
            (&r1, "pub0", "192.0.2.2/24"),
            (&r2, "pub0", "192.0.2.4/24"),
        ],
    );
    bridge(
        &private,
        None,
        &[
            (&r1, "priv0", "172.31.0.1/24"),
            (&r2, "priv0", "172.31.0.2/24"),
            (&node, "eth0", "172.31.0.11/24"),
        ],
    );
    gw.ip(&["addr", "add", "10.10.0.2/32", "dev", "lo"]);
    let (kg, kc) = (genkey(&dir, "gw1"), genkey(&dir, "c1"));
    std::fs::write(
        dir.join("site.kdl"),
        format!(
            "site \"lab\" {{\n asn 65010\n cloud-block \"10.200.0.0/16\"\n site-prefix \"10.10.0.0/16\"\n links 4\n keepalive-ms 200\n dead-after 3\n}}\n\
             gateway \"gw1\" {{\n endpoint \"192.0.2.1\"\n site-address \"10.10.0.2\"\n public-key \"{kg}\"\n}}\n\
             relay \"relay1\" {{\n public-address \"192.0.2.2\"\n private-address \"172.31.0.1\"\n}}\n\
             relay \"relay2\" {{\n public-address \"192.0.2.4\"\n private-address \"172.31.0.2\"\n}}\n\
             node \"c1\" {{\n address \"10.200.0.11\"\n public-key \"{kc}\"\n}}\n"
        ),
    )
    .unwrap();
    let cfg = dir.join("site.kdl");
    for (ns, name) in [(&r1, "relay1"), (&r2, "relay2")] {
        let o = ns.appliance(&["reconcile", "-c", cfg.to_str().unwrap(), "--node", name]);
        assert!(o.status.success(), "{name}: {}", text(&o));
    }
    let procs = vec![daemon(&gw, &dir, "gw1"), daemon(&node, &dir, "c1")];
    let lab = Lab {
        gw,
        relays: [r1, r2],
        node,
        _hubs: [inet, private],
        dir,
        procs,
    };
    wait("4 live links", &lab, Duration::from_secs(20), || {
        live(&lab.gw).len() == 4 && live(&lab.node).len() == 4
    });
    lab
}

#[test]
fn a_node_spreads_its_links_over_two_relays_and_survives_losing_one() {
    if !root_or_skip("relays") {
        return;
    }
    let lab = lab();
    // Links 0 and 2 leave through relay1, 1 and 3 through relay2: the gateway sees each
    // link's endpoint at that relay's public address.
    let s = status(&lab.gw);
    for l in s["links"].as_array().unwrap() {
        let i = l["link_index"].as_u64().unwrap();
        let want = if i % 2 == 0 {
            "192.0.2.2:"
        } else {
            "192.0.2.4:"
        };
        assert!(
            l["endpoint"].as_str().unwrap().starts_with(want),
            "link {i}: {l}"
        );
    }
    let routes = lab.node.ip(&["route", "show", "table", "17300"]);
    assert!(routes.contains("192.0.2.1 via 172.31.0.1"), "{routes}");

    // A 10 ms ping train from the node to the site while relay1 dies (its interfaces go
    // down: no FIN, nothing) and comes back.
    let sent = 800u64;
    let ping = Proc::spawn(
        &lab.node,
        &[
            "ping",
            "-n",
            "-D",
            "-i",
            "0.01",
            "-c",
            "800",
            "-W",
            "1",
            "-I",
            "10.200.0.11",
            "10.10.0.2",
        ],
        lab.dir.join("ping.log"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let relay1 = &lab.relays[0];
    for dev in ["pub0", "priv0"] {
        relay1.ip(&["link", "set", dev, "down"]);
    }
    let t_down = Instant::now();
    wait(
        "links through relay1 down",
        &lab,
        Duration::from_secs(5),
        || live(&lab.node) == [1, 3] && live(&lab.gw) == [1, 3],
    );
    let down_after = t_down.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    for dev in ["pub0", "priv0"] {
        relay1.ip(&["link", "set", dev, "up"]);
    }
    let t_up = Instant::now();
    wait("all links back", &lab, Duration::from_secs(10), || {
        live(&lab.node).len() == 4 && live(&lab.gw).len() == 4
    });
    let up_after = t_up.elapsed();
    let mut ping = ping;
    ping.child.wait().unwrap();
    let log = ping.log();
    assert!(
        ping_gaps(&log, sent)
            .last()
            .is_none_or(|g| g.0 + g.1 <= sent),
        "the ping train ended inside the outage"
    );
    let gap = timed_gaps(&log).iter().map(|g| g.1).max().unwrap_or(0);
    eprintln!(
        "relay1 lost: its links left after {down_after:?}, came back {up_after:?} after it did; longest ping gap {gap} ms"
    );
    assert!(gap <= 1000, "outage {gap} ms\n{log}");
    // Only relay1's links ever died, once each.
    let node_log = lab.procs[1].log();
    let downs = |i: u32| {
        node_log
            .lines()
            .filter(|l| l.contains("link down") && l.contains(&format!("link={i}")))
            .count()
    };
    assert_eq!(
        (downs(0), downs(1), downs(2), downs(3)),
        (1, 0, 1, 0),
        "{node_log}"
    );
}
