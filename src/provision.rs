//! `appliance provision`: N identical instances of a cloud instance pool become N distinct
//! nodes with no per-instance step. Pure: text and a secret in, texts out (the CLI reads and
//! writes the files).
//!
//! How: the pool's slots are keyed by a 32-byte pool secret ([`PrivateKey::for_slot`]); the
//! site file gets each slot's public key (`key i "..."` in the pool block, existing keys kept);
//! the one user-data every instance boots is the site file plus `appliance { pool "NAME"
//! pool-secret "..." }`. An instance takes the slot of its private-network lease
//! (`dhcp-start` + i, unique because the provider's DHCP hands each address out once) and
//! derives that slot's key. Every slot is validated here exactly as the image will: the same
//! [`userdata::validate`] with the slot's address.

use crate::image::userdata::{self, Who, USER_DATA_LIMIT};
use crate::model::config::{self, Pool};
use crate::model::key::PrivateKey;
use base64::Engine as _;
use kdl::KdlDocument;
use serde::Serialize;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};

/// Exoscale's limit: 32 KiB of user-data once base64-encoded.
pub const EXOSCALE_LIMIT_B64: usize = 32 * 1024;

#[derive(Debug, Serialize)]
pub struct Provisioned {
    pub pool: String,
    pub slots: u32,
    /// Slots whose key this run added to the site file.
    pub added: Vec<u32>,
    /// Slots enrolled with a key the secret does not derive: kept, not for the pool's instances.
    pub own_key: Vec<u32>,
    /// The site file with every slot's key (what the gateways and the user-data carry).
    #[serde(skip)]
    pub site_text: String,
    /// The pool's user-data, plain.
    #[serde(skip)]
    pub user_data: String,
    /// The same, gzip-compressed, when the plain one is over the limit.
    #[serde(skip)]
    pub user_data_gz: Option<Vec<u8>>,
    /// Base64 size of what must be handed to the cloud (plain, or gzip when that is needed).
    pub user_data_b64_bytes: usize,
    /// Slots validated as the image validates them (host name and key), each under the limit.
    pub validated: u32,
    pub dhcp_start: Ipv4Addr,
}

fn b64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// The site text with a key for every slot of `pool` that has none, and the slots added.
fn fill_keys(text: &str, pool: &Pool, secret: &[u8; 32]) -> Result<(String, Vec<u32>), String> {
    let mut doc: KdlDocument = text.parse().map_err(|e| format!("{e}"))?;
    let node = doc
        .nodes_mut()
        .iter_mut()
        .find(|n| {
            n.name().value() == "pool"
                && n.entries().first().and_then(|e| e.value().as_string()) == Some(&pool.name)
        })
        .ok_or_else(|| format!("pool {:?} not found", pool.name))?;
    let kids = node.ensure_children();
    let added: Vec<u32> = (0..pool.count)
        .filter(|i| !pool.keys.contains_key(i))
        .collect();
    let mut lines = String::new();
    for i in &added {
        let k = PrivateKey::for_slot(secret, &pool.name, *i).public();
        lines.push_str(&format!("    key {i} \"{k}\"\n"));
    }
    let new: KdlDocument = lines.parse().map_err(|e| format!("{e}"))?;
    kids.nodes_mut().extend(new.nodes().iter().cloned());
    Ok((doc.to_string(), added))
}

