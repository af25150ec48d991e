//! `appliance reconcile` against real kernels, each test in its own network namespace.

mod common;
use common::*;

const TWO_GW: &str = "tests/golden/two-gateways/config.kdl";

fn reconcile(ns: &Netns, cfg: &str, node: &str, extra: &[&str]) -> std::process::Output {
    let cfg = repo(cfg);
    let mut args = vec!["reconcile", "-c", &cfg, "--node", node];
    args.extend_from_slice(extra);
    ns.appliance(&args)
}

#[test]
fn apply_creates_links_address_and_multipath_routes_then_plans_nothing() {
    if !root_or_skip("apply_creates_links") {
        return;
    }
    let ns = Netns::new();
    let out = reconcile(&ns, TWO_GW, "c1", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Applied and verified."));

    let links = ns.ip_json(&["-d", "link", "show"]);
    let ours: Vec<&str> = links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["ifalias"] == "appliance")
        .map(|l| l["ifname"].as_str().unwrap())
        .collect();
    assert_eq!(ours.len(), 9, "8 tunnels + ap-lo: {ours:?}");
    for l in links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["ifalias"] == "appliance")
    {
        assert_eq!(l["mtu"], 1420);
        assert_eq!(l["linkinfo"]["info_kind"], "tun");
        assert_eq!(l["linkinfo"]["info_data"]["persist"], true);
    }
    let addrs = ns.ip(&["-4", "addr", "show", "dev", "ap-lo"]);
    assert!(addrs.contains("10.200.0.11/32"), "{addrs}");

    let routes = ns.our_routes();
    let all8: Vec<String> = ["gw1", "gw2"]
        .iter()
        .flat_map(|g| (0..4).map(move |i| format!("ap-{g}-{i}")))
        .collect();
    assert!(
        routes.contains(&("10.10.0.0/16".into(), 20, all8.clone())),
        "{routes:?}"
    );
    assert!(
        routes.contains(&("10.200.0.0/16".into(), 20, all8)),
        "{routes:?}"
    );
    let gw1: Vec<String> = (0..4).map(|i| format!("ap-gw1-{i}")).collect();
    assert!(
        routes.contains(&("10.10.0.2/32".into(), 20, gw1)),
        "{routes:?}"
    );
    assert!(
        routes.contains(&("10.10.0.0/16".into(), 4000, vec![])),
        "blackhole: {routes:?}"
    );
    assert_eq!(ns.sysctl("net.ipv4.fib_multipath_hash_policy"), "1");
    assert_eq!(ns.sysctl("net.ipv4.conf.ap-gw1-0.rp_filter"), "2");

    let again = reconcile(&ns, TWO_GW, "c1", &["--dry-run"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("No changes"),
        "{}",
        text(&again)
    );
}

#[test]
fn a_crashed_datapath_fails_closed_to_the_blackhole() {
    if !root_or_skip("fails_closed") {
        return;
    }
    // No datapath is attached after a one-shot reconcile: the tunnels have no carrier, the
    // kernel ignores their nexthops, and site traffic hits the blackhole instead of leaking.
    let ns = Netns::new();
    assert!(reconcile(&ns, TWO_GW, "c1", &[]).status.success());
    let get = ns.exec(&["ip", "route", "get", "10.10.5.5"]);
    assert!(
        !get.status.success(),
        "expected no usable route: {}",
        text(&get)
    );
    let out = ns.exec(&["ping", "-c", "1", "-W", "1", "10.10.5.5"]);
    assert!(!out.status.success());
}

