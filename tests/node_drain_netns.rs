//! Draining a node before it is evicted, in the two-gateway lab with bird as the site router:
//! `appliance drain c1` on c1 refuses new connections from the site at once while a running
//! iperf3 transfer goes on to its end; once c1's tunnels are quiet it withdraws its prefix
//! (bird drops it) and says it can be evicted; `undrain` brings it back.

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// A TCP connect from `ns` to ADDR:PORT within 2 s (python: no netcat needed).
fn connects(ns: &Netns, addr: &str, port: u16) -> bool {
    ns.exec(&[
        "/usr/bin/python3",
        "-c",
        &format!(
            "import socket,sys\ns=socket.socket()\ns.settimeout(2)\ntry:\n s.connect(('{addr}',{port}))\nexcept OSError:\n sys.exit(1)\n"
        ),
    ])
    .status
    .success()
}

#[test]
fn a_draining_node_refuses_new_connections_keeps_running_ones_and_withdraws_once_quiet() {
    if !root_or_skip("node_drain") {
        return;
    }
    let (site, gw1, gw2, _inet, c1, dir) = two_gateways("ndrain");
    let bird_proc = bird_site_router(&site, &dir);
    let mut procs = vec![bird_proc];
    for (ns, host) in [(&gw1, "gw1"), (&gw2, "gw2"), (&c1, "c1")] {
        procs.push(daemon(ns, &dir, host));
    }
    let routed = || !site.ip(&["route", "show", "10.200.0.11"]).is_empty();
    wait_for("bird routes c1", Duration::from_secs(40), routed);
    // A listener on c1 for new connections, and a long transfer already running.
    let _listener = Proc::spawn(
        &c1,
        &[
            "/usr/bin/python3",
            "-c",
            "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('10.200.0.11',8080))\ns.listen(64)\nwhile True:\n c,_=s.accept()\n c.close()\n",
        ],
        dir.join("listener.log"),
    );
    wait_for("the listener answers", Duration::from_secs(5), || {
        connects(&site, "10.200.0.11", 8080)
    });
    let server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c1.name,
            "iperf3",
            "-s",
            "-1",
            "-B",
            "10.200.0.11",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let iperf = Command::new("ip")
        .args(["netns", "exec", &site.name])
        .args(["iperf3", "-c", "10.200.0.11", "-t", "5", "-J"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));

    let drained_at = Instant::now();
    let o = c1.exec(&[BIN, "drain", "c1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("c1 draining: new connections refused"),
        "{}",
        text(&o)
    );
    assert!(
        !connects(&site, "10.200.0.11", 8080),
        "a new connection got through"
    );
    let st = c1.exec(&[BIN, "status"]);
    assert!(text(&st).contains("DRAINING"), "{}", text(&st));
    assert!(routed(), "still routed while its flows run");
    let iperf = iperf.wait_with_output().unwrap();
    let _ = server.wait_with_output();
    let (_, mbit) = iperf_result(&iperf, "the running transfer was cut");
    let transfer_end = drained_at.elapsed();

    // Quiet, then withdrawn: the site router loses c1.
    wait_for(
        "bird drops c1 once it is quiet",
        Duration::from_secs(20),
        || !routed(),
    );
    let withdrawn_after = drained_at.elapsed();
    let st = c1.exec(&[BIN, "status", "-o", "json"]);
    let s: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(s["node_drain"]["withdrawn"], true, "{s}");
    let refused = s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["refused_syns"].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert!(refused >= 1, "{s}");
    eprintln!(
        "c1 drained under iperf3 ({mbit:.0} Mbit/s to its end, {transfer_end:?} after the drain): new connections refused ({refused} SYNs), bird lost c1 {withdrawn_after:?} after the drain"
    );

    // Back in service.
    let o = c1.exec(&[BIN, "undrain", "c1"]);
    assert!(
        o.status.success() && text(&o).contains("back in service"),
        "{}",
        text(&o)
    );
    wait_for("bird routes c1 again", Duration::from_secs(10), routed);
    wait_for(
        "new connections are taken again",
        Duration::from_secs(5),
        || connects(&site, "10.200.0.11", 8080),
    );
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}
