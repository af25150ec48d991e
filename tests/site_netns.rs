//! The whole site (`tests/lab.sh`): bird2 as the site router, an NFS server on the site LAN,
//! two gateways, two relays, three private nodes. What a user of the cloud nodes sees: the
//! routes everywhere, NFS copies that checksum, and faults that cost less than a second.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Site {
    prefix: String,
    dir: PathBuf,
    /// WAN round trip added by the lab's delay forwarder.
    rtt_ms: u32,
    /// The site router: "bird" or "frr" (`LAB_ROUTER`).
    router: &'static str,
    /// Simulated nodes beside the three real ones (`LAB_SIM`).
    sim: u32,
}

impl Site {
    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn exec(&self, role: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(role)])
            .args(args)
            .output()
            .unwrap()
    }

    fn sh(&self, role: &str, cmd: &str) -> String {
        let o = self.exec(role, &["sh", "-c", cmd]);
        assert!(o.status.success(), "{role}: {cmd}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    fn status(&self, role: &str) -> serde_json::Value {
        let o = self.exec(role, &[BIN, "status", "--output", "json"]);
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    }

    fn live(&self, role: &str) -> usize {
        self.status(role)["links"]
            .as_array()
            .map_or(0, |l| l.iter().filter(|l| l["alive"] == true).count())
    }

    /// A lab of its own (namespaces `ap-t-PID-TAG-*`), up; returns it and what `up` printed.
    fn up(tag: &str, rtt_ms: u32, router: &'static str, sim: u32) -> (Site, String) {
        let prefix = format!("ap-t-{}-{tag}", std::process::id());
        let site = Site {
            dir: std::env::temp_dir().join(&prefix),
            prefix,
            rtt_ms,
            router,
            sim,
        };
        let up = site.lab("up");
        assert!(up.status.success(), "lab up:\n{}", text(&up));
        let shown = String::from_utf8_lossy(&up.stdout).to_string();
        (site, shown)
    }

    fn lab(&self, cmd: &str) -> std::process::Output {
        Command::new("bash")
            .arg(repo("tests/lab.sh"))
            .args([cmd, self.dir.to_str().unwrap()])
            .env("APPLIANCE_BIN", BIN)
            .env("LAB_PREFIX", &self.prefix)
            .env("LAB_RTT_MS", self.rtt_ms.to_string())
            .env("LAB_ROUTER", self.router)
            .env("LAB_SIM", self.sim.to_string())
            .output()
            .unwrap()
    }

    fn nfs_url(&self, name: &str) -> String {
        format!(
            "nfs://10.10.0.1{}/nfs-export/{name}?version=3",
            self.dir.display()
        )
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.lab("down");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sha256(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

fn random_file(path: &Path, mib: usize) {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {} /dev/urandom > {}",
            mib << 20,
            path.display()
        ))
        .status()
        .unwrap();
    assert!(o.success());
}

/// tx bytes per tunnel device of `role`'s daemon.
fn link_bytes(site: &Site, role: &str) -> Vec<(String, u64)> {
    site.status(role)["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["link"].as_str().unwrap().to_string(),
                l["tx_bytes"].as_u64().unwrap() + l["rx_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Copy `src` to the site over NFS from `node` while `fault` runs (it gets the site), with a
/// 10 ms ping train of `pings` probes from the node to the site, the fault starting 1 s in;
/// checks the copy back byte for byte and returns the ping train's silences as (Unix time of
/// the reply before, ms to the next reply). The train must outlast the fault: a silence at its
/// end has no reply after it and fails the check. `pings == 0`: no train (a copy under faults
/// that run on their own clock, which a train could not outlast), no silences.
fn copy_through(
    site: &Site,
    node: &str,
    name: &str,
    mib: usize,
    pings: u64,
    fault: impl FnOnce(&Site),
) -> Vec<(f64, u64)> {
    let src = site.dir.join(format!("{name}.src"));
    random_file(&src, mib);
    let url = site.nfs_url(name);
    let copy = Command::new("ip")
        .args(["netns", "exec", &site.ns(node), "nfs-cp"])
        .arg(&src)
        .arg(&url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ping = (pings > 0).then(|| {
        Command::new("ip")
            .args(["netns", "exec", &site.ns(node)])
            .args([
                "ping",
                "-n",
                "-D",
                "-i",
                "0.01",
                "-c",
                &pings.to_string(),
                "-W",
                "1",
            ])
            .args(["-I", "10.200.0.11", "10.10.0.1"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    });
    std::thread::sleep(Duration::from_secs(1));
    fault(site);
    let ping = ping.map(|p| p.wait_with_output().unwrap());
    let copy = copy.wait_with_output().unwrap();
    assert!(
        copy.status.success(),
        "nfs-cp: {}",
        String::from_utf8_lossy(&copy.stderr)
    );
    let back = site.dir.join(format!("{name}.back"));
    let o = site.exec(node, &["nfs-cp", &url, back.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        sha256(&src),
        sha256(&back),
        "{name}: corrupted through the fault"
    );
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&back);
    let Some(ping) = ping else {
        return Vec::new();
    };
    let out = String::from_utf8_lossy(&ping.stdout);
    let tail = ping_gaps(&out, pings);
    assert!(
        tail.last().is_none_or(|g| g.0 + g.1 <= pings),
        "{name}: the ping train ended inside the outage: {tail:?}"
    );
    timed_gaps(&out)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn longest(gaps: &[(f64, u64)]) -> u64 {
    gaps.iter().map(|g| g.1).max().unwrap_or(0)
}

/// Packets the kernel put into (or dropped at) `role`'s tunnel devices so far.
fn tunnel_packets(site: &Site, role: &str) -> u64 {
    let links: serde_json::Value =
        serde_json::from_str(&site.sh(role, "ip -s -j link show")).unwrap();
    tunnel_tx(&links, "ap-").iter().map(|t| t.1).sum()
}

/// How often `role`'s daemon has logged that its loop was blocked (not scheduled in time).
fn stalls(site: &Site, role: &str) -> usize {
    std::fs::read_to_string(site.dir.join(format!("{role}.log")))
        .unwrap_or_default()
        .matches("the daemon loop was blocked")
        .count()
}

/// PID of the lab's daemon for `role` (tests/lab.sh records every PID it starts).
fn daemon_pid(site: &Site, role: &str) -> i32 {
    let pids = std::fs::read_to_string(site.dir.join("pids")).unwrap();
    pids.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let pid = f.next()?.parse().ok()?;
            (f.next()? == role && f.any(|w| w == "run")).then_some(pid)
        })
        .next_back()
        .unwrap()
}

/// Start `role`'s daemon again as the lab does (`lab.sh run`), its PID recorded for `down`.
fn restart_daemon(site: &Site, role: &str) {
    let o = Command::new("bash")
        .arg(repo("tests/lab.sh"))
        .args(["run", role, site.dir.to_str().unwrap()])
        .env("APPLIANCE_BIN", BIN)
        .env("LAB_PREFIX", &site.prefix)
        .output()
        .unwrap();
    assert!(o.status.success(), "lab.sh run {role}: {}", text(&o));
}

/// NFS: 256 MiB to the site and back from c1, as four parallel 64 MiB copies, which the
/// kernel spreads over the links; every byte checks. Returns write and read Mbit/s and the
/// bytes each of c1's links carried.
fn nfs_256(site: &Site) -> (f64, f64, Vec<u64>) {
    let before = link_bytes(site, "c1");
    let files: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = site.dir.join(format!("par{i}.src"));
            random_file(&p, 64);
            p
        })
        .collect();
    let spawn_all = |out: bool| -> Vec<std::process::Child> {
        files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let url = site.nfs_url(&format!("par{i}"));
                let back = f.with_extension("back");
                let (from, to) = if out {
                    (f.to_str().unwrap().to_string(), url)
                } else {
                    (url, back.to_str().unwrap().to_string())
                };
                Command::new("ip")
                    .args(["netns", "exec", &site.ns("c1"), "nfs-cp", &from, &to])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect()
    };
    let t0 = Instant::now();
    for mut c in spawn_all(true) {
        assert!(c.wait().unwrap().success());
    }
    let t_write = t0.elapsed();
    let t1 = Instant::now();
    for mut c in spawn_all(false) {
        assert!(c.wait().unwrap().success());
    }
    let t_read = t1.elapsed();
    for f in &files {
        assert_eq!(
            sha256(f),
            sha256(&f.with_extension("back")),
            "{}",
            f.display()
        );
        let _ = std::fs::remove_file(f);
        let _ = std::fs::remove_file(f.with_extension("back"));
    }
    let after = link_bytes(site, "c1");
    let moved = after.iter().zip(&before).map(|(a, b)| a.1 - b.1).collect();
    let mbit = |t: Duration| 256.0 * 8.0 * 1.048576 / t.as_secs_f64();
    (mbit(t_write), mbit(t_read), moved)
}

/// Cut, silently for 2 s, the link c1's ping train to the site travels: its gateway drops that
/// link's UDP (nft, in the gateway's namespace).
fn cut_ping_link(site: &Site) {
    // The device the ping train leaves by: count echo requests per tunnel device.
    let mut rules = String::from(
        "add table inet probe\nadd chain inet probe out { type filter hook output priority 0; }\n",
    );
    for g in ["gw1", "gw2"] {
        for i in 0..4 {
            rules.push_str(&format!(
                "add rule inet probe out oifname \"ap-{g}-{i}\" icmp type echo-request counter comment \"ap-{g}-{i}\"\n"
            ));
        }
    }
    std::fs::write(site.dir.join("probe.nft"), rules).unwrap();
    site.sh(
        "c1",
        &format!("nft -f {}", site.dir.join("probe.nft").display()),
    );
    std::thread::sleep(Duration::from_millis(300));
    let listing = site.sh("c1", "nft list table inet probe");
    let dev = listing
        .lines()
        .filter_map(|l| {
            let n: u64 = l
                .split("counter packets ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let d = l
                .split("comment \"")
                .nth(1)?
                .trim_end_matches('"')
                .to_string();
            Some((n, d))
        })
        .max()
        .map(|(_, d)| d)
        .unwrap();
    site.sh("c1", "nft delete table inet probe");
    eprintln!("cutting {dev}, the ping train's link");
    // ap-gwN-i: drop link i's UDP at gateway gwN.
    let (gw, i) = dev.trim_start_matches("ap-").rsplit_once('-').unwrap();
    let port = 51820 + i.parse::<u16>().unwrap();
    site.sh(
        gw,
        &format!("nft add table inet cut && nft add chain inet cut in '{{ type filter hook input priority 0; }}' && nft add rule inet cut in udp dport {port} drop"),
    );
    std::thread::sleep(Duration::from_secs(2));
    site.sh(gw, "nft delete table inet cut");
}

static LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A 10 ms ping train with timestamps (`ping -D`) from `role`'s `src` to `dst`.
struct Train {
    ping: std::process::Child,
    count: u64,
    what: String,
}

impl Train {
    fn start(site: &Site, role: &str, src: &str, dst: &str, count: u64) -> Train {
        let ping = Command::new("ip")
            .args(["netns", "exec", &site.ns(role)])
            .args(["ping", "-n", "-D", "-i", "0.01", "-W", "1", "-c"])
            .arg(count.to_string())
            .args(["-I", src, dst])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        Train {
            ping,
            count,
            what: format!("{role} {src} -> {dst}"),
        }
    }

    /// The silences (Unix time they began, ms), checked to end before the train did.
    fn gaps(self) -> Vec<(f64, u64)> {
        let out = self.ping.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout).to_string();
        let tail = ping_gaps(&out, self.count);
        assert!(
            tail.last().is_none_or(|g| g.0 + g.1 <= self.count),
            "{}: the ping train ended inside the outage: {tail:?}",
            self.what
        );
        timed_gaps(&out)
    }
}

/// Flows that cross gw2: a site source address whose flows to c1 the site router hashes onto
/// gw2 (its ECMP hash is over the addresses), and a site address whose echo requests from c1
/// leave by one of gw2's links (c1 hashes over ports too, so this is measured with counters).
fn flows_via_gw2(site: &Site) -> (String, String) {
    let mut from_site = None;
    let mut to_site = None;
    for i in 50..80 {
        let a = format!("10.10.0.{i}");
        site.sh("site", &format!("ip addr replace {a}/24 dev br0"));
        if from_site.is_none()
            && site
                .sh("site", &format!("ip route get 10.200.0.11 from {a}"))
                .contains("via 10.10.0.3")
        {
            from_site = Some(a.clone());
        }
        if to_site.is_none() {
            let rules = (0..4)
                .flat_map(|l| ["gw1", "gw2"].map(|g| format!("ap-{g}-{l}")))
                .map(|d| format!("add rule inet via out oifname \"{d}\" icmp type echo-request counter comment \"{d}\"\n"))
                .collect::<String>();
            let f = site.dir.join("via.nft");
            std::fs::write(
                &f,
                format!("add table inet via\nadd chain inet via out {{ type filter hook output priority 0; }}\n{rules}"),
            )
            .unwrap();
            site.sh("c1", &format!("nft -f {}", f.display()));
            site.sh(
                "c1",
                &format!("ping -c 3 -i 0.05 -W 1 -I 10.200.0.11 {a} > /dev/null"),
            );
            let listing = site.sh("c1", "nft list table inet via");
            site.sh("c1", "nft delete table inet via");
            if listing
                .lines()
                .any(|l| l.contains("ap-gw2") && !l.contains("packets 0 "))
            {
                to_site = Some(a);
            }
        }
        if let (Some(f), Some(t)) = (&from_site, &to_site) {
            return (f.clone(), t.clone());
        }
    }
    panic!("no flow hashed onto gw2: {from_site:?} {to_site:?}")
}

/// gw2's paths at the site router and c1's links to it, both back: no duplicates anywhere, and
/// nothing left for a reconcile to do on gw2 or c1.
fn gw2_back(site: &Site, what: &str) -> Duration {
    let t = Instant::now();
    loop {
        let r = site.sh("site", "ip route show 10.200.0.11");
        if site.live("c1") == 8 && r.contains("via 10.10.0.2") && r.contains("via 10.10.0.3") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what}: gw2 did not come back: {r}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let back = t.elapsed();
    // The other nodes' links too, before comparing gw2 with its plan (which routes every node).
    while site.live("gw2") < 12 || ["c2", "c3"].iter().any(|c| site.live(c) < 8) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what}: c2 and c3 did not get gw2 back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = site.sh("site", "ip route show 10.200.0.11");
    assert_eq!(r.matches("via 10.10.0.3").count(), 1, "{what}: {r}");
    for role in ["gw2", "c1"] {
        let routes = site.sh(role, "ip -o route show table all proto 173");
        let mut keys: Vec<&str> = routes.lines().collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(
            keys.len(),
            n,
            "{what}: duplicate routes on {role}:\n{routes}"
        );
        let plan = site.exec(
            role,
            &[
                BIN,
                "reconcile",
                "-c",
                site.dir.join("site.kdl").to_str().unwrap(),
                "--node",
                role,
                "--dry-run",
            ],
        );
        assert_eq!(
            plan.status.code(),
            Some(0),
            "{what}: stale state on {role}: {}",
            text(&plan)
        );
    }
    back
}

/// The longest silence of a train, and how long after `at` the silence spanning `at` ended
/// (0 when the train never fell silent there).
fn outage(gaps: &[(f64, u64)], at: f64) -> (u64, u64) {
    let spanning = gaps
        .iter()
        .filter(|g| g.0 <= at + 0.05 && g.0 + g.1 as f64 / 1000.0 > at)
        .map(|g| ((g.0 + g.1 as f64 / 1000.0 - at) * 1000.0).round() as u64)
        .max()
        .unwrap_or(0);
    (longest(gaps), spanning)
}

/// Gateway faults with traffic from the site: an iperf3 stream from the site to c1 and 10 ms
/// ping trains site → c1 and c1 → site, each on a flow that crosses gw2, and an NFS copy.
/// First gw2 lost without a word (links down, every process in its namespace SIGKILLed),
/// then back; then gw2's daemon alone SIGKILLed and restarted 1 s later, as the image's
/// supervisor does. Returns the figures for the log.
fn gateway_faults(site: &Site) -> String {
    let (src, dst) = flows_via_gw2(site);
    eprintln!("flows via gw2: site {src} -> c1, c1 -> site {dst}");
    let iperf_server = Command::new("ip")
        .args(["netns", "exec", &site.ns("c1")])
        .args(["iperf3", "-s", "-1", "-B", "10.200.0.11"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let iperf = Command::new("ip")
        .args(["netns", "exec", &site.ns("site")])
        .args(["iperf3", "-c", "10.200.0.11", "-B", &src, "-t", "7", "-J"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let nfs_src = site.dir.join("gwloss.src");
    random_file(&nfs_src, 32);
    let nfs = Command::new("ip")
        .args(["netns", "exec", &site.ns("c1"), "nfs-cp"])
        .arg(&nfs_src)
        .arg(site.nfs_url("gwloss"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let from_site = Train::start(site, "site", &src, "10.200.0.11", 500);
    let from_node = Train::start(site, "c1", "10.200.0.11", &dst, 500);
    std::thread::sleep(Duration::from_secs(1));

    // gw2 lost: its links down, then every process in its namespace killed.
    let lost_at = unix_now();
    for dev in ["lan", "pub"] {
        site.sh("gw2", &format!("ip link set {dev} down"));
    }
    let pids = run("ip", &["netns", "pids", &site.ns("gw2")]);
    assert!(!pids.trim().is_empty(), "nothing runs in gw2");
    for pid in pids.split_whitespace() {
        run("kill", &["-KILL", pid]);
    }
    let t = Instant::now();
    while site
        .sh("site", "ip route show 10.200.0.11")
        .contains("10.10.0.3")
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the site router kept gw2"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let router_drop = t.elapsed();
    while site.live("c1") > 4 {
        assert!(t.elapsed() < Duration::from_secs(10), "c1 kept gw2's links");
        std::thread::sleep(Duration::from_millis(10));
    }
    let node_drop = t.elapsed();
    let (site_gaps, node_gaps) = (from_site.gaps(), from_node.gaps());
    let iperf = iperf.wait_with_output().unwrap();
    let _ = iperf_server.wait_with_output();
    let (j, avg) = iperf_result(&iperf, "through the gateway loss");
    let rates: Vec<f64> = j["intervals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sum"]["bits_per_second"].as_f64().unwrap() / 1e6)
        .collect();
    let nfs = nfs.wait_with_output().unwrap();
    assert!(
        nfs.status.success(),
        "nfs-cp: {}",
        String::from_utf8_lossy(&nfs.stderr)
    );
    let back = site.dir.join("gwloss.back");
    let o = site.exec(
        "c1",
        &["nfs-cp", &site.nfs_url("gwloss"), back.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        sha256(&nfs_src),
        sha256(&back),
        "NFS copy corrupted by the gateway loss"
    );
    let (loss_site, _) = outage(&site_gaps, lost_at);
    let (loss_node, _) = outage(&node_gaps, lost_at);
    let r = site.sh("c1", "ip route show 10.10.0.0/16 proto 173 metric 20");
    assert!(!r.contains("ap-gw2"), "c1 still routes via gw2: {r}");
    let mbit: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    eprintln!(
        "gw2 lost: site router dropped it after {router_drop:?}, c1 after {node_drop:?}; ping gaps site->c1 {loss_site} ms, c1->site {loss_node} ms; iperf3 site->c1 {avg:.0} Mbit/s, per second {mbit:?}"
    );
    // Target 1 s (BFD 100 ms x 3, liveness 300 ms); asserted with margin for a loaded
    // 2-core machine.
    assert!(
        loss_site <= 1000 && loss_node <= 1000,
        "{site_gaps:?} {node_gaps:?}"
    );
    assert!(node_drop <= Duration::from_millis(1500), "{node_drop:?}");
    // The stream never stopped for a whole second.
    assert!(rates.iter().all(|r| *r > 1.0), "iperf3 stalled: {mbit:?}");

    // gw2 back: links up, daemon restarted.
    for dev in ["lan", "pub"] {
        site.sh("gw2", &format!("ip link set {dev} up"));
    }
    restart_daemon(site, "gw2");
    let returned = gw2_back(site, "gw2 returned");

    // gw2's daemon crashes (links stay up) and its supervisor restarts it 1 s later.
    let from_site = Train::start(site, "site", &src, "10.200.0.11", 500);
    let from_node = Train::start(site, "c1", "10.200.0.11", &dst, 500);
    std::thread::sleep(Duration::from_secs(1));
    let killed = unix_now();
    run("kill", &["-KILL", &daemon_pid(site, "gw2").to_string()]);
    std::thread::sleep(Duration::from_secs(1));
    let restarted = unix_now();
    restart_daemon(site, "gw2");
    let crash_back = gw2_back(site, "gw2's daemon restarted");
    let (site_gaps, node_gaps) = (from_site.gaps(), from_node.gaps());
    let (crash_site, _) = outage(&site_gaps, killed);
    let (crash_node, _) = outage(&node_gaps, killed);
    let (_, after_site) = outage(&site_gaps, restarted);
    let (_, after_node) = outage(&node_gaps, restarted);
    eprintln!(
        "gw2's daemon crashed, restarted 1 s later: ping gaps site->c1 {crash_site} ms, c1->site {crash_node} ms (silent after the restart: {after_site} ms, {after_node} ms); both paths {crash_back:?} after the restart"
    );
    // The crash is a gateway loss the site router hears of at once (the kernel closes the
    // BGP socket: graceful restart is helper-only) and c1 by liveness: the same second.
    assert!(
        crash_site <= 1000 && crash_node <= 1000,
        "{site_gaps:?} {node_gaps:?}"
    );
    assert!(
        after_site <= 1000 && after_node <= 1000,
        "{site_gaps:?} {node_gaps:?}"
    );
    format!(
        "gateway lost: site router {} ms, c1 {} ms, ping gaps {loss_site}/{loss_node} ms, iperf3 {avg:.0} Mbit/s (slowest second {:.0}), back {:.2} s; daemon crash + restart: gaps {crash_site}/{crash_node} ms, paths back {:.2} s after the restart",
        router_drop.as_millis(),
        node_drop.as_millis(),
        rates.iter().cloned().fold(f64::MAX, f64::min),
        returned.as_secs_f64(),
        crash_back.as_secs_f64()
    )
}

#[test]
fn the_site_end_to_end_nfs_routes_and_faults() {
    if !root_or_skip("site") {
        return;
    }
    let _one = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let (site, shown) = Site::up("lab", 0, "bird", 0);
    eprintln!("{shown}");

    // bird holds every node prefix with one nexthop per gateway.
    for n in ["10.200.0.11", "10.200.0.12", "10.200.0.13"] {
        let r = site.sh("site", &format!("ip route show {n} proto bird"));
        assert!(
            r.contains("via 10.10.0.2") && r.contains("via 10.10.0.3"),
            "{n}: {r}"
        );
    }
    // Every node holds the site prefixes over all 8 (gateway, link) devices, and no node
    // holds another node's prefix.
    for (i, c) in ["c1", "c2", "c3"].iter().enumerate() {
        assert_eq!(site.live(c), 8, "{c}");
        let r = site.sh(c, "ip route show 10.10.0.0/16 proto 173 metric 20");
        assert_eq!(r.matches("nexthop dev ap-gw").count(), 8, "{c}: {r}");
        let all = site.sh(c, "ip route show proto 173");
        for other in (1..=3).filter(|j| *j != i + 1) {
            assert!(
                !all.contains(&format!("10.200.0.1{other} ")),
                "{c} holds c{other}'s prefix:\n{all}"
            );
        }
    }

    let (w, r, moved) = nfs_256(&site);
    eprintln!(
        "NFS 256 MiB from c1: write {w:.0} Mbit/s, read {r:.0} Mbit/s; bytes per link {moved:?}"
    );
    let total: u64 = moved.iter().sum();
    let busy = moved.iter().filter(|m| **m * 10 >= total).count();
    assert!(
        busy >= 2,
        "the copies did not spread over the links: {moved:?}"
    );

    // Faults during a copy and a 10 ms ping train, each with its outage and the checksum.
    // One link cut silently: the one the ping train's flow is hashed onto.
    let gaps = copy_through(&site, "c1", "cut", 96, 600, cut_ping_link);
    let gap = longest(&gaps);
    eprintln!("link cut under NFS: longest ping gap {gap} ms");
    // Liveness deadline 300 ms (keepalive 100 ms, dead after 3); the node hears of it one
    // probe later. Target 0.5 s; asserted with margin for a loaded 2-core machine.
    assert!(gap <= 750, "{gap} ms");
    let cut = gap;

    // One of the two relays lost (its interfaces down) 1 s into the ping train, restored 2 s
    // later: the silences before the restore are the loss, those after it the return.
    let mut restored = 0.0;
    let gaps = copy_through(&site, "c1", "relay", 96, 600, |site| {
        for dev in ["pub", "priv"] {
            site.sh("relay1", &format!("ip link set {dev} down"));
        }
        std::thread::sleep(Duration::from_secs(2));
        restored = unix_now();
        for dev in ["pub", "priv"] {
            site.sh("relay1", &format!("ip link set {dev} up"));
        }
    });
    let (lost, back): (Vec<_>, Vec<_>) = gaps.iter().partition(|g| g.0 < restored);
    let (lost, back) = (longest(&lost), longest(&back));
    eprintln!("relay under NFS: lost {lost} ms, restored {back} ms (gaps {gaps:?})");
    assert!(lost <= 1000 && back <= 1000, "{gaps:?}");
    let t = Instant::now();
    while site.live("c1") < 8 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "links did not come back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // c1's daemon SIGKILLed under a copy, restarted 2 s later (as a supervisor would):
    // nothing enters its dead devices meanwhile, the copy checks, no stale or duplicate routes.
    let mut entered = u64::MAX;
    let mut t_restart = Duration::ZERO;
    let (mut killed, mut restarted) = (0.0, 0.0);
    let gaps = copy_through(&site, "c1", "crash", 96, 1000, |site| {
        killed = unix_now();
        run("kill", &["-KILL", &daemon_pid(site, "c1").to_string()]);
        let t = Instant::now();
        while !site
            .sh("c1", "ip -o link show")
            .lines()
            .filter(|l| l.contains(": ap-"))
            .all(|l| l.contains("NO-CARRIER"))
        {
            assert!(t.elapsed() < Duration::from_secs(10), "carrier stayed");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Packets the kernel had already routed when the carrier went (sockets' cached
        // routes, queued segments) may still land; what must not is a steady stream.
        std::thread::sleep(Duration::from_millis(200));
        let before = tunnel_packets(site, "c1");
        std::thread::sleep(
            Duration::from_millis(2000) - t.elapsed().min(Duration::from_millis(1500)),
        );
        entered = tunnel_packets(site, "c1") - before;
        let t = Instant::now();
        restarted = unix_now();
        restart_daemon(site, "c1");
        while site.live("c1") < 8 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "c1 did not come back"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        t_restart = t.elapsed();
    });
    let crash = longest(&gaps);
    // The silence spanning the crash ends with the first reply after the restart.
    let replied = gaps
        .iter()
        .find(|g| g.0 <= killed + 0.05 && g.0 + g.1 as f64 / 1000.0 > restarted)
        .map(|g| g.0 + g.1 as f64 / 1000.0 - restarted);
    let Some(replied) = replied else {
        panic!("no silence spans the crash: {gaps:?}")
    };
    let replied = (replied * 1000.0).round() as u64;
    eprintln!(
        "c1's daemon killed under NFS: site silent {crash} ms, of which {replied} ms after the restart (down {:.0} ms); all 8 links live {t_restart:?} after the restart; {entered} packets into dead devices",
        (restarted - killed) * 1000.0
    );
    // The ping train alone sends 100 packets a second and the copy thousands: a route left on
    // a dead device shows as hundreds. CI has seen 1 or 2 stray packets in the window, not
    // from the workload's flows (their count does not grow with the window): tolerated, shown.
    assert!(
        entered <= 3,
        "{entered} packets went into c1's dead tunnel devices"
    );
    // Back within a second of the restart: links, routes and the BGP session (which dials
    // the moment the links are live, not after its 2 s retry).
    assert!(replied <= 1000, "{replied} ms after the restart");
    let routes = site.sh("c1", "ip -o route show table all proto 173");
    let mut keys: Vec<&str> = routes.lines().collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys.len(),
        n,
        "duplicate routes after the restart:\n{routes}"
    );
    let r = site.sh("c1", "ip route show 10.10.0.0/16 proto 173 metric 20");
    assert_eq!(r.matches("nexthop dev ap-gw").count(), 8, "{r}");
    let plan = site.exec(
        "c1",
        &[
            BIN,
            "reconcile",
            "-c",
            site.dir.join("site.kdl").to_str().unwrap(),
            "--node",
            "c1",
            "--dry-run",
        ],
    );
    assert_eq!(
        plan.status.code(),
        Some(0),
        "stale state after the restart: {}",
        text(&plan)
    );
    let r = site.sh("site", "ip route show 10.200.0.11 proto bird");
    assert!(
        r.contains("via 10.10.0.2") && r.contains("via 10.10.0.3"),
        "{r}"
    );
    eprintln!("outages: link cut {cut} ms, relay lost {lost} ms, relay back {back} ms, node daemon crash {crash} ms ({replied} ms after its restart)");

    // Gateway gw2 lost under traffic from the site, back, then its daemon crashed and restarted.
    let figures = gateway_faults(&site);
    eprintln!("bird: {figures}");

    // One link (gw1's link 0) flapping every second for 20 s while c1 keeps copying: every
    // copy checks, and c1 logs exactly one down and one up per flap.
    let log_before = std::fs::read_to_string(site.dir.join("c1.log")).unwrap_or_default();
    let count = |log: &str, what: &str| {
        log.lines()
            .filter(|l| l.contains(what) && l.contains("peer=gw1") && l.contains("link=0"))
            .count()
    };
    let (downs0, ups0) = (
        count(&log_before, "link down"),
        count(&log_before, "link up"),
    );
    let flaps = 20;
    let flapper = {
        let gw = site.ns("gw1");
        std::thread::spawn(move || {
            let nft = |cmd: &str| {
                let o = Command::new("ip")
                    .args(["netns", "exec", &gw, "sh", "-c", cmd])
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{cmd}: {}", text(&o));
            };
            nft("nft add table inet flap && nft add chain inet flap in '{ type filter hook input priority 0; }'");
            for _ in 0..flaps {
                nft("nft add rule inet flap in udp dport 51820 drop");
                std::thread::sleep(Duration::from_millis(500));
                nft("nft flush chain inet flap in");
                std::thread::sleep(Duration::from_millis(500));
            }
            nft("nft delete table inet flap");
        })
    };
    let mut copies = 0;
    while !flapper.is_finished() {
        copy_through(&site, "c1", &format!("flap{copies}"), 32, 0, |_| {});
        copies += 1;
    }
    flapper.join().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let log = std::fs::read_to_string(site.dir.join("c1.log")).unwrap_or_default();
    let (downs, ups) = (
        count(&log, "link down") - downs0,
        count(&log, "link up") - ups0,
    );
    eprintln!("{flaps} flaps: {copies} NFS copies intact; c1 logged {downs} down, {ups} up for gw1 link 0");
    assert_eq!((downs, ups), (flaps, flaps), "one down and one up per flap");
}

#[test]
fn nfs_through_the_site_at_20_ms_rtt() {
    if !root_or_skip("site_rtt") {
        return;
    }
    let _one = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let (site, _) = Site::up("wan", 20, "bird", 0);
    let ping = site.exec(
        "c1",
        &[
            "ping",
            "-c",
            "5",
            "-i",
            "0.2",
            "-I",
            "10.200.0.11",
            "10.10.0.1",
        ],
    );
    let out = String::from_utf8_lossy(&ping.stdout);
    let avg: f64 = out
        .lines()
        .find(|l| l.contains("rtt min/avg"))
        .and_then(|l| l.split('/').nth(4))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(avg >= 20.0, "the forwarder did not add the delay: {out}");
    let (w, r, moved) = nfs_256(&site);
    eprintln!(
        "NFS 256 MiB from c1 at {avg:.1} ms RTT: write {w:.0} Mbit/s, read {r:.0} Mbit/s; bytes per link {moved:?}"
    );
    // The ping train's link cut at this RTT: liveness is measured on the wire, so the outage
    // is the same detection time plus a round trip.
    let gap = longest(&copy_through(&site, "c1", "cut", 32, 600, cut_ping_link));
    eprintln!("link cut under NFS at {avg:.1} ms RTT: longest ping gap {gap} ms");
    assert!(gap <= 750, "{gap} ms");
}

/// The same gateway faults with FRR (zebra, bfdd, bgpd: the README's snippet) as the site
/// router instead of bird.
#[test]
fn gateway_faults_with_frr_as_the_site_router() {
    if !root_or_skip("site_frr") {
        return;
    }
    let _one = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let (site, _) = Site::up("frr", 0, "frr", 0);
    let bfd = site.sh(
        "site",
        &format!(
            "vtysh --vty_socket {} -c 'show bfd peers brief'",
            site.dir.join("frr").display()
        ),
    );
    assert_eq!(
        bfd.matches(" up ").count(),
        2,
        "FRR's BFD with both gateways: {bfd}"
    );
    for n in ["10.200.0.11", "10.200.0.12", "10.200.0.13"] {
        let r = site.sh("site", &format!("ip route show {n} proto bgp"));
        assert!(
            r.contains("via 10.10.0.2") && r.contains("via 10.10.0.3"),
            "{n}: {r}"
        );
    }
    let figures = gateway_faults(&site);
    eprintln!("FRR: {figures}");
}

/// BGP sessions of `role`'s daemon: name → (state, since, last error).
fn sessions(site: &Site, role: &str) -> std::collections::BTreeMap<String, (String, u64, String)> {
    site.status(role)["bgp"]["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                (
                    s["state"].as_str().unwrap_or_default().to_string(),
                    s["since_unix_s"].as_u64().unwrap_or_default(),
                    s["last_error"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect()
}

/// Node prefixes the site router holds with one nexthop per gateway, and all it holds.
fn two_path_prefixes(site: &Site) -> (usize, usize) {
    let routes = site.sh("site", "ip -o route show root 10.200.0.0/16 proto bird");
    let both = routes
        .lines()
        .filter(|l| l.contains("nexthop via 10.10.0.2") && l.contains("nexthop via 10.10.0.3"))
        .count();
    (both, routes.lines().count())
}

/// Resident memory (KiB) and CPU time (s) of `role`'s daemon.
fn daemon_usage(site: &Site, role: &str) -> (u64, f64) {
    let pid = daemon_pid(site, role);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    (rss, ticks / 100.0)
}

/// The routing plane at 250 nodes: the two real gateways (their policy, their session with each
/// other and with bird) serve 3 real nodes and 247 simulated iBGP clients (a bird each, over a
/// veth instead of tunnels), and node "big", which announces two /29s where its assignment is
/// one /28, so its own max-prefix (1) trips every time it reconnects; nothing else does.
#[test]
fn the_routing_plane_holds_at_250_nodes() {
    if !root_or_skip("site_scale") {
        return;
    }
    let _one = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let (site, _) = Site::up("scale", 0, "bird", 247);
    let converged = t.elapsed();
    let expect = 5 + site.sim as usize; // site router, the other gateway, c1..c3, the simulated
    let check = |what: &str| {
        for gw in ["gw1", "gw2"] {
            let s = sessions(&site, gw);
            assert_eq!(s.len(), expect + 1, "{gw}: {s:?}");
            let down: Vec<_> = s
                .iter()
                .filter(|(n, v)| v.0 != "Established" && *n != "big")
                .collect();
            assert!(down.is_empty(), "{what}: {gw}: sessions down: {down:?}");
            let big = &s["big"];
            assert_ne!(
                big.0, "Established",
                "{gw}: big over its assignment: {big:?}"
            );
        }
        let (both, all) = two_path_prefixes(&site);
        assert_eq!(
            (both, all),
            (250, 250),
            "{what}: the site router's node prefixes"
        );
        let birds = site.sh(
            "site",
            &format!(
                "birdc -s {} show route count",
                site.dir.join("bird.ctl").display()
            ),
        );
        assert!(
            birds.contains("500 of 500 routes for 250 networks in table master4"),
            "{what}: two paths for each of the 250 node prefixes: {birds}"
        );
        let big = site.sh("site", "ip route show root 10.200.5.0/24");
        assert!(
            big.is_empty(),
            "{what}: big's routes reached the site router: {big}"
        );
    };
    check("after start");
    let before: Vec<_> = ["gw1", "gw2"].map(|g| sessions(&site, g)).into();
    let trips = |gw: &str| {
        std::fs::read_to_string(site.dir.join(format!("{gw}.log")))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("max-prefix 1 exceeded") && l.contains("peer=big"))
            .count()
    };
    let trips0 = trips("gw1");
    let usage0 = daemon_usage(&site, "gw1");
    std::thread::sleep(Duration::from_secs(20));
    let usage1 = daemon_usage(&site, "gw1");
    check("20 s later");
    // Every session but big's is the same one as 20 s before, and big tripped again meanwhile.
    for (i, gw) in ["gw1", "gw2"].iter().enumerate() {
        let now = sessions(&site, gw);
        for (name, v) in &before[i] {
            if name != "big" {
                assert_eq!(
                    now[name].1, v.1,
                    "{gw}: the session with {name} restarted: {:?}",
                    now[name]
                );
            }
        }
    }
    let tripped = trips("gw1") - trips0;
    assert!(
        tripped >= 2,
        "big reconnects every 5 s and trips each time: {tripped}"
    );
    let cpu = (usage1.1 - usage0.1) / 20.0 * 100.0;
    eprintln!(
        "250 nodes: converged {converged:?} after lab up began; gw1 {} MiB resident, {cpu:.1} % of a core; big tripped {tripped} times in 20 s, nothing else restarted",
        usage1.0 / 1024
    );

    // gw2's daemon restarted (SIGTERM, as an operator's restart): the site router and all 250
    // nodes get it back, and nothing else moves.
    let stalls0 = ["gw1", "c1", "c2", "c3"].map(|r| stalls(&site, r));
    let pid = daemon_pid(&site, "gw2");
    run("kill", &["-TERM", &pid.to_string()]);
    let t = Instant::now();
    while two_path_prefixes(&site).0 > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "gw2's paths stayed after its stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let withdrawn = t.elapsed();
    // Restarted once it has exited, as a supervisor does.
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "gw2's daemon ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let exited = t.elapsed();
    restart_daemon(&site, "gw2");
    let t = Instant::now();
    loop {
        let s = sessions(&site, "gw2");
        let up = s.values().filter(|v| v.0 == "Established").count();
        if up == expect && two_path_prefixes(&site).0 == 250 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "gw2 did not get its 250 nodes back: {up} sessions, {:?} prefixes",
            two_path_prefixes(&site)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let back = t.elapsed();
    let gw1_now = sessions(&site, "gw1");
    // A session may only have moved if its links went dead because a loop was not scheduled
    // in time (the shared machine's load, logged by the daemon as a blocked loop): counted,
    // reported, tolerated. Any other restart fails.
    let stalled: Vec<_> = ["gw1", "c1", "c2", "c3"]
        .iter()
        .zip(stalls0)
        .filter(|(r, n)| stalls(&site, r) > *n)
        .map(|(r, _)| *r)
        .collect();
    let mut moved = vec![];
    for (name, v) in &before[0] {
        if name != "big" && name != "gw2" {
            if gw1_now[name].1 != v.1 && !stalled.is_empty() && name.starts_with('c') {
                moved.push(name.clone());
                continue;
            }
            assert_eq!(
                gw1_now[name].1,
                v.1,
                "gw1's session with {name} restarted: {:?}\n{}",
                gw1_now[name],
                std::fs::read_to_string(site.dir.join(format!("{name}.log")))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| !l.contains("applied change"))
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    assert!(
        moved.len() <= 1,
        "gw1's sessions with {moved:?} restarted ({stalled:?} logged a blocked loop)"
    );
    if !moved.is_empty() {
        eprintln!("250 nodes: gw1's session with {moved:?} restarted after {stalled:?} logged a blocked loop (machine load)");
    }
    eprintln!(
        "250 nodes: gw2 stopped: its paths left the site router in {withdrawn:?}, it exited after {exited:?}; restarted: all 250 nodes and both paths each back in {back:?}"
    );
    check("after gw2's restart");
}

/// Watches the TCP connections of `role` to `dst` (ADDR:PORT) until stopped: every local
/// port seen established. One connection that lives through a fault is one port; a reset the
/// application recovered from by reconnecting (libnfs does) shows as a second one.
struct ConnWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: std::thread::JoinHandle<std::collections::BTreeSet<String>>,
}

impl ConnWatch {
    fn start(site: &Site, role: &str, dst: &str) -> ConnWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ns, dst, flag) = (site.ns(role), dst.to_string(), stop.clone());
        let seen = std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let o = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &ns,
                        "ss",
                        "-tnH",
                        "state",
                        "established",
                        "dst",
                        &dst,
                    ])
                    .output()
                    .unwrap();
                for l in String::from_utf8_lossy(&o.stdout).lines() {
                    if let Some(local) = l.split_whitespace().nth(2) {
                        seen.insert(local.to_string());
                    }
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            seen
        });
        ConnWatch { stop, seen }
    }

    fn stop(self) -> std::collections::BTreeSet<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.seen.join().unwrap()
    }
}

/// The gateways the site router routes `addr` through.
fn site_paths(site: &Site, addr: &str) -> Vec<&'static str> {
    let r = site.sh("site", &format!("ip route show {addr} proto bird"));
    [("10.10.0.2", "gw1"), ("10.10.0.3", "gw2")]
        .into_iter()
        .filter(|(a, _)| r.contains(&format!("via {a}")))
        .map(|(_, g)| g)
        .collect()
}

/// The devices c1 routes the site prefix through.
fn c1_site_devs(site: &Site) -> Vec<String> {
    let r = site.sh("c1", "ip route show 10.10.0.0/16 proto 173 metric 20");
    let words: Vec<&str> = r.split_whitespace().collect();
    let devs: std::collections::BTreeSet<String> = words
        .windows(2)
        .filter(|w| w[0] == "dev")
        .map(|w| w[1].to_string())
        .collect();
    devs.into_iter().collect()
}

/// `appliance drain gw1`, during an iperf3 run from the site to c1 (4 streams, spread over
/// both gateways) and an NFS copy from c1: the site router drops gw1's paths, c1 routes the
/// site around gw1 while its links to gw1 stay live, no TCP connection is reset anywhere and
/// the copy's checksum matches. Then gw1's daemon is stopped and started again (it stays
/// drained: the site file says so) and undrained, with the same result.
#[test]
fn a_drained_gateway_cuts_no_connection_and_stays_drained_through_a_restart() {
    if !root_or_skip("gateway_drain") {
        return;
    }
    let _one = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let (site, _) = Site::up("drain", 0, "bird", 0);
    let conf = site.dir.join("site.kdl");
    assert_eq!(site_paths(&site, "10.200.0.11"), ["gw1", "gw2"]);
    let iperf = Iperf::start(&site, 16);
    let iperf_conns = ConnWatch::start(&site, "site", "10.200.0.11:5201");
    let mut nfs_conns = None;
    let drain = |verb: &str| {
        let o = site.exec("gw1", &[BIN, verb, "gw1", "-c", conf.to_str().unwrap()]);
        assert!(o.status.success(), "{verb}: {}", text(&o));
        text(&o)
    };
    let mut figures = vec![];
    let gaps = copy_through(&site, "c1", "drain", 384, 1400, |site| {
        let nfs = ConnWatch::start(site, "c1", "10.10.0.1:2049");
        // Drain.
        let said = drain("drain");
        assert!(
            said.contains("now drained") && said.contains("daemon: config reloaded"),
            "{said}"
        );
        let left = wait_for("the site router drops gw1", Duration::from_secs(5), || {
            site_paths(site, "10.200.0.11") == ["gw2"]
        });
        let around = wait_for("c1 routes around gw1", Duration::from_secs(5), || {
            c1_site_devs(site).iter().all(|d| d.starts_with("ap-gw2-"))
        });
        assert_eq!(site.live("c1"), 8, "c1's links to gw1 stay up");
        let s = site.status("gw1");
        assert_eq!(s["drained"], true, "{s}");
        figures.push(format!(
            "drain: site router dropped gw1 in {left:?}, c1 routed around it in {around:?}"
        ));
        // Stop and start gw1's daemon: still drained.
        let pid = daemon_pid(site, "gw1");
        run("kill", &["-TERM", &pid.to_string()]);
        wait_for("gw1's daemon exits", Duration::from_secs(10), || {
            !Path::new(&format!("/proc/{pid}")).exists()
        });
        restart_daemon(site, "gw1");
        let back = wait_for("gw1's links back", Duration::from_secs(20), || {
            site.status("gw1")["links"].as_array().is_some_and(|l| {
                l.iter()
                    .filter(|l| l["alive"] == true && l["peer"] == "c1")
                    .count()
                    == 4
            })
        });
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            site_paths(site, "10.200.0.11"),
            ["gw2"],
            "restarted, still drained"
        );
        assert!(c1_site_devs(site).iter().all(|d| d.starts_with("ap-gw2-")));
        figures.push(format!(
            "gw1 restarted drained: links back in {back:?}, no path announced"
        ));
        // Undrain.
        let said = drain("undrain");
        assert!(said.contains("now in service"), "{said}");
        let again = wait_for(
            "the site router takes gw1 back",
            Duration::from_secs(10),
            || site_paths(site, "10.200.0.11") == ["gw1", "gw2"],
        );
        let spread = wait_for(
            "c1 routes over both gateways",
            Duration::from_secs(5),
            || c1_site_devs(site).len() == 8,
        );
        figures.push(format!(
            "undrain: site router took gw1 back in {again:?}, c1 spread over 8 links in {spread:?}"
        ));
        nfs_conns = Some(nfs.stop());
    });
    let nfs_conns = nfs_conns.unwrap();
    let mbit = iperf.finish("through drain, restart and undrain");
    let iperf_conns = iperf_conns.stop();
    // The control connection and the 4 streams, each the same connection throughout.
    assert_eq!(
        iperf_conns.len(),
        5,
        "iperf3's connections: {iperf_conns:?}"
    );
    assert_eq!(
        nfs_conns.len(),
        1,
        "the NFS copy's connection: {nfs_conns:?}"
    );
    let gap = longest(&gaps);
    for f in &figures {
        eprintln!("{f}");
    }
    eprintln!(
        "drain, restart, undrain under iperf3 (4 streams, {mbit:.0} Mbit/s average) and a 384 MiB NFS copy: 0 connections reset (iperf3 5, NFS 1, each the same throughout), copy checksum matches, longest ping gap {gap} ms"
    );
    assert!(gap <= 1000, "{gaps:?}");
}

/// iperf3 from the site to c1, 4 streams: the server on c1 and the client in the site's
/// namespace, started and given a second to reach full speed.
struct Iperf {
    server: std::process::Child,
    client: std::process::Child,
}

impl Iperf {
    fn start(site: &Site, secs: u32) -> Iperf {
        let server = Command::new("ip")
            .args(["netns", "exec", &site.ns("c1")])
            .args(["iperf3", "-s", "-1", "-B", "10.200.0.11"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let client = Command::new("ip")
            .args(["netns", "exec", &site.ns("site")])
            .args(["iperf3", "-c", "10.200.0.11", "-P", "4", "-J", "-t"])
            .arg(secs.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(1));
        Iperf { server, client }
    }

    /// Wait for the end: it succeeded and all 4 streams lasted to it. Returns Mbit/s.
    fn finish(self, what: &str) -> f64 {
        let out = self.client.wait_with_output().unwrap();
        let _ = self.server.wait_with_output();
        let (j, mbit) = iperf_result(&out, what);
        assert_eq!(
            j["end"]["streams"].as_array().map_or(0, |s| s.len()),
            4,
            "every iperf3 stream lasted to the end"
        );
        mbit
    }
}

/// Handshakes so far per (link, peer) on `role`, for the peers live there.
fn handshakes(site: &Site, role: &str) -> std::collections::BTreeMap<(String, String), u64> {
    site.status(role)["links"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["alive"] == true)
        .map(|l| {
            (
                (
                    l["link"].as_str().unwrap_or("").to_string(),
                    l["peer"].as_str().unwrap_or("").to_string(),
                ),
                l["handshakes"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Liveness transitions so far on `role`, all links.
fn flips(site: &Site, role: &str) -> u64 {
    site.status(role)["links"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["transitions"].as_u64().unwrap_or(0))
        .sum()
}

/// `appliance rotate-key` for gw1 and then for c1, during one iperf3 run from the site to
/// c1 (4 streams over both gateways): each host moves its links to its next key one at a
/// time, every one of its live (link, peer) pairs handshakes exactly once more, no TCP
/// connection is reset; after `--finish` a real WireGuard peer (wireguard-go) holding c1's
/// old key is refused by gw1: no handshake, counted as an unknown key, not as a claim.
#[test]
fn keys_rotate_under_load_without_a_reset_and_the_old_key_is_refused() {
    if !root_or_skip("key_rotation") {
        return;
    }
    let _one = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let (site, _) = Site::up("rotate", 0, "bird", 0);
    let conf = site.dir.join("site.kdl");
    let conf_s = conf.to_str().unwrap().to_string();
    let iperf = Iperf::start(&site, 40);
    let conns = ConnWatch::start(&site, "site", "10.200.0.11:5201");
    let reload = |roles: &[&str]| {
        for r in roles {
            let o = site.exec(r, &[BIN, "reconcile", "-c", &conf_s]);
            assert!(o.status.success(), "reload {r}: {}", text(&o));
        }
    };
    let rotate = |host: &str, finish: bool| {
        let key = site.dir.join(format!("{host}.key"));
        let mut args = vec![
            BIN,
            "rotate-key",
            host,
            "-c",
            &conf_s,
            "-k",
            key.to_str().unwrap(),
        ];
        if finish {
            args.push("--finish");
        }
        let o = site.exec(host, &args);
        assert!(o.status.success(), "rotate-key {host}: {}", text(&o));
        text(&o)
    };
    let mut figures = vec![];
    let c1_old_key = site.dir.join("c1-old.key");
    std::fs::copy(site.dir.join("c1.key"), &c1_old_key).unwrap();
    for (host, peers, links) in [
        ("gw1", &["c1", "c2", "c3", "gw2"][..], 12),
        ("c1", &["gw1", "gw2", "c2", "c3"][..], 8),
    ] {
        let flips0 = flips(&site, host);
        let before = handshakes(&site, host);
        assert_eq!(
            before.len(),
            links,
            "{host}'s live (link, peer) pairs: {before:?}"
        );
        let t = Instant::now();
        let said = rotate(host, false);
        assert!(said.contains("daemon: config reloaded"), "{said}");
        // The peers take the next key (in the lab they share the one site file).
        reload(peers);
        let moved = wait_for(
            &format!("{host}'s links all on the next key"),
            Duration::from_secs(60),
            || {
                let s = site.status(host);
                let k = &s["key"];
                k["next_public_key"].is_string()
                    && k["links_on_target"] == k["links"]
                    && k["moving"].is_null()
            },
        );
        let s = site.status(host);
        let next = s["key"]["next_public_key"].as_str().unwrap().to_string();
        assert!(
            s["devices"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["public_key"] == next.as_str()),
            "every link device runs on {next}: {s}"
        );
        assert_eq!(s["key"]["reverts"], 0, "no move was given up: {s}");
        let after = handshakes(&site, host);
        for (pair, n) in &before {
            assert_eq!(
                after.get(pair).map(|a| a - n),
                Some(1),
                "{host} {pair:?}: one handshake moves the link ({n} before, {:?} after)",
                after.get(pair)
            );
        }
        let said = rotate(host, true);
        assert!(said.contains("retired"), "{said}");
        reload(peers);
        assert_eq!(
            site.status(host)["key"]["public_key"],
            next.as_str(),
            "{host} runs on its new key as its only key"
        );
        figures.push(format!(
            "{host}: {links} (link, peer) pairs moved to the next key in {moved:?} (total {:?}), one handshake each, {} liveness transition(s) meanwhile",
            t.elapsed(),
            flips(&site, host) - flips0
        ));
    }
    // gw1 after c1's rotation: c1's old key is unknown. wireguard-go in c1's namespace, with
    // that key, dials gw1's link 0 as c1 does.
    let gw1_ep = site.status("c1")["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["link"] == "ap-gw1-0")
        .and_then(|l| l["endpoint"].as_str().map(String::from))
        .unwrap();
    let gw1_key = site.status("gw1")["key"]["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let counts = || {
        let s = site.status("gw1");
        let invalid = s["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["link"] == "ap-l0")
            .map_or(0, |d| d["invalid"].as_u64().unwrap_or(0));
        let claims: u64 = s["links"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["peer"] == "c1")
            .map(|l| l["claims_refused"].as_u64().unwrap_or(0))
            .sum();
        (invalid, claims)
    };
    let (invalid0, claims0) = counts();
    let wg_log = std::fs::File::create(site.dir.join("wggo-old.log")).unwrap();
    let mut wg = Command::new("ip")
        .args([
            "netns",
            "exec",
            &site.ns("c1"),
            "wireguard-go",
            "-f",
            "wgold",
        ])
        .stdout(wg_log.try_clone().unwrap())
        .stderr(wg_log)
        .spawn()
        .unwrap();
    wait_for("wireguard-go's device", Duration::from_secs(10), || {
        site.exec("c1", &["ip", "link", "show", "wgold"])
            .status
            .success()
    });
    site.sh(
        "c1",
        &format!(
            "wg set wgold private-key {} peer {gw1_key} allowed-ips 10.10.0.0/16 endpoint {gw1_ep} persistent-keepalive 1 && ip link set wgold up",
            c1_old_key.display()
        ),
    );
    let refused = wait_for("gw1 refuses c1's old key", Duration::from_secs(10), || {
        counts().0 > invalid0
    });
    std::thread::sleep(Duration::from_secs(2));
    let hs = site.sh("c1", "wg show wgold latest-handshakes");
    let (invalid1, claims1) = counts();
    let _ = wg.kill();
    let _ = wg.wait();
    assert!(
        hs.trim().ends_with("\t0"),
        "wireguard-go with the retired key never completes a handshake: {hs:?}"
    );
    assert_eq!(
        claims1, claims0,
        "an unknown key, not a claim on a known one"
    );
    figures.push(format!(
        "c1's retired key (wireguard-go): refused in {refused:?}, {} handshake(s) dropped as unknown, none answered",
        invalid1 - invalid0
    ));

    let mbit = iperf.finish("through both rotations");
    let conns = conns.stop();
    assert_eq!(
        conns.len(),
        5,
        "iperf3's connections, each the same throughout: {conns:?}"
    );
    for f in &figures {
        eprintln!("{f}");
    }
    for role in ["gw1", "c1"] {
        let log = std::fs::read_to_string(site.dir.join(format!("{role}.log"))).unwrap_or_default();
        for l in log
            .lines()
            .filter(|l| l.contains("key rotation") || l.contains("link down"))
        {
            eprintln!("{role}: {l}");
        }
    }
    eprintln!("key rotation of gw1 and c1 under iperf3 (4 streams, {mbit:.0} Mbit/s average): 0 connections reset");
}
