//! What `appliance status` shows: one type, serialised by the daemon on the control socket and
//! deserialised by the CLI, which prints it as JSON or renders it as text ([`Status::render`]).

use crate::bgp::speaker::{LearnedPath, SessionStatus};
use crate::datapath::engine::{DeviceStatus, PeerStatus};
use crate::host::netlink::NetlinkCounters;
use crate::model::config::Role;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub host: String,
    pub role: Role,
    /// The config file the daemon runs on.
    pub config: String,
    pub uptime_s: u64,
    pub keepalive_ms: u32,
    pub dead_after: u32,
    /// The binary's version.
    #[serde(default)]
    pub version: String,
    /// A gateway out of service (`appliance drain`): it announces nothing, nodes route around it.
    #[serde(default)]
    pub drained: bool,
    /// A node being drained: new connections refused, then withdrawn once quiet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_drain: Option<NodeDrainStatus>,
    /// This host's keys and where a rotation stands (none on a relay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyStatus>,
    /// One entry per (link, peer).
    pub links: Vec<PeerStatus>,
    /// One entry per link device: drops no peer is charged with.
    #[serde(default)]
    pub devices: Vec<DeviceStatus>,
    pub bgp: Option<BgpStatus>,
    pub kernel: KernelStatus,
    /// The site's jobs on an image node (what the image's init last wrote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<crate::workload::supervise::Status>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BgpStatus {
    pub sessions: Vec<SessionStatus>,
    /// Connections from addresses that are not configured peers.
    pub refused_connections: u64,
    /// Learned prefixes with their equal-cost paths.
    pub routes: Vec<LearnedRoute>,
    /// BFD sessions with the site routers that ask for them.
    #[serde(default)]
    pub bfd: Vec<crate::bfd::driver::BfdStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearnedRoute {
    pub prefix: IpNet,
    pub paths: Vec<LearnedPath>,
}

/// This host's keys: the links run on the current key, or move one at a time to the next.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// The site file's `public-key` for this host.
    pub public_key: String,
    /// The `next-public-key` this host holds, which its links move to.
    pub next_public_key: Option<String>,
    /// Links running on the key they move to (the next key, or the current one when no
    /// rotation is on), of all links.
    pub links_on_target: usize,
    pub links: usize,
    /// The link moving now.
    pub moving: Option<String>,
    /// Links moved so far, and moves given up (a peer did not take the new key in time).
    pub moves: u64,
    pub reverts: u64,
    /// Live peers whose site file does not list the next key yet: links to them wait.
    #[serde(default)]
    pub unready: Vec<String>,
    /// Why a listed next key is not used (this host does not hold it).
    pub note: Option<String>,
}

impl KeyStatus {
    /// Every link runs on the next key and none is moving: the old key can be retired.
    pub fn rotated(&self) -> bool {
        self.next_public_key.is_some()
            && self.links_on_target == self.links
            && self.moving.is_none()
    }
}

/// Where a node's drain stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeDrainStatus {
    /// Seconds since `appliance drain`.
    pub since_s: u64,
    /// Seconds its tunnels have been quiet (below the threshold), if they are.
    pub quiet_s: Option<u64>,
    /// Its prefixes are withdrawn: the site no longer routes to it; it can be evicted.
    pub withdrawn: bool,
}

/// How the daemon keeps the kernel in step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelStatus {
    /// What the daemon's netlink handle cost so far.
    pub netlink: NetlinkCounters,
    /// Plans applied in reaction to liveness, learned-route or underlay changes.
    pub updates: u64,
    /// Full reconciles (start, reloads, drift checks, fallbacks).
    pub full_reconciles: u64,
    /// Changes the last update applied, and how long it took.
    pub last_update_changes: usize,
    pub last_update_us: Option<u64>,
    /// Changes the periodic drift check found and repaired.
    #[serde(default)]
    pub drift_repaired: u64,
    /// Full reconciles or route updates that failed.
    #[serde(default)]
    pub errors: u64,
}

/// One reply on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Reply {
    pub fn error(e: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(e.into()),
            message: None,
            status: None,
        }
    }

    pub fn message(m: impl Into<String>) -> Reply {
        Reply {
            ok: true,
            error: None,
            message: Some(m.into()),
            status: None,
        }
    }

    pub fn status(s: Status) -> Reply {
        Reply {
            ok: true,
            error: None,
            message: None,
            status: Some(s),
        }
    }
}

