//! `appliance drain NODE` where a gateway runs, on the files alone (no daemon in the test's own
//! namespace): it writes `drain #true` in a node's block, or the slot's index in its pool's
//! `drain` list, keeps the rest of the file, is idempotent, and `undrain` takes it back. The
//! probes that carry it to the node and what the node does are in
//! `image_boot::the_node_image_runs_…` (an image node) and the intent tests.

mod common;
use common::*;

const SITE: &str = r#"site "lab" {
    asn 65010
    cloud-block "10.200.0.0/16"
    site-prefix "10.10.0.0/16"
    links 2
}
// the gateway
gateway "gw1" {
    endpoint "192.0.2.1"
    site-address "10.10.0.2"
    public-key "1nE7Va0QzFM6HwnWNX6LFyqkPZDBqPd1ib73nKyCE2Y="
}
node "c1" {
    address "10.200.0.11"
    public-key "Yv/7p9TBowqS327ezLJ0y0qDFu1eWh6tlOG0wxZybZE="
}
pool "burst" {
    prefix "10.200.1.0/24"
    count 8
    key 3 "CY+bo7xSD1WncehVFPUHR+vUwm9rP1hErCiblDN6TXw="
    key 5 "LOXXOyxRxiyyVwRphg8jHLUzXFBgZlyoGXu7RCXUY1A="
}
"#;

#[test]
fn drain_on_a_gateway_marks_the_node_or_the_slot_in_the_site_file_and_undrain_takes_it_back() {
    if !root_or_skip("drain_cli") {
        return;
    }
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("{}-drain-cli", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("site.kdl");
    std::fs::write(&file, SITE).unwrap();
    let f = file.to_str().unwrap();
    let parsed = |text: &str| appliance::model::config::parse("site.kdl", text).unwrap();

    let out = ns.appliance(&["drain", "c1", "-c", f]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("c1: now drained in"), "{}", text(&out));
    let t = std::fs::read_to_string(&file).unwrap();
    assert!(t.contains("// the gateway"), "the comment went: {t}");
    let cfg = parsed(&t);
    assert!(cfg.nodes.iter().find(|n| n.name == "c1").unwrap().drain);

    for slot in ["burst-5", "burst-3"] {
        let out = ns.appliance(&["drain", slot, "-c", f, "-o", "json"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let t = std::fs::read_to_string(&file).unwrap();
    let cfg = parsed(&t);
    let pool = cfg.pools.iter().find(|p| p.name == "burst").unwrap();
    assert_eq!(pool.drain.iter().copied().collect::<Vec<_>>(), [3, 5]);
    assert!(t.contains("drain 3 5"), "{t}");

    // Again: already drained, nothing written.
    let out = ns.appliance(&["drain", "burst-3", "-c", f]);
    assert!(text(&out).contains("already drained"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), t);

    for (host, left) in [("burst-3", Some("drain 5")), ("burst-5", None)] {
        let out = ns.appliance(&["undrain", host, "-c", f]);
        assert!(out.status.success(), "{}", text(&out));
        let t = std::fs::read_to_string(&file).unwrap();
        match left {
            Some(l) => assert!(t.contains(l), "{t}"),
            None => assert!(!t.contains("drain 5") && !t.contains("drain 3"), "{t}"),
        }
    }
    let out = ns.appliance(&["undrain", "c1", "-c", f]);
    assert!(out.status.success(), "{}", text(&out));
    let cfg = parsed(&std::fs::read_to_string(&file).unwrap());
    assert!(cfg.nodes.iter().all(|n| !n.drain));
    assert!(cfg.pools[0].drain.is_empty());

    // A host the file does not have.
    let out = ns.appliance(&["drain", "c9", "-c", f]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no gateway or node \"c9\""),
        "{}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
