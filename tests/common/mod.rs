//! Shared helpers for tests that need root and network namespaces.
//!
//! Every namespace gets a unique name (`ap-t-PID-N`) and is deleted by `Drop`, so it goes away
//! when a test fails or panics too. Nothing here touches the root namespace.
#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_appliance");

/// True when the test may run; false (and a note) when not root outside CI. In CI (CI=true)
/// a missing privilege is a failure, not a skip.
pub fn root_or_skip(test: &str) -> bool {
    let root = nix_is_root();
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: CI must run the namespace tests as root"
        );
        eprintln!("skipping {test}: needs root for network namespaces");
    }
    root
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

pub struct Netns {
    pub name: String,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Netns {
    pub fn new() -> Netns {
        let name = format!(
            "ap-t-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `ip -n NS -j ARGS` parsed as JSON.
    pub fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.ip(&full);
        if out.trim().is_empty() {
            return serde_json::Value::Array(vec![]);
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {out}"))
    }

    /// Run a command inside the namespace; returns its output whatever the exit status.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .expect("ip netns exec")
    }

    /// Run `appliance ARGS` inside the namespace.
    pub fn appliance(&self, args: &[&str]) -> Output {
        let mut cmd = vec![BIN];
        cmd.extend_from_slice(args);
        self.exec(&cmd)
    }

    pub fn sysctl(&self, key: &str) -> String {
        let out = self.exec(&["sysctl", "-n", key]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Everything a user could notice about the namespace: links (name, flags, mtu, alias),
    /// addresses, all routes of all tables, and the sysctls appliance may change. Taken once
    /// the namespace is settled: the kernel updates operstate flags (NO-CARRIER) from its
    /// linkwatch work up to a second after a change.
    pub fn snapshot(&self) -> String {
        let mut last = self.snapshot_once();
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(250));
            let now = self.snapshot_once();
            if now == last {
                return now;
            }
            last = now;
        }
        last
    }

    fn snapshot_once(&self) -> String {
        let links: Vec<String> = self
            .ip_json(&["-d", "link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                format!(
                    "{} {} mtu={} alias={}",
                    l["ifname"],
                    l["flags"],
                    l["mtu"],
                    l.get("ifalias").cloned().unwrap_or_default()
                )
            })
            .collect();
        let addrs = self.ip(&["addr", "show"]);
        let routes4 = self.ip(&["route", "show", "table", "all"]);
        let routes6 = self.ip(&["-6", "route", "show", "table", "all"]);
        let sysctls: Vec<String> = ["net.ipv4.ip_forward", "net.ipv4.fib_multipath_hash_policy"]
            .iter()
            .map(|k| format!("{k}={}", self.sysctl(k)))
            .collect();
        format!(
            "links:\n{}\naddrs:\n{addrs}\nroutes:\n{routes4}{routes6}\nsysctls: {}\n",
            links.join("\n"),
            sysctls.join(" ")
        )
    }

    /// Our routes as (destination, metric, [devices]) from `ip -j route`.
    pub fn our_routes(&self) -> Vec<(String, u64, Vec<String>)> {
        let mut v = Vec::new();
        for fam in ["-4", "-6"] {
            for r in self
                .ip_json(&[fam, "route", "show", "proto", "173"])
                .as_array()
                .unwrap()
            {
                let mut devs: Vec<String> = match r.get("nexthops") {
                    Some(hops) => hops
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|h| h["dev"].as_str().unwrap().to_string())
                        .collect(),
                    None => r
                        .get("dev")
                        .and_then(|d| d.as_str())
                        .map(|d| vec![d.to_string()])
                        .unwrap_or_default(),
                };
                devs.sort();
                let dst = r["dst"].as_str().unwrap().to_string();
                let dst = if dst.contains('/') {
                    dst
                } else if dst.contains(':') {
                    format!("{dst}/128")
                } else {
                    format!("{dst}/32")
                };
                let metric = r.get("metric").and_then(|m| m.as_u64()).unwrap_or(0);
                v.push((dst, metric, devs));
            }
        }
        v.sort();
        v
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn repo(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// A process started in a namespace, ended by PID when dropped.
pub struct Proc {
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Proc {
    pub fn spawn(ns: &Netns, args: &[&str], log: std::path::PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn");
        Proc { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        run("kill", &[sig, &self.child.id().to_string()]);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A veth pair between two namespaces, both ends up.
pub fn veth(a: &Netns, an: &str, b: &Netns, bn: &str) {
    run(
        "ip",
        &[
            "-n", &a.name, "link", "add", an, "type", "veth", "peer", "name", bn, "netns", &b.name,
        ],
    );
    a.ip(&["link", "set", an, "up"]);
    b.ip(&["link", "set", bn, "up"]);
}

/// A new key pair from `appliance genkey`: the private key in DIR/NAME.key (mode 0600); returns
/// the public key.
pub fn genkey(dir: &std::path::Path, name: &str) -> String {
    let key = dir.join(format!("{name}.key"));
    let out = Command::new(BIN).arg("genkey").output().unwrap();
    std::fs::write(&key, &out.stdout).unwrap();
    run("chmod", &["600", key.to_str().unwrap()]);
    pubkey_of(&key)
}

/// The public key of the private key file `key`, from `appliance pubkey`.
pub fn pubkey_of(key: &std::path::Path) -> String {
    let pubkey = Command::new("sh")
        .arg("-c")
        .arg(format!("{BIN} pubkey < {}", key.display()))
        .output()
        .unwrap();
    String::from_utf8(pubkey.stdout).unwrap().trim().to_string()
}

/// An iperf3 client's `-J` output, which must have succeeded (`what` says during what), and
/// its received Mbit/s.
pub fn iperf_result(out: &Output, what: &str) -> (serde_json::Value, f64) {
    assert!(out.status.success(), "iperf3 {what}: {}", text(out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mbit = j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6;
    (j, mbit)
}

/// `appliance run` for `host` in `ns` with DIR/site.kdl and DIR/HOST.key, logging to DIR/HOST.log.
pub fn daemon(ns: &Netns, dir: &std::path::Path, host: &str) -> Proc {
    daemon_with(ns, dir, host, &[], &[])
}

/// [`daemon`] with `env` (`NAME=VALUE`) in its environment and more arguments to
/// `appliance run`.
pub fn daemon_with(
    ns: &Netns,
    dir: &std::path::Path,
    host: &str,
    env: &[&str],
    extra: &[&str],
) -> Proc {
    let (cfg, key) = (dir.join("site.kdl"), dir.join(format!("{host}.key")));
    let mut args = vec!["env"];
    args.extend_from_slice(env);
    args.extend_from_slice(&[
        BIN,
        "run",
        "-c",
        cfg.to_str().unwrap(),
        "--node",
        host,
        "-k",
        key.to_str().unwrap(),
    ]);
    args.extend_from_slice(extra);
    Proc::spawn(ns, &args, dir.join(format!("{host}.log")))
}

/// A bridge `br0` in `hub` (addressed `hub_addr` if given) with each `(ns, dev, addr)` attached
/// through a veth whose `ns` end is `dev` with address `addr`.
pub fn bridge(hub: &Netns, hub_addr: Option<&str>, members: &[(&Netns, &str, &str)]) {
    hub.ip(&["link", "add", "br0", "type", "bridge"]);
    hub.ip(&["link", "set", "br0", "up"]);
    if let Some(a) = hub_addr {
        hub.ip(&["addr", "add", a, "dev", "br0"]);
    }
    for (i, (ns, dev, addr)) in members.iter().enumerate() {
        let port = format!("p{i}");
        veth(hub, &port, ns, dev);
        hub.ip(&["link", "set", &port, "master", "br0"]);
        ns.ip(&["addr", "add", addr, "dev", dev]);
    }
}

/// The iBGP labs' site file in DIR/site.kdl: gateways `(name, endpoint, site address)`, node
/// c1 at 10.200.0.11, one site-router neighbour `(name, address)`; keys made in DIR.
/// `node_extra` goes inside node c1's block (more prefixes, `bgp-speaker "external"`).
pub fn bgp_site(
    dir: &std::path::Path,
    gateways: &[(&str, &str, &str)],
    neighbors: &[(&str, &str)],
    node_extra: &str,
) {
    let mut s = String::from(
        "site \"lab\" {\n asn 65010\n cloud-block \"10.200.0.0/16\"\n site-prefix \"10.10.0.0/16\"\n links 2\n keepalive-ms 200\n dead-after 3\n}\n",
    );
    for (name, endpoint, site_address) in gateways {
        let k = genkey(dir, name);
        s.push_str(&format!(
            "gateway \"{name}\" {{\n endpoint \"{endpoint}\"\n site-address \"{site_address}\"\n public-key \"{k}\"\n}}\n"
        ));
    }
    let kc = genkey(dir, "c1");
    s.push_str(&format!(
        "node \"c1\" {{\n address \"10.200.0.11\"\n public-key \"{kc}\"\n{node_extra}\n}}\n"
    ));
    s.push_str("bgp {\n hold-time 30\n");
    for (name, address) in neighbors {
        s.push_str(&format!(
            " neighbor \"{name}\" {{\n address \"{address}\"\n }}\n"
        ));
    }
    s.push_str("}\n");
    std::fs::write(dir.join("site.kdl"), s).unwrap();
}

/// bird2 in `ns` named `name`, with config `conf`: its files are `dir/NAME.{conf,ctl,pid,log}`.
/// Returns the process and the control socket's path (for `birdc -s`).
pub fn bird(ns: &Netns, dir: &std::path::Path, name: &str, conf: &str) -> (Proc, String) {
    let file = |ext: &str| dir.join(format!("{name}.{ext}"));
    std::fs::write(file("conf"), format!("log stderr all;\n{conf}")).unwrap();
    let sock = file("ctl").to_str().unwrap().to_string();
    let p = Proc::spawn(
        ns,
        &[
            "bird",
            "-f",
            "-c",
            file("conf").to_str().unwrap(),
            "-s",
            &sock,
            "-P",
            file("pid").to_str().unwrap(),
        ],
        file("log"),
    );
    (p, sock)
}

/// The nexthop gateways of `prefix` in `ns`'s kernel table (bird's kernel protocol exports).
/// TX packets plus TX drops (what the kernel put into each, or dropped at it) of every device
/// whose name starts with `prefix`, from `ip -s -j link show`.
pub fn tunnel_tx(links: &serde_json::Value, prefix: &str) -> Vec<(String, u64)> {
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            let name = l["ifname"].as_str().filter(|n| n.starts_with(prefix))?;
            let tx = &l["stats64"]["tx"];
            let n = tx["packets"].as_u64().unwrap_or(0) + tx["dropped"].as_u64().unwrap_or(0);
            Some((name.to_string(), n))
        })
        .collect()
}

/// Wait up to `within` until `ns`'s kernel routes `prefix` via exactly `want` (sorted);
/// returns how long it took. `what` names the wait in the failure.
pub fn wait_nexthops(
    ns: &Netns,
    prefix: &str,
    want: &[&str],
    within: std::time::Duration,
    what: &str,
) -> std::time::Duration {
    let t = std::time::Instant::now();
    while kernel_nexthops(ns, prefix) != want {
        assert!(
            t.elapsed() < within,
            "{what}: {prefix} via {:?}, not {want:?}",
            kernel_nexthops(ns, prefix)
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    t.elapsed()
}

pub fn kernel_nexthops(ns: &Netns, prefix: &str) -> Vec<String> {
    let fam = if prefix.contains(':') { "-6" } else { "-4" };
    let v = ns.ip_json(&[fam, "route", "show", prefix]);
    let mut hops: Vec<String> = Vec::new();
    for r in v.as_array().into_iter().flatten() {
        if let Some(nh) = r.get("nexthops").and_then(|n| n.as_array()) {
            hops.extend(
                nh.iter()
                    .filter_map(|h| h["gateway"].as_str().map(String::from)),
            );
        } else if let Some(g) = r["gateway"].as_str() {
            hops.push(g.to_string());
        }
    }
    hops.sort();
    hops
}

/// The two-gateway iBGP lab: a site bridge 10.10.0.1/24 (in `site`) with gw1 at .2 and gw2 at
/// .3 on their `lan`; an internet bridge (in `inet`) with gw1 192.0.2.1, gw2 192.0.2.3 and c1
/// 192.0.2.11 on their `wan`; a scratch directory holding keys and the site file of
/// [`bgp_site`] (site router 10.10.0.1). Returns (site, gw1, gw2, inet, c1, dir).
pub fn two_gateways(tag: &str) -> (Netns, Netns, Netns, Netns, Netns, std::path::PathBuf) {
    let (site, gw1, gw2, inet, c1) = (
        Netns::new(),
        Netns::new(),
        Netns::new(),
        Netns::new(),
        Netns::new(),
    );
    let dir = std::env::temp_dir().join(format!("{}-{tag}", site.name));
    std::fs::create_dir_all(&dir).unwrap();
    bridge(
        &site,
        Some("10.10.0.1/24"),
        &[(&gw1, "lan", "10.10.0.2/24"), (&gw2, "lan", "10.10.0.3/24")],
    );
    bridge(
        &inet,
        None,
        &[
            (&gw1, "wan", "192.0.2.1/24"),
            (&gw2, "wan", "192.0.2.3/24"),
            (&c1, "wan", "192.0.2.11/24"),
        ],
    );
    bgp_site(
        &dir,
        &[
            ("gw1", "192.0.2.1", "10.10.0.2"),
            ("gw2", "192.0.2.3", "10.10.0.3"),
        ],
        &[("site-router", "10.10.0.1")],
        "",
    );
    (site, gw1, gw2, inet, c1, dir)
}

/// DIR/site.kdl of the two-gateway lab with BFD to the site router (`bfd #true`).
pub fn site_router_bfd(dir: &std::path::Path) {
    let conf = dir.join("site.kdl");
    let plain = std::fs::read_to_string(&conf).unwrap();
    let with_bfd = plain.replace(
        "address \"10.10.0.1\"\n }",
        "address \"10.10.0.1\"\n bfd #true\n }",
    );
    assert_ne!(plain, with_bfd, "no site-router neighbor in {plain}");
    std::fs::write(&conf, with_bfd).unwrap();
}

/// Turns the two-gateway lab dual-stack: IPv6 on the site LAN (2001:db8:10::/64, no DAD), and
/// DIR/site.kdl rewritten with an IPv6 cloud block and site prefix, IPv6 site addresses on the
/// gateways and 2001:db8:200:11::/64 on c1 (new keys made in DIR).
pub fn dual_stack(site: &Netns, gw1: &Netns, gw2: &Netns, dir: &std::path::Path) {
    for (ns, dev, a) in [
        (site, "br0", "2001:db8:10::1/64"),
        (gw1, "lan", "2001:db8:10::2/64"),
        (gw2, "lan", "2001:db8:10::3/64"),
    ] {
        ns.ip(&["addr", "add", a, "dev", dev, "nodad"]);
    }
    let (k1, k2, kc) = (genkey(dir, "gw1"), genkey(dir, "gw2"), genkey(dir, "c1"));
    std::fs::write(
        dir.join("site.kdl"),
        format!(
            "site \"lab\" {{\n asn 65010\n cloud-block \"10.200.0.0/16\"\n cloud-block \"2001:db8:200::/48\"\n \
             site-prefix \"10.10.0.0/16\"\n site-prefix \"2001:db8:10::/48\"\n links 2\n keepalive-ms 200\n dead-after 3\n}}\n\
             gateway \"gw1\" {{\n endpoint \"192.0.2.1\"\n site-address \"10.10.0.2\"\n site-address \"2001:db8:10::2\"\n public-key \"{k1}\"\n}}\n\
             gateway \"gw2\" {{\n endpoint \"192.0.2.3\"\n site-address \"10.10.0.3\"\n site-address \"2001:db8:10::3\"\n public-key \"{k2}\"\n}}\n\
             node \"c1\" {{\n address \"10.200.0.11\"\n prefix \"10.200.0.11/32\"\n prefix \"2001:db8:200:11::/64\"\n public-key \"{kc}\"\n}}\n\
             bgp {{\n hold-time 30\n neighbor \"site-router\" {{\n address \"10.10.0.1\"\n }}\n}}\n"
        ),
    )
    .unwrap();
}

/// Every process's log, for a failure message.
pub fn logs(procs: &[Proc]) -> String {
    procs
        .iter()
        .map(Proc::log)
        .collect::<Vec<_>>()
        .join("\n----\n")
}

/// The devices of our (metric 20) route to `prefix` in `ns`; empty if there is none.
pub fn route_devs(ns: &Netns, prefix: &str) -> Vec<String> {
    ns.our_routes()
        .into_iter()
        .find(|(d, m, _)| d == prefix && *m == 20)
        .map(|r| r.2)
        .unwrap_or_default()
}

/// Wait until our route to `prefix` in `ns` goes over exactly `devs`; panic with every
/// process's log after `timeout`.
pub fn wait_route_devs(
    ns: &Netns,
    prefix: &str,
    devs: &[&str],
    timeout: std::time::Duration,
    procs: &[Proc],
) {
    let t = std::time::Instant::now();
    while route_devs(ns, prefix) != devs {
        assert!(
            t.elapsed() < timeout,
            "{} never routed {prefix} over {devs:?}: {:?}\n{}",
            ns.name,
            route_devs(ns, prefix),
            logs(procs)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The runs of unanswered probes of a 10 ms ping train (`ping -i 0.01`, `sent` probes), from
/// ping's output: (first unanswered sequence number, how many), in order.
pub fn ping_gaps(ping_output: &str, sent: u64) -> Vec<(u64, u64)> {
    let mut got: Vec<u64> = ping_output
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .filter_map(|n| n.parse().ok())
        .collect();
    got.sort();
    got.dedup();
    let mut prev = 0;
    let mut gaps = Vec::new();
    for s in got.iter().copied().chain(std::iter::once(sent + 1)) {
        if s > prev + 1 {
            gaps.push((prev + 1, s - prev - 1));
        }
        prev = s;
    }
    gaps
}

/// The silences of a ping train run with `-D` (a timestamp per reply), in real time: for each
/// run of unanswered probes between two replies, (Unix time of the reply before it, ms from
/// that reply to the next). A loaded machine sends a `-i 0.01` train slower than every 10 ms,
/// so counting missing probes would understate an outage; the timestamps do not.
pub fn timed_gaps(ping_output: &str) -> Vec<(f64, u64)> {
    let mut got: Vec<(u64, f64)> = ping_output
        .lines()
        .filter_map(|l| {
            let t = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l.split("icmp_seq=").nth(1)?.split_whitespace().next()?;
            Some((seq.parse().ok()?, t))
        })
        .collect();
    let replies = ping_output.matches("icmp_seq=").count();
    assert!(
        got.len() == replies,
        "{} of {replies} replies carry no timestamp: run ping with -D",
        replies - got.len()
    );
    got.sort_by_key(|g| g.0);
    got.dedup_by_key(|g| g.0);
    got.windows(2)
        .filter(|w| w[1].0 > w[0].0 + 1)
        .map(|w| (w[0].1, ((w[1].1 - w[0].1) * 1000.0).round() as u64))
        .collect()
}

/// bird.conf for the dual-stack site router of `dual_stack`: ECMP into the kernel for both
/// families, `statics` (bird `protocol static` blocks), and iBGP to both gateways exporting
/// static routes in `export4` (IPv4: a filter such as `none` or `where source = RTS_STATIC`)
/// and always in IPv6 (with the router's LAN address as next hop).
pub fn dual_stack_bird_conf(statics: &str, export4: &str) -> String {
    let export = "export filter { if dest = RTD_UNICAST then accept; reject; }";
    format!(
        "router id 10.10.0.1;\n\
         protocol device {{}}\n\
         protocol kernel {{ ipv4 {{ import none; {export}; }}; merge paths on; }}\n\
         protocol kernel {{ ipv6 {{ import none; {export}; }}; merge paths on; }}\n\
         {statics}\n\
         template bgp gateways {{ local 10.10.0.1 as 65010; neighbor as 65010; direct; hold time 30;\n\
           ipv4 {{ import all; export {export4}; }};\n\
           ipv6 {{ import all; export where source = RTS_STATIC; next hop address 2001:db8:10::1; }}; }}\n\
         protocol bgp gw1 from gateways {{ neighbor 10.10.0.2; }}\n\
         protocol bgp gw2 from gateways {{ neighbor 10.10.0.3; }}\n"
    )
}

/// Poll `ok` until it holds; fails the test after `timeout`. Returns how long it took.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t0 = std::time::Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// The two-gateway lab's site router: bird in `site`, iBGP with gw1 and gw2, installing what
/// it learns (merged into multipath routes) and announcing nothing.
pub fn bird_site_router(site: &Netns, dir: &std::path::Path) -> Proc {
    bird(
        site,
        dir,
        "bird",
        "router id 10.10.0.1;\n\
         protocol device {}\n\
         protocol kernel { ipv4 { import none; export all; }; merge paths on; }\n\
         template bgp gateways { local 10.10.0.1 as 65010; neighbor as 65010; direct; hold time 30; ipv4 { import all; export none; }; }\n\
         protocol bgp gw1 from gateways { neighbor 10.10.0.2; }\n\
         protocol bgp gw2 from gateways { neighbor 10.10.0.3; }\n",
    )
    .0
}
