//! `appliance rotate-key` on the files alone (no daemon runs in the test's own namespace):
//! what it writes, that it is idempotent, what `--finish` leaves, and what it refuses. The
//! links' moves under load are `site_netns::keys_rotate_under_load_…`.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;

fn site(gw_key: &str, node_key: &str, slot_key: &str) -> String {
    format!(
        r#"site "lab" {{
    asn 65010
    cloud-block "10.200.0.0/16"
    site-prefix "10.10.0.0/16"
    links 2
}}
// the gateway
gateway "gw1" {{
    endpoint "192.0.2.1"
    site-address "10.10.0.2"
    public-key "{gw_key}"
}}
node "c1" {{
    address "10.200.0.11"
    public-key "{node_key}"
}}
pool "burst" {{
    prefix "10.200.1.0/24"
    count 4
    key 0 "{slot_key}"
}}
"#
    )
}

#[test]
fn rotate_key_lists_a_next_key_then_finish_makes_it_the_key() {
    if !root_or_skip("rotate_key_cli") {
        return;
    }
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("ap-rotate-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let gw = genkey(&dir, "gw1");
    let c1 = genkey(&dir, "c1");
    let slot = genkey(&dir, "slot");
    let conf = dir.join("site.kdl");
    std::fs::write(&conf, site(&gw, &c1, &slot)).unwrap();
    let (conf_s, key) = (
        conf.to_str().unwrap().to_string(),
        dir.join("gw1.key").to_str().unwrap().to_string(),
    );
    let cli = |args: &[&str]| {
        let mut all = vec![BIN, "rotate-key"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-c", &conf_s, "-o", "json"]);
        let o = ns.exec(&all);
        let j: serde_json::Value =
            serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
        (o.status.code(), j)
    };

    let (code, j) = cli(&["gw1", "-k", &key]);
    assert_eq!(code, Some(0), "{j}");
    let next = j["next_public_key"].as_str().unwrap().to_string();
    assert_eq!(j["changed"], true);
    assert!(j["daemon"].is_null(), "no daemon in this namespace: {j}");
    let next_file = dir.join("gw1.key.next");
    let mode = std::fs::metadata(&next_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the next private key is for root only");
    let text1 = std::fs::read_to_string(&conf).unwrap();
    assert!(
        text1.contains(&format!(
            "    public-key \"{gw}\"\n    next-public-key \"{next}\"\n}}"
        )),
        "{text1}"
    );
    assert!(text1.contains("// the gateway"), "comments kept: {text1}");
    // Again: the same next key, nothing written.
    let (code, j) = cli(&["gw1", "-k", &key]);
    assert_eq!(
        (code, &j["next_public_key"], &j["changed"]),
        (Some(0), &serde_json::json!(next), &serde_json::json!(false))
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), text1);

    // Refusals, each naming why, each changing nothing.
    let (code, j) = cli(&["burst-0", "-k", &key]);
    assert_eq!(code, Some(1));
    assert!(j["error"].as_str().unwrap().contains("pool secret"), "{j}");
    let (code, j) = cli(&["c1", "-k", &key]);
    assert_eq!(code, Some(1), "gw1's key file is not c1's");
    assert!(
        j["error"].as_str().unwrap().contains("run this on c1"),
        "{j}"
    );
    let (code, j) = cli(&["c1", "--finish", "-k", &key]);
    assert_eq!(code, Some(1));
    assert!(
        j["error"].as_str().unwrap().contains("nothing to finish"),
        "{j}"
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), text1);

    let (code, j) = cli(&["gw1", "--finish", "-k", &key]);
    assert_eq!(code, Some(0), "{j}");
    assert_eq!(
        (&j["public_key"], &j["retired"]),
        (&serde_json::json!(next), &serde_json::json!(gw))
    );
    let text2 = std::fs::read_to_string(&conf).unwrap();
    assert!(
        text2.contains(&format!("public-key \"{next}\"")) && !text2.contains(&gw),
        "{text2}"
    );
    assert!(!text2.contains("next-public-key"), "{text2}");
    assert!(!next_file.exists(), "the next key moved into the key file");
    assert_eq!(pubkey_of(key.as_ref()), next);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let check = ns.exec(&[BIN, "check", "-c", &conf_s]);
    assert!(check.status.success(), "{}", text(&check));

    // A second rotation whose finish stops after writing the site file (a crash): the key
    // file still holds the retired key, `.next` the listed one. Running --finish again
    // completes it.
    let (code, j) = cli(&["gw1", "-k", &key]);
    assert_eq!(code, Some(0), "{j}");
    let next2 = j["next_public_key"].as_str().unwrap().to_string();
    let t = std::fs::read_to_string(&conf).unwrap().replace(
        &format!("public-key \"{next}\"\n    next-public-key \"{next2}\"\n"),
        &format!("public-key \"{next2}\"\n"),
    );
    std::fs::write(&conf, t).unwrap();
    let (code, j) = cli(&["gw1", "--finish", "-k", &key]);
    assert_eq!(
        (code, &j["completed"]),
        (Some(0), &serde_json::json!(true)),
        "{j}"
    );
    assert_eq!(pubkey_of(key.as_ref()), next2);
    assert!(!next_file.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
