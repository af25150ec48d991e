//! `/metrics` scraped by a real Prometheus server (Debian's package), in namespaces:
//!
//! ```text
//!  site ns: bird2, Prometheus (127.0.0.1:9090), bridge 10.10.0.1/24 ──┬── gw1 10.10.0.2:9477
//!                                                                     └── gw2 10.10.0.3
//!  c1 (10.200.0.11:9477, reached from the site through the tunnels) ── inet bridge
//! ```
//! The site file sets `metrics-port 9477`, so each host serves on its own address. Prometheus
//! scrapes gw1 on the site LAN and c1 through the tunnels every second. The test asks
//! Prometheus' HTTP API (not the daemon) for the per-link byte counters while the site pings
//! c1, cuts one of c1's links and looks for the liveness transition, checks the exposition
//! with `promtool check metrics`, and runs every query of the shipped Grafana dashboard.

mod common;
use common::*;
use std::time::{Duration, Instant};

const PROM: &str = "127.0.0.1:9090";

/// An instant query against Prometheus' HTTP API, from inside `site`: the result vector.
fn query(site: &Netns, q: &str) -> Vec<serde_json::Value> {
    try_query(site, q).unwrap_or_else(|e| panic!("{e}"))
}

/// As [`query`], but an error while Prometheus is not listening yet.
fn try_query(site: &Netns, q: &str) -> Result<Vec<serde_json::Value>, String> {
    let out = site.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        &format!("http://{PROM}/api/v1/query"),
        "--data-urlencode",
        &format!("query={q}"),
    ]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{q}: {e}: {}", text(&out)))?;
    assert_eq!(v["status"], "success", "{q}: {v}");
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// The one value of a query that sums to a scalar (`None` while it has no series yet).
fn scalar(site: &Netns, q: &str) -> Option<f64> {
    let r = query(site, q);
    r.first()?["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_a_gateway_and_a_node_and_sees_bytes_grow_and_a_link_die() {
    if !root_or_skip("metrics_prometheus") {
        return;
    }
    let (site, gw1, gw2, _inet, c1, dir) = two_gateways("metrics");
    let conf = dir.join("site.kdl");
    let kdl = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        kdl.replacen("dead-after 3\n", "dead-after 3\n metrics-port 9477\n", 1),
    )
    .unwrap();
    let bird_proc = bird_site_router(&site, &dir);
    let mut procs = vec![bird_proc];
    for (ns, host) in [(&gw1, "gw1"), (&gw2, "gw2"), (&c1, "c1")] {
        procs.push(daemon(ns, &dir, host));
    }
    let prom_dir = dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom_conf = dir.join("prometheus.yml");
    std::fs::write(
        &prom_conf,
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
         scrape_configs:\n\
         \x20 - job_name: gw1\n    static_configs: [{targets: ['10.10.0.2:9477']}]\n\
         \x20 - job_name: c1\n    static_configs: [{targets: ['10.200.0.11:9477']}]\n",
    )
    .unwrap();
    procs.push(Proc::spawn(
        &site,
        &[
            "prometheus",
            &format!("--config.file={}", prom_conf.display()),
            &format!("--storage.tsdb.path={}", prom_dir.display()),
            &format!("--web.listen-address={PROM}"),
        ],
        dir.join("prometheus.log"),
    ));

    // Both targets up: gw1 on the LAN, c1 through the tunnels once bird routes its address.
    let up = wait_for("both targets scraped", Duration::from_secs(60), || {
        try_query(&site, "up == 1").is_ok_and(|r| r.len() == 2)
    });
    eprintln!("Prometheus scrapes gw1 and c1 {up:?} after start");

    // The per-link byte counters grow with traffic from the site to c1.
    let sent_q = r#"sum(appliance_link_transmit_bytes_total{job="gw1",peer="c1"})"#;
    let got_q = r#"sum(appliance_link_receive_bytes_total{job="c1",peer=~"gw.*"})"#;
    let (sent0, got0) = (
        scalar(&site, sent_q).unwrap(),
        scalar(&site, got_q).unwrap(),
    );
    let ping = site.exec(&[
        "ping",
        "-q",
        "-c",
        "300",
        "-i",
        "0.01",
        "-s",
        "1000",
        "10.200.0.11",
    ]);
    assert!(text(&ping).contains(" 0% packet loss"), "{}", text(&ping));
    // 300 echo requests of 1028 bytes each cross the tunnels (to either gateway).
    let mut grew = (0.0, 0.0);
    wait_for("the byte counters grew", Duration::from_secs(10), || {
        grew = (
            scalar(&site, got_q).unwrap() - got0,
            scalar(&site, sent_q).unwrap() - sent0,
        );
        grew.0 >= 300.0 * 1028.0
    });
    assert!(grew.1 > 0.0, "gw1 sent c1 nothing: {grew:?}");
    eprintln!(
        "after 300 pings of 1028 bytes: c1 received {} bytes more over its links, gw1 sent it {} more",
        grew.0, grew.1
    );

    // Cut c1's link 0 to gw1: both ends count a transition and report it dead.
    let flips_q = r#"appliance_link_liveness_transitions_total{job="c1",link="ap-gw1-0"}"#;
    let flips0 = scalar(&site, flips_q).unwrap();
    let cut = Instant::now();
    c1.exec(&["nft", "add", "table", "ip", "cut"]);
    c1.exec(&[
        "nft",
        "add chain ip cut out { type filter hook output priority 0; }",
    ]);
    let o = c1.exec(&[
        "nft",
        "add rule ip cut out ip daddr 192.0.2.1 udp dport 51820 drop",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    wait_for(
        "c1's link 0 dead in Prometheus",
        Duration::from_secs(10),
        || {
            scalar(
                &site,
                r#"appliance_link_up{job="c1",link="ap-gw1-0",peer="gw1"}"#,
            ) == Some(0.0)
                && scalar(
                    &site,
                    r#"appliance_link_up{job="gw1",link="ap-l0",peer="c1"}"#,
                ) == Some(0.0)
        },
    );
    let flips = scalar(&site, flips_q).unwrap();
    assert_eq!(flips, flips0 + 1.0, "one transition (to dead)");
    eprintln!(
        "c1's link 0 cut: dead in Prometheus (both ends) {:?} later; transitions {flips0} -> {flips}",
        cut.elapsed()
    );
    // The other links stay live.
    assert_eq!(
        scalar(&site, r#"sum(appliance_link_up{job="c1"})"#),
        Some(3.0)
    );

    // The exposition passes promtool's checks (format and naming lint).
    for (name, addr) in [("gw1", "10.10.0.2"), ("c1", "10.200.0.11")] {
        let body = site.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{addr}:9477/metrics"),
        ]);
        assert!(body.status.success(), "{}", text(&body));
        let file = dir.join(format!("{name}.metrics"));
        std::fs::write(&file, &body.stdout).unwrap();
        let check = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("promtool check metrics < {}", file.display()))
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "promtool check metrics on {name}:\n{}",
            text(&check)
        );
    }
    // Anything but GET /metrics is refused.
    let other = site.exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://10.10.0.2:9477/",
    ]);
    assert_eq!(String::from_utf8_lossy(&other.stdout), "404");

    // Every query of the shipped Grafana dashboard is valid and finds series.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("packaging/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = vec![];
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 6, "{exprs:?}");
    for e in &exprs {
        // Grafana's variables, as the dashboard's defaults fill them in.
        let q = e
            .replace("$__rate_interval", "5s")
            .replace("$job", ".*")
            .replace("$link", ".*");
        assert!(
            !query(&site, &q).is_empty(),
            "dashboard query finds nothing: {q}"
        );
    }
    eprintln!(
        "Grafana dashboard: {} queries, each finds series",
        exprs.len()
    );
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}
