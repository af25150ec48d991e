//! Where user-data is fetched from: the kernel command line, a NoCloud / config drive, the
//! metadata service. Each source answers one [`Found`] per discovery round; refusals carry the
//! full reason for the console. Label probing is pure and tested; the rest is thin I/O.

use super::sys;
use crate::image::userdata::{self, cmdline_config, CmdlineConfig, Found, Who, USER_DATA_LIMIT};
use std::time::Duration;

/// Filesystems a seed may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedFs {
    Iso9660,
    Vfat,
}

impl SeedFs {
    pub fn kernel_name(self) -> &'static str {
        match self {
            SeedFs::Iso9660 => "iso9660",
            SeedFs::Vfat => "vfat",
        }
    }
}

/// How many bytes of a device [`probe_label`] needs.
pub const PROBE_LEN: usize = 32768 + 2048;

/// The filesystem and label of a device from its first bytes: the ISO 9660 primary volume
/// descriptor (sector 16), or a FAT boot sector (FAT12/16 label at 43, FAT32 at 71).
pub fn probe_label(b: &[u8]) -> Option<(SeedFs, String)> {
    let trim = |s: &[u8]| {
        String::from_utf8_lossy(s)
            .trim_end_matches([' ', '\0'])
            .to_string()
    };
    if b.len() >= 32768 + 72 && b[32768] == 1 && &b[32769..32774] == b"CD001" {
        return Some((SeedFs::Iso9660, trim(&b[32768 + 40..32768 + 72])));
    }
    if b.len() >= 512 && b[510] == 0x55 && b[511] == 0xaa {
        if &b[82..87] == b"FAT32" {
            return Some((SeedFs::Vfat, trim(&b[71..82])));
        }
        if &b[54..57] == b"FAT" {
            return Some((SeedFs::Vfat, trim(&b[43..54])));
        }
    }
    None
}

/// Seed labels and where each keeps its user-data.
pub fn seed_path(label: &str) -> Option<&'static str> {
    match label {
        "cidata" | "CIDATA" => Some("user-data"),
        "config-2" | "CONFIG-2" => Some("openstack/latest/user_data"),
        _ => None,
    }
}

fn refused(sha: Option<String>, reason: String) -> Found {
    Found::Refused {
        sha256: sha,
        reason,
    }
}

/// Decode and validate raw bytes; `what` names them in diagnostics.
pub fn judge(what: &str, raw: &[u8], who: &Who) -> Found {
    let text = match userdata::decode(raw) {
        Ok(t) => t,
        Err(e) => return refused(None, format!("{what}: {e}")),
    };
    match userdata::validate(what, &text, who) {
        Ok(a) => Found::Valid(Box::new(a)),
        Err(report) => refused(Some(userdata::sha256_hex(&text)), report.render()),
    }
}

/// `appliance.config=` on the kernel command line.
pub fn cmdline(value: Option<&str>, who: &Who) -> Found {
    let Some(v) = value else {
        return Found::Absent;
    };
    match cmdline_config(v) {
        Err(e) => refused(None, e),
        Ok(CmdlineConfig::Inline(raw)) => judge("user-data (appliance.config=)", &raw, who),
        Ok(CmdlineConfig::Url(url)) => match http_get(&url) {
            Ok(Some(raw)) => judge(&format!("user-data ({url})"), &raw, who),
            Ok(None) => Found::Absent,
            Err(e) => refused(None, format!("{url}: {e}")),
        },
    }
}

/// Every block device whose filesystem label marks a seed, as (device, fs, label).
fn seed_devices() -> Vec<(String, SeedFs, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/block") else {
        return out;
    };
    let mut names: Vec<String> = dir
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        if name.starts_with("dm-") || name.starts_with("loop") || name.starts_with("ram") {
            continue;
        }
        let dev = format!("/dev/{name}");
        let Ok(head) = sys::read_head(&dev, PROBE_LEN) else {
            continue;
        };
        if let Some((fs, label)) = probe_label(&head) {
            if seed_path(&label).is_some() {
                out.push((dev, fs, label));
            }
        }
    }
    out
}

/// A NoCloud (`cidata`) or config drive (`config-2`) seed.
pub fn cidata(who: &Who) -> Found {
    let Some((dev, fs, label)) = seed_devices().into_iter().next() else {
        return Found::Absent;
    };
    let dir = "/run/appliance/seed";
    let _ = std::fs::create_dir_all(dir);
    if let Err(e) = sys::mount(
        &dev,
        dir,
        fs.kernel_name(),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    ) {
        return refused(None, format!("seed {dev} (label {label}): {e}"));
    }
    let path = format!("{dir}/{}", seed_path(&label).expect("a seed label"));
    let raw = read_limited(&path);
    sys::umount(dir);
    match raw {
        Ok(raw) => judge(&format!("user-data ({label} on {dev})"), &raw, who),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => refused(
            None,
            format!(
                "seed {dev} (label {label}) has no {}",
                seed_path(&label).unwrap_or("user-data")
            ),
        ),
        Err(e) => refused(None, format!("seed {dev}: cannot read user-data: {e}")),
    }
}

