//! `/metrics`: the daemon's [`Status`] in the Prometheus text format (version 0.0.4).
//!
//! Pure: one status snapshot in, the exposition out. The status is the one source of truth;
//! `appliance status` and a Prometheus scrape read the same numbers. The exposition format is
//! written by `prometheus-client` (the Prometheus project's Rust client), never by hand.
//!
//! Names follow the Prometheus conventions: an `appliance_` prefix, base units (bytes,
//! seconds), `_total` on counters (added by the encoder), one family per quantity with the
//! varying part in labels (`link`, `peer`, `neighbor`, `cause`), and 0/1 gauges for states.

use super::status::Status;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

pub use prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;
type Seconds = Family<Labels, Gauge<f64, AtomicU64>>;

/// A registry under construction: families are registered as they are first used.
struct Out {
    reg: Registry,
}

impl Out {
    fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>) -> Counters {
        let f = Counters::default();
        match unit {
            Some(u) => self.reg.register_with_unit(name, help, u, f.clone()),
            None => self.reg.register(name, help, f.clone()),
        }
        f
    }

    fn gauge(&mut self, name: &str, help: &str) -> Gauges {
        let f = Gauges::default();
        self.reg.register(name, help, f.clone());
        f
    }

    fn seconds(&mut self, name: &str, help: &str) -> Seconds {
        let f = Seconds::default();
        self.reg
            .register_with_unit(name, help, Unit::Seconds, f.clone());
        f
    }
}

fn set(f: &Counters, labels: Labels, v: u64) {
    f.get_or_create(&labels).inc_by(v);
}