#[test]
fn drift_is_repaired_and_the_repair_is_planned_first() {
    if !root_or_skip("drift") {
        return;
    }
    let ns = Netns::new();
    assert!(reconcile(&ns, TWO_GW, "c1", &[]).status.success());
    let before = ns.our_routes();
    ns.ip(&[
        "route",
        "del",
        "10.10.0.2/32",
        "proto",
        "173",
        "metric",
        "20",
    ]);
    // Deleting one tunnel also makes the kernel drop every multipath route that used it.
    ns.ip(&["link", "del", "ap-gw2-3"]);
    ns.ip(&["link", "set", "ap-gw1-1", "mtu", "1300"]);

    let plan = reconcile(&ns, TWO_GW, "c1", &["--dry-run"]);
    assert_eq!(plan.status.code(), Some(2), "{}", text(&plan));
    let p = String::from_utf8_lossy(&plan.stdout);
    assert!(p.contains("+ link ap-gw2-3 (tun, mtu 1420)"), "{p}");
    assert!(p.contains("~ link ap-gw1-1: mtu 1300 -> 1420"), "{p}");
    assert!(
        p.contains("+ route 10.10.0.2/32 via ap-gw1-0,ap-gw1-1,ap-gw1-2,ap-gw1-3"),
        "{p}"
    );

    let fix = reconcile(&ns, TWO_GW, "c1", &[]);
    assert_eq!(fix.status.code(), Some(0), "{}", text(&fix));
    assert_eq!(ns.our_routes(), before);
    let again = reconcile(&ns, TWO_GW, "c1", &["--dry-run"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
}

#[test]
fn foreign_routes_and_similarly_named_links_are_never_touched() {
    if !root_or_skip("foreign") {
        return;
    }
    let ns = Netns::new();
    ns.ip(&["tuntap", "add", "dev", "ap-foreign", "mode", "tun"]);
    ns.ip(&["tuntap", "add", "dev", "apl0", "mode", "tun"]);
    ns.ip(&["link", "set", "apl0", "up"]);
    ns.ip(&[
        "route",
        "add",
        "10.50.0.0/24",
        "dev",
        "apl0",
        "proto",
        "static",
    ]);
    ns.ip(&[
        "route",
        "add",
        "blackhole",
        "10.200.7.0/24",
        "proto",
        "static",
    ]);
    let foreign = |ns: &Netns| {
        (
            ns.ip(&["link", "show", "ap-foreign"]),
            ns.ip(&["link", "show", "apl0"]),
            ns.ip(&["route", "show", "proto", "static"]),
        )
    };
    let before = foreign(&ns);
    assert!(reconcile(&ns, TWO_GW, "c1", &[]).status.success());
    // A node config for another host plans the removal of everything c1 had: still, the
    // foreign objects survive both.
    assert!(reconcile(&ns, TWO_GW, "gw1", &[]).status.success());
    assert_eq!(foreign(&ns), before);
    assert!(
        !ns.exec(&["ip", "link", "show", "ap-gw1-0"])
            .status
            .success(),
        "c1's tunnels are gone"
    );
    assert!(
        ns.exec(&["ip", "link", "show", "ap-l0"]).status.success(),
        "gw1's tunnels exist"
    );
}

#[test]
fn addresses_and_routes_others_put_on_our_tunnel_devices_survive_a_reconcile() {
    if !root_or_skip("foreign_address") {
        return;
    }
    let ns = Netns::new();
    assert!(reconcile(&ns, TWO_GW, "c1", &[]).status.success());
    // A benchmark harness or an operator numbers a tunnel and routes over it.
    ns.ip(&["addr", "add", "198.18.0.2/24", "dev", "ap-gw1-0"]);
    ns.ip(&[
        "route",
        "add",
        "198.19.0.1/32",
        "dev",
        "ap-gw1-0",
        "src",
        "198.18.0.2",
    ]);
    let before = ns.snapshot();
    let out = reconcile(&ns, TWO_GW, "c1", &["--dry-run"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "nothing of ours changed: {}",
        text(&out)
    );
    assert!(reconcile(&ns, TWO_GW, "c1", &[]).status.success());
    assert_eq!(ns.snapshot(), before);
}

#[test]
fn a_device_with_our_name_but_not_ours_stops_the_plan() {
    if !root_or_skip("foreign_name") {
        return;
    }
    let ns = Netns::new();
    ns.ip(&["tuntap", "add", "dev", "ap-l0", "mode", "tun"]);
    let before = ns.snapshot();
    let out = reconcile(&ns, TWO_GW, "gw1", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("device ap-l0 exists but was not created by appliance"),
        "{}",
        text(&out)
    );
    assert_eq!(ns.snapshot(), before);
}

#[test]
fn an_apply_that_fails_half_way_is_reverted_and_the_host_ends_as_it_began() {
    if !root_or_skip("half_way") {
        return;
    }
    let ns = Netns::new();
    // Someone else's route with the same destination and metric as one of ours: our add
    // fails after links, sysctls and the address are in place.
    ns.ip(&[
        "route",
        "add",
        "blackhole",
        "10.10.0.0/16",
        "metric",
        "20",
        "proto",
        "static",
    ]);
    let before = ns.snapshot();
    let out = reconcile(&ns, TWO_GW, "c1", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("could not apply `+ route 10.10.0.0/16 via"),
        "{err}"
    );
    assert!(
        err.contains("already exists and is not appliance's"),
        "{err}"
    );
    assert!(err.contains("the host is as it was before"), "{err}");
    assert_eq!(ns.snapshot(), before);
}

#[test]
fn invalid_configs_change_nothing() {
    if !root_or_skip("invalid_configs") {
        return;
    }
    let ns = Netns::new();
    assert!(reconcile(&ns, TWO_GW, "c1", &[]).status.success());
    let before = ns.snapshot();
    let mut n = 0;
    for entry in std::fs::read_dir(repo("tests/configs/invalid")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "kdl") {
            continue;
        }
        let out = ns.appliance(&["reconcile", "-c", path.to_str().unwrap(), "--node", "c1"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {}",
            path.display(),
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("nothing was applied"),
            "{}",
            text(&out)
        );
        n += 1;
    }
    assert!(n >= 25);
    assert_eq!(ns.snapshot(), before);
}

/// `appliance reconcile ARGS` as uid/gid 65534 with no capabilities.
fn reconcile_as_nobody(ns: &Netns, args: &[&str]) -> std::process::Output {
    let mut cmd = vec![
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        BIN,
        "reconcile",
    ];
    cmd.extend_from_slice(args);
    ns.exec(&cmd)
}

#[test]
fn dry_run_needs_no_privileges() {
    if !root_or_skip("dry_run_unprivileged") {
        return;
    }
    let ns = Netns::new();
    let cfg = repo(TWO_GW);
    let out = reconcile_as_nobody(
        &ns,
        &["-c", &cfg, "--node", "gw1", "--dry-run", "--output", "json"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["status"], "planned");
    assert_eq!(plan["role"], "gateway");
    assert!(plan["summary"]["add"].as_u64().unwrap() > 4);
    // and without --dry-run the same user gets a clear refusal, with the host unchanged
    let before = ns.snapshot();
    let out = reconcile_as_nobody(&ns, &["-c", &cfg, "--node", "gw1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs root or CAP_NET_ADMIN"),
        "{}",
        text(&out)
    );
    assert_eq!(ns.snapshot(), before);
}

#[test]
fn removing_a_gateway_from_the_config_removes_its_tunnels_and_routes() {
    if !root_or_skip("remove_gateway") {
        return;
    }
    let ns = Netns::new();
    assert!(reconcile(&ns, TWO_GW, "c1", &[]).status.success());
    let dir = std::env::temp_dir().join(format!("ap-t-{}-cfg", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text_cfg = std::fs::read_to_string(repo(TWO_GW)).unwrap();
    let start = text_cfg.find("gateway \"gw2\"").unwrap();
    let end = start + text_cfg[start..].find("}\n").unwrap() + 2;
    let one_gw = format!("{}{}", &text_cfg[..start], &text_cfg[end..]);
    let path = dir.join("one-gw.kdl");
    std::fs::write(&path, one_gw).unwrap();
    let out = ns.appliance(&["reconcile", "-c", path.to_str().unwrap(), "--node", "c1"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let p = String::from_utf8_lossy(&out.stdout);
    assert!(p.contains("- link ap-gw2-0"), "{p}");
    assert!(p.contains("- route 10.10.0.3/32"), "{p}");
    let gw1: Vec<String> = (0..4).map(|i| format!("ap-gw1-{i}")).collect();
    assert!(ns.our_routes().contains(&("10.10.0.0/16".into(), 20, gw1)));
    assert!(!ns
        .exec(&["ip", "link", "show", "ap-gw2-0"])
        .status
        .success());
}

/// A relay namespace: public 192.0.2.2/24 on `pub0`, private 172.31.0.1/24 on `priv0`; the
/// site file has two gateways (endpoints 192.0.2.1 and 192.0.2.3, links 4) and the relay.
fn relay_lab() -> (Netns, std::path::PathBuf) {
    let ns = Netns::new();
    ns.ip(&[
        "link", "add", "pub0", "type", "veth", "peer", "name", "priv0",
    ]);
    ns.ip(&["addr", "add", "192.0.2.2/24", "dev", "pub0"]);
    ns.ip(&["addr", "add", "172.31.0.1/24", "dev", "priv0"]);
    ns.ip(&["link", "set", "pub0", "up"]);
    ns.ip(&["link", "set", "priv0", "up"]);
    let cfg = std::env::temp_dir().join(format!("{}-relay.kdl", ns.name));
    std::fs::write(
        &cfg,
        "site \"lab\" {\n asn 65010\n cloud-block \"10.200.0.0/16\"\n site-prefix \"10.10.0.0/16\"\n links 4\n}\n\
         gateway \"gw1\" {\n endpoint \"192.0.2.1\"\n site-address \"10.10.0.2\"\n public-key \"W9kCAm5zEojpFYsCHUPGlGxhpRVd9mM7hPik2A5dEQo=\"\n}\n\
         gateway \"gw2\" {\n endpoint \"192.0.2.3\"\n site-address \"10.10.0.3\"\n public-key \"VXjXpm4yEwct9y5PRhxRoLrEPD0Rbeurik7z1uu4VHk=\"\n}\n\
         relay \"relay1\" {\n public-address \"192.0.2.2\"\n private-address \"172.31.0.1\"\n}\n\
         node \"c1\" {\n address \"10.200.0.11\"\n public-key \"aUt+EqDNSYIKfcUP/H5qCQpfON1jd73Zz9kMecso9zc=\"\n}\n",
    )
    .unwrap();
    (ns, cfg)
}

fn nft(ns: &Netns, args: &str) -> String {
    let o = ns.exec(&["sh", "-c", &format!("nft {args}")]);
    assert!(o.status.success(), "nft {args}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn a_relay_plans_applies_and_repairs_its_nat_and_never_touches_other_tables() {
    if !root_or_skip("relay_nat") {
        return;
    }
    let (ns, cfg) = relay_lab();
    let cfg = cfg.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["reconcile", "-c", cfg, "--node", "relay1"];
        args.extend_from_slice(extra);
        ns.appliance(&args)
    };
    // Someone else's tables, one of them a NAT table with its own masquerade.
    nft(&ns, "add table inet filter");
    nft(
        &ns,
        "add chain inet filter input '{ type filter hook input priority 0; }'",
    );
    nft(&ns, "add rule inet filter input tcp dport 22 accept");
    nft(&ns, "add table ip nat");
    nft(
        &ns,
        "add chain ip nat post '{ type nat hook postrouting priority 100; }'",
    );
    nft(
        &ns,
        "add rule ip nat post oifname pub0 ip saddr 10.99.0.0/16 masquerade",
    );
    let foreign = || {
        (
            nft(&ns, "list table inet filter"),
            nft(&ns, "list table ip nat"),
        )
    };
    let before = foreign();
    let want = "ip saddr 172.31.0.0/24 ip daddr 192.0.2.1 udp dport 51820-51823 masquerade; \
                ip saddr 172.31.0.0/24 ip daddr 192.0.2.3 udp dport 51820-51823 masquerade";

    // Dry run: the table is planned, nothing is created.
    let plan = run(&["--dry-run"]);
    assert_eq!(plan.status.code(), Some(2), "{}", text(&plan));
    let out = String::from_utf8_lossy(&plan.stdout);
    assert!(
        out.contains(&format!("+ nat table ip appliance ({want})")),
        "{out}"
    );
    assert!(!nft(&ns, "list tables").contains("appliance"));

    // Apply: the rules are in the kernel as planned, and a second plan is empty.
    let applied = run(&[]);
    assert_eq!(applied.status.code(), Some(0), "{}", text(&applied));
    let table = nft(&ns, "list table ip appliance");
    assert!(
        table.contains("type nat hook postrouting priority srcnat"),
        "{table}"
    );
    for gw in ["192.0.2.1", "192.0.2.3"] {
        assert!(
            table.contains(&format!(
                "ip saddr 172.31.0.0/24 ip daddr {gw} udp dport 51820-51823 masquerade"
            )),
            "{table}"
        );
    }
    assert!(table.contains("comment \"owned by appliance\""), "{table}");
    assert_eq!(ns.sysctl("net.ipv4.ip_forward"), "1");
    let again = run(&["--dry-run"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert_eq!(foreign(), before, "other tables are never touched");

    // Drift: a rule slipped into our chain, then the whole table deleted; each is planned
    // and repaired.
    nft(
        &ns,
        "add rule ip appliance postrouting udp dport 53 masquerade",
    );
    let plan = run(&["--dry-run"]);
    let out = String::from_utf8_lossy(&plan.stdout);
    assert!(out.contains("~ nat table ip appliance"), "{out}");
    assert_eq!(run(&[]).status.code(), Some(0));
    assert!(!nft(&ns, "list table ip appliance").contains("dport 53"));
    // A rule edited in place under its own comment (the port range widened to everything):
    // the comment still names our rule, the expressions do not, and it is repaired.
    let listing = nft(&ns, "-a list table ip appliance");
    let line = listing
        .lines()
        .find(|l| l.contains("ip daddr 192.0.2.1 "))
        .unwrap_or_else(|| panic!("{listing}"));
    let handle = line.rsplit("# handle ").next().unwrap().trim();
    let comment = line
        .split("comment ")
        .nth(1)
        .unwrap()
        .split(" #")
        .next()
        .unwrap();
    nft(
        &ns,
        &format!("replace rule ip appliance postrouting handle {handle} ip saddr 172.31.0.0/24 ip daddr 192.0.2.1 udp dport 1-65000 masquerade comment '{comment}'"),
    );
    assert!(nft(&ns, "list table ip appliance").contains("dport 1-65000"));
    let plan = run(&["--dry-run"]);
    assert_eq!(plan.status.code(), Some(2), "{}", text(&plan));
    let out = String::from_utf8_lossy(&plan.stdout);
    assert!(out.contains("~ nat table ip appliance"), "{out}");
    assert_eq!(run(&[]).status.code(), Some(0));
    let repaired = nft(&ns, "list table ip appliance");
    assert!(
        !repaired.contains("1-65000") && repaired.contains("192.0.2.1 udp dport 51820-51823"),
        "{repaired}"
    );
    nft(&ns, "delete table ip appliance");
    let plan = run(&["--dry-run"]);
    assert!(String::from_utf8_lossy(&plan.stdout).contains("+ nat table ip appliance"));
    assert_eq!(run(&[]).status.code(), Some(0));
    assert!(nft(&ns, "list table ip appliance").contains("192.0.2.3"));
    assert_eq!(foreign(), before);

    // A table with our name that is not ours stops the plan and stays as it is.
    nft(&ns, "delete table ip appliance");
    nft(&ns, "add table ip appliance");
    nft(
        &ns,
        "add chain ip appliance mine '{ type filter hook forward priority 0; }'",
    );
    let theirs = nft(&ns, "list table ip appliance");
    let refused = run(&[]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("was not created by appliance"),
        "{}",
        text(&refused)
    );
    assert_eq!(nft(&ns, "list table ip appliance"), theirs);
    let _ = std::fs::remove_file(cfg);
}

#[test]
fn a_single_link_ipv6_route_verifies_and_plans_nothing_again() {
    if !root_or_skip("v6_single") {
        return;
    }
    // One link: the kernel stores a one-nexthop IPv6 route as a plain route with the tunnel
    // gateway fe80::ad and an output device, not as a multipath route.
    let ns = Netns::new();
    let cfg = std::env::temp_dir().join(format!("{}-v6.kdl", ns.name));
    std::fs::write(
        &cfg,
        "site \"lab\" {\n asn 65010\n cloud-block \"10.200.0.0/16\"\n cloud-block \"2001:db8:200::/48\"\n site-prefix \"10.10.0.0/16\"\n site-prefix \"2001:db8:10::/48\"\n links 1\n}\n\
         gateway \"gw1\" {\n endpoint \"192.0.2.1\"\n site-address \"10.10.0.2\"\n site-address \"2001:db8:10::2\"\n public-key \"W9kCAm5zEojpFYsCHUPGlGxhpRVd9mM7hPik2A5dEQo=\"\n}\n\
         node \"c1\" {\n address \"10.200.0.11\"\n prefix \"10.200.0.11/32\"\n prefix \"2001:db8:200:11::/64\"\n public-key \"aUt+EqDNSYIKfcUP/H5qCQpfON1jd73Zz9kMecso9zc=\"\n}\n",
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let out = ns.appliance(&["reconcile", "-c", &cfg, "--node", "c1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let again = ns.appliance(&["reconcile", "-c", &cfg, "--node", "c1", "--dry-run"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    let routes = ns.ip(&["-6", "route", "show", "2001:db8:10::/48", "proto", "173"]);
    assert!(routes.contains("dev ap-gw1-0"), "{routes}");
    let _ = std::fs::remove_file(&cfg);
}

#[test]
fn a_nat_table_no_longer_wanted_is_removed() {
    if !root_or_skip("nat_removed") {
        return;
    }
    let (ns, cfg) = relay_lab();
    let cfg = cfg.to_str().unwrap();
    let o = ns.appliance(&["reconcile", "-c", cfg, "--node", "relay1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(nft(&ns, "list tables").contains("ip appliance"));
    // The same host reconciled as a node: the relay's table is planned away and goes.
    let plan = ns.appliance(&["reconcile", "-c", cfg, "--node", "c1", "--dry-run"]);
    let out = String::from_utf8_lossy(&plan.stdout);
    assert!(out.contains("- nat table ip appliance"), "{out}");
    let o = ns.appliance(&["reconcile", "-c", cfg, "--node", "c1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!nft(&ns, "list tables").contains("appliance"));
    let _ = std::fs::remove_file(cfg);
}

/// Two reconciles that start while a third party holds the lock: each must plan after it has
/// the lock, so the second finds the first's work done and changes nothing. A plan read before
/// the lock is stale by then, and applying it fails half-way (or undoes the first one's work).
#[test]
fn a_reconcile_waiting_for_the_lock_plans_only_once_it_holds_it() {
    use std::os::unix::fs::MetadataExt as _;
    if !root_or_skip("a_reconcile_waiting_for_the_lock") {
        return;
    }
    let ns = Netns::new();
    let ino = std::fs::metadata(format!("/run/netns/{}", ns.name))
        .unwrap()
        .ino();
    std::fs::create_dir_all("/run/appliance").unwrap();
    let path = format!("/run/appliance/reconcile-{ino}.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap();
    let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("the namespace's reconcile lock is free");
    let cfg = repo(TWO_GW);
    let start = || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, BIN, "reconcile", "-c", &cfg])
            .args(["--node", "c1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(), start());
    // Both are waiting on the lock now (it is polled every 100 ms for 30 s).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    drop(held);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(a.status.code(), Some(0), "first: {}", text(&a));
    assert_eq!(b.status.code(), Some(0), "second: {}", text(&b));
    let applied = [&a, &b]
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stdout).contains("Applied and verified."))
        .count();
    assert_eq!(
        applied,
        1,
        "one applies, the other finds nothing to do:\n{}\n{}",
        text(&a),
        text(&b)
    );
    let again = reconcile(&ns, TWO_GW, "c1", &["--dry-run"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("No changes"),
        "{}",
        text(&again)
    );
    // Only root may open the lock file: anyone who can open it can hold it.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "lock file mode {mode:o}");
    let _ = std::fs::remove_file(&path);
}
