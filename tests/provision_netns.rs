//! An instance pool in namespaces: `appliance provision` keys a pool, and three "instances"
//! boot the one pool user-data with `appliance run --user-data` (the image's code path for
//! choosing the slot). Each has the address the provider's DHCP would lease it
//! (dhcp-start + i), becomes a distinct node and is reached from the site through both
//! gateways. A fourth instance claims slot 1 while burst-1 is live: the gateways refuse it and
//! say so, and burst-1 keeps its traffic.
//!
//! ```text
//!  site ns: bird2, 10.10.0.1 ──┬── gw1 10.10.0.2 / 192.0.2.1 ─┐
//!                              └── gw2 10.10.0.3 / 192.0.2.3 ─┼─ inet (bridge)
//!   burst instances 192.0.2.100, .101, .102; the claimant 192.0.2.120 ─┘
//! ```

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn ping_ok(ns: &Netns, addr: &str) -> bool {
    ns.exec(&["ping", "-c", "1", "-W", "1", addr])
        .status
        .success()
}

fn status_json(ns: &Netns) -> serde_json::Value {
    let o = ns.exec(&[BIN, "status", "-o", "json"]);
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

#[test]
fn instances_of_one_pool_user_data_become_distinct_nodes_and_a_second_claim_is_refused() {
    if !root_or_skip("pool_provision") {
        return;
    }
    let (site, gw1, gw2, inet, _c1, dir) = two_gateways("pool");
    let conf = dir.join("site.kdl");
    let mut kdl = std::fs::read_to_string(&conf).unwrap();
    kdl.push_str(
        "pool \"burst\" {\n prefix \"10.200.1.0/28\"\n count 8\n dhcp-start \"192.0.2.100\"\n}\n",
    );
    std::fs::write(&conf, kdl).unwrap();

    // Provision, twice: the second run changes nothing.
    let prov = dir.join("prov");
    let run_provision = || {
        let o = Command::new(BIN)
            .args(["provision", "-c", conf.to_str().unwrap(), "--pool", "burst"])
            .arg("--out")
            .arg(&prov)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let first = run_provision();
    assert!(
        first.contains("8 key(s) added") && first.contains("8 slot(s) validated"),
        "{first}"
    );
    assert!(first.contains("--public-ip none --cloud-init"), "{first}");
    let site_file = std::fs::read(prov.join("site.kdl")).unwrap();
    let second = run_provision();
    assert!(second.contains("nothing changed"), "{second}");
    assert_eq!(std::fs::read(prov.join("site.kdl")).unwrap(), site_file);
    eprintln!("provision:\n{first}");
    // The gateways run the provisioned site file.
    std::fs::copy(prov.join("site.kdl"), &conf).unwrap();
    let user_data = prov.join("burst.user-data");

    let bird_proc = bird_site_router(&site, &dir);
    let mut procs = vec![bird_proc];
    for (ns, host) in [(&gw1, "gw1"), (&gw2, "gw2")] {
        procs.push(daemon(ns, &dir, host));
    }
    // Three instances on the private network, as its DHCP would address them.
    let start = |i: usize, addr: &str, extra: &[&str]| {
        let ns = Netns::new();
        let port = format!("pi{i}");
        veth(&inet, &port, &ns, "wan");
        inet.ip(&["link", "set", &port, "master", "br0"]);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "wan"]);
        let mut args = vec![BIN, "run", "--user-data", user_data.to_str().unwrap()];
        args.extend_from_slice(extra);
        let p = Proc::spawn(&ns, &args, dir.join(format!("instance{i}.log")));
        (ns, p)
    };
    let t = Instant::now();
    let mut instances = vec![];
    for i in 0..3 {
        instances.push(start(i, &format!("192.0.2.{}", 100 + i), &[]));
    }
    for (i, (ns, p)) in instances.iter().enumerate() {
        let slot_addr = format!("10.200.1.{i}");
        while !ping_ok(&site, &slot_addr) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the site never reached instance {i} at {slot_addr}:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let s = status_json(ns);
        assert_eq!(s["host"], format!("burst-{i}"), "{s}");
        assert!(
            p.log()
                .contains(&format!("this machine is burst-{i} (node)")),
            "{}",
            p.log()
        );
    }
    let up = t.elapsed();
    // Reached through one gateway first; the other's path follows once its session is up.
    while {
        let both = site.ip(&["route", "show", "10.200.1.1"]);
        !(both.contains("via 10.10.0.2") && both.contains("via 10.10.0.3"))
    } {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "burst-1 never through both gateways: {}",
            site.ip(&["route", "show", "10.200.1.1"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("3 instances of one user-data: burst-0..2, reached from the site {up:?} after start");

    // A fourth instance claims slot 1 while burst-1 is live.
    let (dup_ns, dup) = start(3, "192.0.2.120", &["--slot", "1"]);
    let ping = site.exec(&["ping", "-q", "-c", "40", "-i", "0.1", "10.200.1.1"]);
    let refused = |ns: &Netns| -> u64 {
        status_json(ns)["links"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["peer"] == "burst-1")
            .map(|l| l["claims_refused"].as_u64().unwrap_or(0))
            .sum()
    };
    let t = Instant::now();
    while refused(&gw1) + refused(&gw2) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no claim refused:\n{}",
            dup.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (r1, r2) = (refused(&gw1), refused(&gw2));
    let log = procs[1].log() + &procs[2].log();
    assert!(
        log.contains("a second instance claims this peer's key") && log.contains("192.0.2.120"),
        "the gateways say so:\n{log}"
    );
    assert!(
        dup.log().contains("this machine is burst-1"),
        "{}",
        dup.log()
    );
    let dup_live = status_json(&dup_ns)["links"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["alive"] == true)
        .count();
    assert_eq!(dup_live, 0, "the claimant has no live link");
    assert!(
        text(&ping).contains(" 0% packet loss"),
        "burst-1 kept its traffic while claimed: {}",
        text(&ping)
    );
    eprintln!(
        "claimant of slot 1 at 192.0.2.120: gw1 refused {r1}, gw2 {r2} handshake(s); burst-1 lost no ping of 40"
    );
    drop(dup);
    drop(instances);
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}