/// The exposition of one status snapshot.
pub fn render(s: &Status) -> String {
    let mut o = Out {
        reg: Registry::with_prefix("appliance"),
    };
    let build = o.gauge(
        "build_info",
        "The running binary's version, this host's name and role (always 1)",
    );
    build
        .get_or_create(&vec![
            ("version", s.version.clone()),
            ("host", s.host.clone()),
            ("role", s.role.to_string()),
        ])
        .set(1);
    o.gauge(
        "drained",
        "1 while this gateway is drained (announces nothing; nodes route around it), or this node has withdrawn after draining",
    )
    .get_or_create(&vec![])
    .set((s.drained || s.node_drain.as_ref().is_some_and(|d| d.withdrawn)) as i64);
    o.gauge(
        "draining",
        "1 while this node drains (new connections refused; withdrawn once quiet)",
    )
    .get_or_create(&vec![])
    .set(s.node_drain.is_some() as i64);
    if let Some(k) = &s.key {
        o.gauge(
            "key_rotating",
            "1 while the site file lists a next key this host holds (its links move to it)",
        )
        .get_or_create(&vec![])
        .set(k.next_public_key.is_some() as i64);
        o.gauge(
            "key_links_on_target",
            "Links running on the key they move to (the next key while rotating)",
        )
        .get_or_create(&vec![])
        .set(k.links_on_target as i64);
        let c = o.counter(
            "key_rotation_moves",
            "Links moved to a new key (each completed with a handshake)",
            None,
        );
        set(&c, vec![], k.moves);
        let c = o.counter(
            "key_rotation_reverts",
            "Link moves given up: a peer did not take the new key in time",
            None,
        );
        set(&c, vec![], k.reverts);
    }
    if let Some(w) = &s.workload {
        let states = o.gauge(
            "workload_state",
            "1 for the state the workload is in (waiting, pulling, verifying, mounting, running, restarting, refused, stopping, stopped)",
        );
        for st in [
            "waiting",
            "pulling",
            "verifying",
            "mounting",
            "running",
            "restarting",
            "refused",
            "stopping",
            "stopped",
        ] {
            states
                .get_or_create(&vec![("state", st.to_string())])
                .set((w.state == st) as i64);
        }
        o.gauge(
            "workload_info",
            "The workload's image and the digest it runs (always 1)",
        )
        .get_or_create(&vec![
            ("image", w.image.clone()),
            ("digest", w.digest.clone().unwrap_or_default()),
        ])
        .set(1);
        let c = o.counter(
            "workload_restarts",
            "Times the workload was restarted",
            None,
        );
        set(&c, vec![], w.restarts as u64);
        let c = o.counter(
            "workload_pulled",
            "Compressed image bytes fetched by the current pull",
            Some(Unit::Bytes),
        );
        set(&c, vec![], w.pulled_bytes);
        let m = o.gauge("workload_mount_up", "1 while the NFS mount is mounted");
        for mount in &w.mounts {
            m.get_or_create(&vec![
                ("path", mount.path.clone()),
                ("device", mount.device.clone()),
            ])
            .set((mount.state == "mounted") as i64);
        }
    }
    o.gauge("uptime_seconds", "Seconds since the daemon started")
        .get_or_create(&vec![])
        .set(s.uptime_s as i64);

    // Links: one series per (link device, peer).
    let rx = o.counter(
        "link_receive",
        "Bytes of inner packets received from the peer over this link",
        Some(Unit::Bytes),
    );
    let tx = o.counter(
        "link_transmit",
        "Bytes of inner packets sent to the peer over this link",
        Some(Unit::Bytes),
    );
    let rxp = o.counter(
        "link_receive_packets",
        "Inner packets received from the peer over this link",
        None,
    );
    let txp = o.counter(
        "link_transmit_packets",
        "Inner packets sent to the peer over this link",
        None,
    );
    let hs = o.counter(
        "link_handshakes",
        "WireGuard handshakes completed with the peer on this link",
        None,
    );
    let up = o.gauge(
        "link_up",
        "1 while the link carries routes to the peer (live), 0 while it is dead",
    );
    let flips = o.counter(
        "link_liveness_transitions",
        "Times the link went live or dead",
        None,
    );
    let clamped = o.counter(
        "link_mss_clamped",
        "TCP SYNs whose MSS was lowered to fit the tunnel MTU (both directions)",
        None,
    );
    let last_hs = o.seconds(
        "link_last_handshake_age",
        "Seconds since the last completed handshake with the peer on this link",
    );
    let dropped = o.counter(
        "link_dropped_packets",
        "Packets dropped on the link, by cause: spoofed (inner source not the peer's), claimed (handshakes for a live peer's key from another address: a second instance), no_route (no peer for the destination), replay, invalid (other failed datagrams), rate_limited (handshakes answered with a cookie), draining (new TCP connections to a draining node)",
        None,
    );
    for l in &s.links {
        let lp = || vec![("link", l.link.clone()), ("peer", l.peer.clone())];
        set(&rx, lp(), l.rx_bytes);
        set(&tx, lp(), l.tx_bytes);
        set(&rxp, lp(), l.rx_packets);
        set(&txp, lp(), l.tx_packets);
        set(&hs, lp(), l.handshakes);
        set(&flips, lp(), l.transitions);
        set(&clamped, lp(), l.mss_clamped);
        up.get_or_create(&lp()).set(l.alive as i64);
        if let Some(ms) = l.handshake_age_ms {
            last_hs.get_or_create(&lp()).set(ms as f64 / 1000.0);
        }
    }
    let gso = o.counter(
        "link_udp_gso_errors",
        "UDP GSO writes the kernel refused on this link (each batch then went datagram by datagram)",
        None,
    );
    let queue = o.counter(
        "link_queue_packets",
        "Packets each tun queue (worker pair) of the link moved: read from its tun queue (from=tun) or received on its UDP socket (from=udp)",
        None,
    );
    let gso_off = o.gauge(
        "link_udp_gso_broken",
        "1 while the link's UDP GSO self-check finds GSO broken on its path (the link then sends datagram by datagram)",
    );
    let gro_off = o.gauge(
        "link_udp_gro_broken",
        "1 while a queue of the link receives datagram by datagram because coalesced (UDP GRO) reads from a live peer failed authentication",
    );
    let tun_refused = o.counter(
        "link_tun_write_errors",
        "Batches of decrypted packets the link's tun device refused (after a refused coalesced write the link writes packet by packet)",
        None,
    );
    for d in &s.devices {
        set(&gso, vec![("link", d.link.clone())], d.gso_errors);
        set(
            &tun_refused,
            vec![("link", d.link.clone())],
            d.tun_write_errors,
        );
        gso_off
            .get_or_create(&vec![("link", d.link.clone())])
            .set(i64::from(
                d.udp_gso == crate::datapath::offload::Verdict::Broken,
            ));
        for (i, q) in d.queues.iter().enumerate() {
            gro_off
                .get_or_create(&vec![("link", d.link.clone()), ("queue", i.to_string())])
                .set(i64::from(q.udp_gro_off));
            for (from, n) in [("tun", q.tun_packets), ("udp", q.udp_datagrams)] {
                let labels = vec![
                    ("link", d.link.clone()),
                    ("queue", i.to_string()),
                    ("from", from.into()),
                ];
                set(&queue, labels, n);
            }
        }
        let on = || s.links.iter().filter(|l| l.link == d.link);
        let spoofed: u64 = on().map(|l| l.spoofed).sum();
        let claimed: u64 = on().map(|l| l.claims_refused).sum();
        for (cause, n) in [
            ("spoofed", spoofed),
            ("claimed", claimed),
            ("no_route", d.no_route),
            ("replay", d.replayed),
            ("invalid", d.invalid.saturating_sub(d.replayed)),
            ("rate_limited", d.cookies),
            ("draining", d.refused_syns),
            ("send_buffer_full", d.send_dropped),
        ] {
            set(
                &dropped,
                vec![("link", d.link.clone()), ("cause", cause.into())],
                n,
            );
        }
    }

    if let Some(b) = &s.bgp {
        let state = o.gauge(
            "bgp_session_established",
            "1 while the BGP session with the neighbor is Established",
        );
        let prefixes = |o: &mut Out, what: &str, help: &str| {
            o.counter(&format!("bgp_prefixes_{what}"), help, None)
        };
        let received = prefixes(&mut o, "received", "Prefixes announced by the neighbor");
        let accepted = prefixes(
            &mut o,
            "accepted",
            "Announced prefixes that import policy accepted",
        );
        let rejected = prefixes(
            &mut o,
            "rejected",
            "Announced prefixes that import policy refused",
        );
        let withdrawn = prefixes(&mut o, "withdrawn", "Prefixes the neighbor withdrew");
        let now = o.gauge(
            "bgp_prefixes_accepted_current",
            "Prefixes from the neighbor in the RIB now",
        );
        let updates = o.counter(
            "bgp_updates_received",
            "UPDATE messages received from the neighbor",
            None,
        );
        let flaps = o.counter(
            "bgp_session_flaps",
            "Times the session with the neighbor left Established",
            None,
        );
        for p in &b.sessions {
            let n = || vec![("neighbor", p.name.clone())];
            state
                .get_or_create(&n())
                .set((p.state == "Established") as i64);
            set(&received, n(), p.prefixes.received);
            set(&accepted, n(), p.prefixes.accepted);
            set(&rejected, n(), p.prefixes.rejected);
            set(&withdrawn, n(), p.prefixes.withdrawn);
            set(&updates, n(), p.prefixes.updates);
            set(&flaps, n(), p.flaps);
            now.get_or_create(&n()).set(p.accepted_now as i64);
        }
        o.counter(
            "bgp_refused_connections",
            "BGP connections from addresses that are not configured neighbors",
            None,
        )
        .get_or_create(&vec![])
        .inc_by(b.refused_connections);
        if !b.bfd.is_empty() {
            let up = o.gauge("bfd_session_up", "1 while the BFD session is Up");
            let rx = o.counter("bfd_received_packets", "BFD control packets accepted", None);
            let bad = o.counter(
                "bfd_discarded_packets",
                "BFD control packets discarded (malformed, wrong TTL, unknown session)",
                None,
            );
            for f in &b.bfd {
                let n = || vec![("peer", f.peer.clone())];
                up.get_or_create(&n()).set((f.state == "Up") as i64);
                set(&rx, n(), f.received);
                set(&bad, n(), f.discarded);
            }
        }
    }

    let k = &s.kernel;
    let one = |o: &mut Out, name: &str, help: &str, v: u64| {
        o.counter(name, help, None).get_or_create(&vec![]).inc_by(v);
    };
    one(
        &mut o,
        "reconcile_runs",
        "Full reconciles (observe, plan, apply, verify): start, reloads, drift checks, fallbacks",
        k.full_reconciles,
    );
    one(
        &mut o,
        "route_updates",
        "Incremental kernel updates applied for liveness or learned-route changes",
        k.updates,
    );
    one(
        &mut o,
        "drift_repaired_changes",
        "Changes the periodic drift check found and repaired",
        k.drift_repaired,
    );
    one(
        &mut o,
        "reconcile_errors",
        "Full reconciles or route updates that failed",
        k.errors,
    );
    let mut text = String::new();
    prometheus_text::encode(&mut text, &o.reg).expect("writing to a String cannot fail");
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::status::tests::sample;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_counter_of_the_status_is_a_series() {
        let t = render(&sample());
        let lp = r#"{link="ap-l0",peer="c1"}"#;
        assert_eq!(
            value(&t, &format!("appliance_link_receive_bytes_total{lp}")),
            Some(3.0 * 1024.0 * 1024.0),
            "{t}"
        );
        assert_eq!(value(&t, &format!("appliance_link_up{lp}")), Some(1.0));
        assert_eq!(
            value(
                &t,
                &format!("appliance_link_liveness_transitions_total{lp}")
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                &format!("appliance_link_last_handshake_age_seconds{lp}")
            ),
            Some(1.5)
        );
        let drop = |c: &str| {
            value(
                &t,
                &format!(r#"appliance_link_dropped_packets_total{{link="ap-l0",cause="{c}"}}"#),
            )
        };
        assert_eq!(drop("replay"), Some(2.0));
        assert_eq!(drop("invalid"), Some(5.0), "replays are not counted twice");
        assert_eq!(drop("no_route"), Some(1.0));
        // The offload fallbacks: the sample's GSO verdict is broken, its queue 1 has GRO off.
        assert_eq!(
            value(&t, r#"appliance_link_udp_gso_broken{link="ap-l0"}"#),
            Some(1.0)
        );
        for (q, off) in [("0", 0.0), ("1", 1.0)] {
            assert_eq!(
                value(
                    &t,
                    &format!(r#"appliance_link_udp_gro_broken{{link="ap-l0",queue="{q}"}}"#)
                ),
                Some(off),
                "{t}"
            );
        }
        assert_eq!(
            value(&t, r#"appliance_bgp_session_established{neighbor="site"}"#),
            Some(1.0)
        );
        assert_eq!(
            value(&t, r#"appliance_bfd_session_up{peer="site"}"#),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "appliance_bgp_refused_connections_total"),
            Some(3.0)
        );
        assert!(
            t.contains(r#"appliance_build_info{version="0.1.0",host="gw1",role="gateway"} 1"#),
            "{t}"
        );
        // The text format's type lines, as Prometheus reads them.
        assert!(t.contains("# TYPE appliance_link_receive_bytes_total counter"));
        assert!(t.contains("# TYPE appliance_link_up gauge"));
    }

    #[test]
    fn a_label_value_from_the_site_file_cannot_break_the_format() {
        let mut s = sample();
        s.links[0].peer = "c\"1\n# TYPE x counter".into();
        let t = render(&s);
        assert!(!t.lines().any(|l| l == "# TYPE x counter"), "{t}");
        assert!(t.contains(r#"peer="c\"1\n# TYPE x counter""#), "{t}");
    }
}