fn age(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(ms) if ms < 10_000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) => format!("{}s", ms / 1000),
    }
}

fn bytes(b: u64) -> String {
    let b = b as f64;
    const K: f64 = 1024.0;
    match b {
        b if b >= K * K * K => format!("{:.2} GiB", b / K / K / K),
        b if b >= K * K => format!("{:.1} MiB", b / K / K),
        b if b >= K => format!("{:.1} KiB", b / K),
        b => format!("{b} B"),
    }
}

/// "rx", "tx", "rx+tx" or "-": the directions ADD-PATH was negotiated in, any family.
fn add_path_column(s: &SessionStatus) -> &'static str {
    let on = |f: crate::bgp::wire::Families| f.ipv4 || f.ipv6;
    match (on(s.add_path_rx), on(s.add_path_tx)) {
        (true, true) => "rx+tx",
        (true, false) => "rx",
        (false, true) => "tx",
        (false, false) => "-",
    }
}

impl Status {
    /// The text `appliance status` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} {}{} (up {}s, keepalive {} ms, dead after {})",
            self.role,
            self.host,
            match (&self.node_drain, self.drained) {
                (_, true) => ", DRAINED".to_string(),
                (Some(d), _) if d.withdrawn => ", DRAINED: withdrawn, ready to evict".to_string(),
                (Some(d), _) => format!(
                    ", DRAINING for {}s: new connections refused, {}",
                    d.since_s,
                    match d.quiet_s {
                        Some(q) => format!("quiet for {q}s"),
                        None => "flows still running".to_string(),
                    }
                ),
                (None, false) => String::new(),
            },
            self.uptime_s,
            self.keepalive_ms,
            self.dead_after
        );
        if let Some(w) = &self.workload {
            let _ = writeln!(
                out,
                "workload: {} {}{} (restarts {}{})",
                w.state,
                w.image,
                w.digest
                    .as_deref()
                    .filter(|d| !w.image.ends_with(*d))
                    .map(|d| format!(", running {d}"))
                    .unwrap_or_default(),
                w.restarts,
                w.last_exit
                    .map(|c| format!(", last exit {c}"))
                    .unwrap_or_default()
            );
            for m in &w.mounts {
                let _ = writeln!(out, "  {} on {}: {}", m.device, m.path, m.state);
            }
            if let Some(e) = &w.last_error {
                let _ = writeln!(out, "  last error: {e}");
            }
        }
        let row = |out: &mut String, c: [&str; 9]| {
            let _ = writeln!(
                out,
                "{:<10} {:<12} {:<22} {:>9} {:>8} {:>11} {:>11} {:>10} {}",
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
            );
        };
        row(
            &mut out,
            [
                "LINK",
                "PEER",
                "ENDPOINT",
                "HANDSHAKE",
                "LAST RX",
                "RX",
                "TX",
                "HANDSHAKES",
                "STATE",
            ],
        );
        for l in &self.links {
            row(
                &mut out,
                [
                    &l.link,
                    &l.peer,
                    l.endpoint.as_deref().unwrap_or("-"),
                    &age(l.handshake_age_ms),
                    &age(l.last_rx_age_ms),
                    &bytes(l.rx_bytes),
                    &bytes(l.tx_bytes),
                    &l.handshakes.to_string(),
                    match (l.alive, l.draining) {
                        (true, false) => "live",
                        (true, true) => "live, drained",
                        (false, _) => "dead",
                    },
                ],
            );
        }
        if let Some(k) = &self.key {
            if let Some(next) = &k.next_public_key {
                let _ = writeln!(
                    out,
                    "key rotation to {next}: {}/{} links moved{}{}",
                    k.links_on_target,
                    k.links,
                    match &k.moving {
                        Some(d) => format!(", moving {d}"),
                        None if k.rotated() => format!(
                            "; retire the old key with `appliance rotate-key {} --finish`",
                            self.host
                        ),
                        None => String::new(),
                    },
                    match k.reverts {
                        0 => String::new(),
                        n => format!(" ({n} move(s) given up: a peer did not take the new key)"),
                    }
                );
                if !k.unready.is_empty() {
                    let _ = writeln!(
                        out,
                        "  waiting for {} to list the next key (deploy the site file there and reload)",
                        k.unready.join(", ")
                    );
                }
            }
            if let Some(n) = &k.note {
                let _ = writeln!(out, "key: {n}");
            }
        }
        for l in self.links.iter().filter(|l| l.claims_refused > 0) {
            let _ = writeln!(
                out,
                "{} on {}: {} handshake(s) refused from {}: another instance claims this key while it is live at {}",
                l.peer,
                l.link,
                l.claims_refused,
                l.claimant.as_deref().unwrap_or("?"),
                l.endpoint.as_deref().unwrap_or("?")
            );
        }
        for d in &self.devices {
            let mut fell_back = Vec::new();
            if d.udp_gso == crate::datapath::offload::Verdict::Broken {
                fell_back.push(format!(
                    "UDP GSO broken on the path to {}: sending datagram by datagram",
                    d.gso_checked_with.as_deref().unwrap_or("?")
                ));
            }
            let gro: Vec<String> = (d.queues.iter().enumerate())
                .filter(|(_, q)| q.udp_gro_off)
                .map(|(i, _)| i.to_string())
                .collect();
            if !gro.is_empty() {
                fell_back.push(format!(
                    "UDP GRO broken (queue {}): receiving datagram by datagram",
                    gro.join(", ")
                ));
            }
            if d.tun_gro_off {
                fell_back.push(
                    "the tun device refused coalesced writes: writing packet by packet".into(),
                );
            }
            if !fell_back.is_empty() {
                let _ = writeln!(out, "{}: {}", d.link, fell_back.join("; "));
            }
        }
        if let Some(b) = &self.bgp {
            let row = |out: &mut String, c: [&str; 8]| {
                let _ = writeln!(
                    out,
                    "{:<14} {:<18} {:<12} {:>8} {:>8} {:>8} {:<9} {}",
                    c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
                );
            };
            out.push('\n');
            row(
                &mut out,
                [
                    "BGP PEER",
                    "ADDRESS",
                    "STATE",
                    "RECEIVED",
                    "ACCEPTED",
                    "REJECTED",
                    "ADD-PATH",
                    "LAST ERROR",
                ],
            );
            for p in &b.sessions {
                row(
                    &mut out,
                    [
                        &p.name,
                        &p.address,
                        &p.state,
                        &p.prefixes.received.to_string(),
                        &p.prefixes.accepted.to_string(),
                        &p.prefixes.rejected.to_string(),
                        add_path_column(p),
                        p.last_error.as_deref().unwrap_or("-"),
                    ],
                );
            }
            let _ = writeln!(
                out,
                "connections refused from unknown addresses: {}",
                b.refused_connections
            );
            for f in &b.bfd {
                let _ = writeln!(
                    out,
                    "BFD {} {}: {} ({}), {} received, {} discarded",
                    f.peer, f.address, f.state, f.diag, f.received, f.discarded
                );
            }
        }
        let k = &self.kernel;
        let _ = writeln!(
            out,
            "\nkernel: {} update(s) (last: {} change(s) in {}), {} full reconcile(s), netlink {} request(s) / {} dump message(s)",
            k.updates,
            k.last_update_changes,
            k.last_update_us
                .map(|us| format!("{:.1} ms", us as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            k.full_reconciles,
            k.netlink.requests,
            k.netlink.dump_messages
        );
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::datapath::engine::QueueStatus;

    pub(crate) fn sample() -> Status {
        Status {
            host: "gw1".into(),
            role: Role::Gateway,
            config: "/etc/appliance/site.kdl".into(),
            uptime_s: 12,
            keepalive_ms: 200,
            dead_after: 3,
            version: "0.1.0".into(),
            drained: false,
            node_drain: None,
            workload: None,
            key: Some(KeyStatus {
                public_key: "old".into(),
                next_public_key: Some("new".into()),
                links_on_target: 1,
                links: 2,
                moving: Some("ap-l1".into()),
                moves: 1,
                reverts: 0,
                unready: vec!["c2".into()],
                note: None,
            }),
            devices: vec![DeviceStatus {
                link: "ap-l0".into(),
                public_key: "new".into(),
                invalid: 7,
                replayed: 2,
                no_route: 1,
                cookies: 0,
                refused_syns: 0,
                gso_errors: 1,
                send_dropped: 4,
                queues: vec![
                    QueueStatus {
                        tun_packets: 10,
                        udp_datagrams: 20,
                        ..QueueStatus::default()
                    },
                    QueueStatus {
                        tun_packets: 30,
                        udp_datagrams: 0,
                        udp_gro_off: true,
                        udp_gro_offs: 1,
                        ..QueueStatus::default()
                    },
                ],
                udp_gso: crate::datapath::offload::Verdict::Broken,
                gso_checked_with: Some("c1".into()),
                ..DeviceStatus::default()
            }],
            links: vec![PeerStatus {
                link: "ap-l0".into(),
                link_index: 0,
                peer: "c1".into(),
                public_key: "k".into(),
                endpoint: Some("192.0.2.2:40000".into()),
                handshake_age_ms: Some(1500),
                last_rx_age_ms: None,
                rx_bytes: 3 * 1024 * 1024,
                tx_bytes: 10,
                rx_packets: 1,
                tx_packets: 1,
                handshakes: 2,
                spoofed: 0,
                alive: true,
                routes: vec!["10.200.0.11/32".into()],
                mss_clamped: 1,
                transitions: 1,
                claims_refused: 4,
                claimant: Some("192.0.2.9:40001".into()),
                draining: false,
            }],
            bgp: Some(BgpStatus {
                sessions: vec![SessionStatus {
                    name: "site".into(),
                    address: "10.10.0.1".into(),
                    state: "Established".into(),
                    add_path_tx: crate::bgp::wire::Families::BOTH,
                    ..Default::default()
                }],
                refused_connections: 3,
                bfd: vec![crate::bfd::driver::BfdStatus {
                    peer: "site".into(),
                    address: "10.10.0.1".parse().unwrap(),
                    state: "Up".into(),
                    diag: "no diagnostic".into(),
                    received: 12,
                    discarded: 0,
                }],
                routes: vec![LearnedRoute {
                    prefix: "10.200.0.11/32".parse().unwrap(),
                    paths: vec![LearnedPath {
                        peer: "c1".into(),
                        from_client: true,
                        next_hop: Some("10.200.0.11".parse().unwrap()),
                    }],
                }],
            }),
            kernel: KernelStatus {
                updates: 4,
                last_update_changes: 1,
                last_update_us: Some(2000),
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_status_reply_survives_the_control_socket() {
        let r = Reply::status(sample());
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), r);
        let e = Reply::error("reload needs root");
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(line, r#"{"ok":false,"error":"reload needs root"}"#);
    }

    #[test]
    fn the_text_shows_links_sessions_and_the_kernel_counters() {
        let t = sample().render();
        assert!(
            t.starts_with("gateway gw1 (up 12s, keepalive 200 ms, dead after 3)\n"),
            "{t}"
        );
        let link = t.lines().find(|l| l.starts_with("ap-l0")).unwrap();
        for want in [
            "c1",
            "192.0.2.2:40000",
            "1.5s",
            "never",
            "3.0 MiB",
            "10 B",
            "live",
        ] {
            assert!(link.contains(want), "{want} missing from {link:?}");
        }
        let bgp = t.lines().find(|l| l.starts_with("site")).unwrap();
        assert!(
            bgp.contains("Established") && bgp.contains(" tx "),
            "{bgp:?}"
        );
        assert!(t.contains("refused from unknown addresses: 3"));
        assert!(
            t.contains("ap-l0: UDP GSO broken on the path to c1: sending datagram by datagram; UDP GRO broken (queue 1): receiving datagram by datagram\n"),
            "{t}"
        );
        assert!(
            t.contains("key rotation to new: 1/2 links moved, moving ap-l1\n  waiting for c2 to list the next key"),
            "{t}"
        );
        assert!(t.contains("BFD site 10.10.0.1: Up (no diagnostic), 12 received"));
        assert!(
            t.contains("kernel: 4 update(s) (last: 1 change(s) in 2.0 ms)"),
            "{t}"
        );
    }
}