/// Provision pool `pool_name` of the site file `text` (named `file` in diagnostics).
pub fn provision(
    file: &str,
    text: &str,
    pool_name: &str,
    secret: &[u8; 32],
) -> Result<Provisioned, String> {
    let cfg = config::parse(file, text).map_err(|r| r.render())?;
    let Some(pool) = cfg.pools.iter().find(|p| p.name == pool_name) else {
        let names: Vec<&str> = cfg.pools.iter().map(|p| p.name.as_str()).collect();
        return Err(format!(
            "{file}: no pool {pool_name:?} (the site file's pools: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ));
    };
    let Some(dhcp_start) = pool.dhcp_start else {
        return Err(format!(
            "{file}: pool {pool_name:?} has no dhcp-start: add `dhcp-start \"A.B.C.D\"`, the first address of the private network's managed DHCP range (instance i of the pool leases dhcp-start + i)"
        ));
    };
    let own_key: Vec<u32> = pool
        .keys
        .iter()
        .filter(|(i, k)| **k != PrivateKey::for_slot(secret, pool_name, **i).public())
        .map(|(i, _)| *i)
        .collect();
    let (site_text, added) = fill_keys(text, pool, secret)?;
    let filled = config::parse(file, &site_text).map_err(|r| r.render())?;
    let user_data = format!(
        "// The user-data of every instance of pool {pool_name:?}: each takes the slot of its\n\
         // private-network address (dhcp-start + slot) and derives that slot's key.\n\
         appliance {{\n    pool \"{pool_name}\"\n    pool-secret \"{}\"\n}}\n{site_text}",
        base64::engine::general_purpose::STANDARD.encode(secret)
    );
    let (user_data_gz, user_data_b64_bytes) = if b64_len(user_data.len()) <= EXOSCALE_LIMIT_B64 {
        (None, b64_len(user_data.len()))
    } else {
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(user_data.as_bytes())
            .map_err(|e| e.to_string())?;
        let gz = z.finish().map_err(|e| e.to_string())?;
        let n = b64_len(gz.len());
        if n > EXOSCALE_LIMIT_B64 {
            return Err(format!(
                "the pool's user-data is {} bytes of base64 even gzip-compressed (limit {EXOSCALE_LIMIT_B64}): shorten the site file",
                n
            ));
        }
        (Some(gz), n)
    };
    // Every slot, as the image will see it: decoded, validated with the slot's address.
    let raw = user_data_gz
        .clone()
        .unwrap_or_else(|| user_data.as_bytes().to_vec());
    if raw.len() > USER_DATA_LIMIT {
        return Err(format!(
            "the pool's user-data is {} bytes, over the image's limit of {USER_DATA_LIMIT}",
            raw.len()
        ));
    }
    let decoded = userdata::decode(&raw).map_err(|e| e.to_string())?;
    let fpool = filled
        .pools
        .iter()
        .find(|p| p.name == pool_name)
        .expect("the pool is still there");
    let mut validated = 0;
    for i in (0..fpool.count).filter(|i| !own_key.contains(i)) {
        let addr = [IpAddr::V4(Ipv4Addr::from(u32::from(dhcp_start) + i))];
        let who = Who {
            host: None,
            addresses: &addr,
            slot: None,
        };
        let what = format!("user-data (pool {pool_name}, slot {i})");
        let a = userdata::validate(&what, &decoded, &who).map_err(|r| r.render())?;
        let want = format!("{pool_name}-{i}");
        if a.host != want {
            return Err(format!("{what}: resolved to {} instead of {want}", a.host));
        }
        let key = a.private_key.expect("a pool slot carries its key");
        if filled.public_key_of(&want) != Some(key.public()) {
            return Err(format!("{what}: the derived key is not the enrolled one"));
        }
        validated += 1;
    }
    Ok(Provisioned {
        pool: pool_name.to_string(),
        slots: pool.count,
        added,
        own_key,
        site_text,
        user_data,
        user_data_gz,
        user_data_b64_bytes,
        validated,
        dhcp_start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = r#"site "lab" {
    asn 65010
    cloud-block "10.200.0.0/16"
    site-prefix "10.10.0.0/16"
}
gateway "gw1" {
    endpoint "192.0.2.1"
    site-address "10.10.0.2"
    public-key "N7BWORjjFdUfG1emrVOjcHA9A9srzw4xhvRMwG32Ueg="
}
pool "burst" {
    prefix "10.200.1.0/24"
    count 64
    dhcp-start "172.31.0.100"
}
"#;

    #[test]
    fn a_64_slot_pool_is_keyed_validated_per_slot_and_stable_on_a_rerun() {
        let secret = [7u8; 32];
        let p = provision("site.kdl", SITE, "burst", &secret).unwrap();
        assert_eq!(p.added.len(), 64);
        assert_eq!(p.validated, 64);
        assert!(p.user_data_b64_bytes <= EXOSCALE_LIMIT_B64);
        // Again on its own output: nothing added, the same texts.
        let again = provision("site.kdl", &p.site_text, "burst", &secret).unwrap();
        assert!(again.added.is_empty());
        assert_eq!(again.site_text, p.site_text);
        assert_eq!(again.user_data, p.user_data);
        // Again on the original file: the same keys.
        let fresh = provision("site.kdl", SITE, "burst", &secret).unwrap();
        assert_eq!(fresh.site_text, p.site_text);
    }

    /// The report refusing `user_data` on a machine whose only address is `addr`.
    fn refusal(user_data: &str, addr: &str) -> String {
        let addr = [addr.parse::<IpAddr>().unwrap()];
        let who = Who {
            addresses: &addr,
            ..Who::default()
        };
        userdata::validate("u", user_data, &who)
            .unwrap_err()
            .render()
    }

    #[test]
    fn a_slot_keyed_by_hand_keeps_its_key_and_is_not_for_the_pools_instances() {
        let own = PrivateKey::generate().public();
        let site = SITE.replace("count 64\n", &format!("count 64\n    key 5 \"{own}\"\n"));
        let p = provision("site.kdl", &site, "burst", &[1; 32]).unwrap();
        assert_eq!(p.own_key, vec![5]);
        assert_eq!(p.validated, 63);
        assert!(p.site_text.contains(&own.to_string()));
        // An instance leasing slot 5's address is refused, and says why.
        let e = refusal(&p.user_data, "172.31.0.105");
        assert!(
            e.contains(
                "slot 5 of pool \"burst\" is enrolled with a key this pool secret does not derive"
            ),
            "{e}"
        );
        // One outside the range is told which range it is not in.
        let e = refusal(&p.user_data, "172.31.0.99");
        assert!(
            e.contains("172.31.0.100 .. 172.31.0.163") && e.contains("172.31.0.99"),
            "{e}"
        );
    }

    #[test]
    fn a_big_site_file_is_gzipped_under_the_limit_and_still_validates() {
        let mut site = SITE.to_string();
        for i in 0..300 {
            site.push_str(&format!(
                "// padding comment number {i} so that the plain text grows past the limit of the cloud\n"
            ));
        }
        let p = provision("site.kdl", &site, "burst", &[2; 32]).unwrap();
        assert!(b64_len(p.user_data.len()) > EXOSCALE_LIMIT_B64);
        assert!(p.user_data_gz.is_some());
        assert!(p.user_data_b64_bytes <= EXOSCALE_LIMIT_B64);
        assert_eq!(p.validated, 64);
    }

    #[test]
    fn no_diagnostic_quotes_the_pool_secret() {
        let p = provision("site.kdl", SITE, "burst", &[9; 32]).unwrap();
        let secret = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        // A typo in the secret and an unknown field, both reported with their lines.
        let bad = p
            .user_data
            .replacen(&secret, &format!("{}x", &secret[..43]), 1);
        let bad = bad.replacen("    pool \"burst\"", "    pool \"burst\"\n    frob 1", 1);
        let e = userdata::validate("u", &bad, &Who::default())
            .unwrap_err()
            .render();
        assert!(
            e.contains("invalid pool secret") && e.contains("frob"),
            "{e}"
        );
        assert!(!e.contains(&secret[..40]), "{e}");
    }

    #[test]
    fn a_pool_without_a_dhcp_range_or_an_unknown_pool_is_an_error_that_says_what_to_add() {
        let e = provision(
            "site.kdl",
            &SITE.replace("    dhcp-start \"172.31.0.100\"\n", ""),
            "burst",
            &[0; 32],
        )
        .unwrap_err();
        assert!(e.contains("has no dhcp-start"), "{e}");
        let e = provision("site.kdl", SITE, "bust", &[0; 32]).unwrap_err();
        assert!(e.contains("no pool \"bust\"") && e.contains("burst"), "{e}");
    }
}