/// Read at most one byte more than the limit, so "too large" is still reported as such.
fn read_limited(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(USER_DATA_LIMIT as u64 + 1)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// GET a URL with our small client: Ok(None) when there is nothing there (404 or empty).
pub fn http_get(url: &str) -> Result<Option<Vec<u8>>, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(4)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent.get(url).call().map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    if status == 404 {
        return Ok(None);
    }
    if status != 200 {
        return Err(format!("HTTP status {status}"));
    }
    match resp
        .body_mut()
        .with_config()
        .limit(USER_DATA_LIMIT as u64)
        .read_to_vec()
    {
        Ok(b) if b.is_empty() => Ok(None),
        Ok(b) => Ok(Some(b)),
        Err(ureq::Error::BodyExceedsLimit(_)) => Ok(Some(vec![b' '; USER_DATA_LIMIT + 1])),
        Err(e) => Err(e.to_string()),
    }
}

/// The Exoscale metadata service: `/1.0/user-data`, then `/latest/user-data`.
pub fn metadata(base: &str, network_up: bool, who: &Who) -> Found {
    if !network_up {
        return Found::Unavailable("no network address yet".into());
    }
    // An unreachable service is not a refusal: it may come up later (or never, on a gateway).
    let mut why = Vec::new();
    for path in ["/1.0/user-data", "/latest/user-data"] {
        let url = format!("{base}{path}");
        match http_get(&url) {
            Ok(Some(raw)) => return judge(&format!("user-data ({url})"), &raw, who),
            Ok(None) => why.push(format!("{url}: no user-data")),
            Err(e) => why.push(format!("{url}: {e}")),
        }
    }
    Found::Unavailable(why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_iso9660_volume_id_is_read_from_the_primary_descriptor() {
        let mut b = vec![0u8; PROBE_LEN];
        b[32768] = 1;
        b[32769..32774].copy_from_slice(b"CD001");
        b[32808..32840].copy_from_slice(format!("{:<32}", "cidata").as_bytes());
        assert_eq!(probe_label(&b), Some((SeedFs::Iso9660, "cidata".into())));
    }

    #[test]
    fn fat16_and_fat32_labels_are_read_from_the_boot_sector() {
        let mut b = vec![0u8; 512];
        b[510] = 0x55;
        b[511] = 0xaa;
        b[54..62].copy_from_slice(b"FAT16   ");
        b[43..54].copy_from_slice(b"CIDATA     ");
        assert_eq!(probe_label(&b), Some((SeedFs::Vfat, "CIDATA".into())));
        b[54..62].copy_from_slice(&[0; 8]);
        b[82..90].copy_from_slice(b"FAT32   ");
        b[71..82].copy_from_slice(b"config-2   ");
        assert_eq!(probe_label(&b), Some((SeedFs::Vfat, "config-2".into())));
    }

    #[test]
    fn other_devices_have_no_seed_label() {
        assert_eq!(probe_label(&[0u8; PROBE_LEN]), None);
        assert_eq!(seed_path("state"), None);
        assert_eq!(seed_path("CIDATA"), Some("user-data"));
        assert_eq!(seed_path("config-2"), Some("openstack/latest/user_data"));
    }

    /// A one-shot HTTP server on loopback: answers each path from `routes` (status, body),
    /// 404 otherwise, for `n` connections.
    fn serve(routes: Vec<(&'static str, u16, Vec<u8>)>, n: usize) -> String {
        use std::io::{BufRead as _, Write as _};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for conn in l.incoming().take(n) {
                let mut c = conn.unwrap();
                let mut r = std::io::BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap() == 0 || h.trim().is_empty() {
                        break;
                    }
                }
                let (status, body) = routes
                    .iter()
                    .find(|(p, _, _)| *p == path)
                    .map(|(_, s, b)| (*s, b.clone()))
                    .unwrap_or((404, b"no".to_vec()));
                let _ = write!(
                    c,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(&body);
            }
        });
        base
    }

    const SITE: &str = "site \"s\" {\n asn 65010\n cloud-block \"10.200.0.0/16\"\n site-prefix \"10.10.0.0/16\"\n links 1\n}\ngateway \"gw1\" {\n endpoint \"192.0.2.1\"\n site-address \"10.10.0.2\"\n public-key \"1nE7Va0QzFM6HwnWNX6LFyqkPZDBqPd1ib73nKyCE2Y=\"\n}\n";

    #[test]
    fn the_metadata_service_falls_back_to_latest_when_1_0_has_nothing() {
        let base = serve(
            vec![("/latest/user-data", 200, SITE.as_bytes().to_vec())],
            2,
        );
        match metadata(&base, true, &Who::named(Some("gw1"))) {
            Found::Valid(a) => assert_eq!(a.host, "gw1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn metadata_over_the_limit_is_refused_as_too_large() {
        let big = vec![b'#'; USER_DATA_LIMIT + 100];
        let base = serve(vec![("/1.0/user-data", 200, big)], 1);
        match metadata(&base, true, &Who::named(Some("gw1"))) {
            Found::Refused { reason, .. } => assert!(reason.contains("limit"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unreachable_or_empty_service_is_unavailable_not_refused() {
        let base = serve(vec![("/1.0/user-data", 200, Vec::new())], 2);
        assert!(matches!(
            metadata(&base, true, &Who::default()),
            Found::Unavailable(_)
        ));
        assert!(matches!(
            metadata("http://127.0.0.1:9", true, &Who::default()),
            Found::Unavailable(_)
        ));
        assert!(matches!(
            metadata(&base, false, &Who::default()),
            Found::Unavailable(_)
        ));
    }

    #[test]
    fn a_bad_cmdline_config_is_refused_not_ignored() {
        assert!(matches!(
            cmdline(Some("ftp://x"), &Who::default()),
            Found::Refused { .. }
        ));
        assert!(matches!(cmdline(None, &Who::default()), Found::Absent));
    }
}
