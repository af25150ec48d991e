//! The site's job runner on a node, as the site file declares it (`workload { ... }` inside a
//! `node` or `pool` block): the OCI image pinned by digest, how to start and stop it, its
//! resource limits and the site's NFS mounts. Pure values; the KDL walker that fills them is
//! `config::workload`, and `crate::workload` acts on them.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// CPU weight (cgroup v2 `cpu.weight`, 1..=10000) of the workload when the site file sets
/// none. The daemon's group has [`DAEMON_CPU_WEIGHT`]: under contention the datapath gets 50
/// times the workload's share.
pub const DEFAULT_CPU_WEIGHT: u32 = 20;
pub const DAEMON_CPU_WEIGHT: u32 = 1000;
/// Seconds between SIGTERM and SIGKILL when the workload stops.
pub const DEFAULT_STOP_TIMEOUT_S: u32 = 30;
pub const DEFAULT_PIDS_MAX: u32 = 16384;
/// The most TCP connections one NFS mount may open (the kernel's own limit).
pub const MAX_NCONNECT: u32 = 16;

/// A sha256 content digest, as 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// `sha256:HEX` (the only algorithm OCI registries use in practice).
    pub fn parse(s: &str) -> Result<Digest, String> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(match s.split_once(':') {
                Some((alg, _)) => {
                    format!("digest algorithm {alg:?} is not supported (only sha256)")
                }
                None => "a digest is written `sha256:` and 64 hex digits".into(),
            });
        };
        if hex.len() != 64 {
            return Err(format!(
                "a sha256 digest has 64 hex digits, this one has {}",
                hex.len()
            ));
        }
        if let Some(c) = hex.chars().find(|c| !matches!(c, '0'..='9' | 'a'..='f')) {
            return Err(format!(
                "{c:?} is not a lowercase hex digit (digests are written in lowercase)"
            ));
        }
        Ok(Digest(hex.to_string()))
    }

    pub fn from_sha256(bytes: &[u8]) -> Digest {
        use std::fmt::Write as _;
        let mut s = String::with_capacity(64);
        for b in bytes {
            let _ = write!(s, "{b:02x}");
        }
        Digest(s)
    }

    /// The 64 hex digits alone (file names in an OCI layout's `blobs/sha256/`).
    pub fn hex(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, for console lines.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = String;
    fn try_from(s: String) -> Result<Digest, String> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

/// Where the image's bytes come from. Either way the digest decides what runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Source {
    /// A registry speaking the OCI distribution API over plain HTTP, reached through the
    /// tunnels: `ADDRESS[:PORT]/REPOSITORY`. Plain HTTP is enough because the digest
    /// authenticates every byte; the address is an IP address because the node resolves no
    /// names.
    Registry {
        address: IpAddr,
        port: u16,
        repository: String,
    },
    /// An OCI image layout at the root of a filesystem labelled `label` on an attached drive
    /// (`disk:LABEL`): for air-gapped sites and tests.
    Disk { label: String },
}

/// An image reference pinned by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub source: Source,
    /// The tag written before the digest, if any: shown, never used to choose bytes.
    pub tag: Option<String>,
    pub digest: Digest,
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Source::Registry {
                address,
                port,
                repository,
            } => {
                let host = match address {
                    IpAddr::V6(a) => format!("[{a}]"),
                    IpAddr::V4(a) => a.to_string(),
                };
                write!(f, "{host}:{port}/{repository}")?
            }
            Source::Disk { label } => write!(f, "disk:{label}")?,
        }
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        write!(f, "@{}", self.digest)
    }
}

/// Why an image reference is refused, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefError {
    pub message: String,
    pub help: String,
}

fn ref_err(message: impl Into<String>, help: impl Into<String>) -> RefError {
    RefError {
        message: message.into(),
        help: help.into(),
    }
}

/// OCI distribution spec: path components `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    b.iter()
        .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-'))
}

/// OCI distribution spec: tags are `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'.' | b'_' | b'-'))
}

impl ImageRef {
    /// `ADDRESS[:PORT]/REPO[:TAG]@sha256:HEX` or `disk:LABEL[:TAG]@sha256:HEX`. A reference
    /// without a digest is refused: a tag can be moved to other bytes at any time.
    pub fn parse(s: &str) -> Result<ImageRef, RefError> {
        let pin_help = "pin the image by its manifest digest: `skopeo inspect --tls-verify=false docker://ADDRESS:PORT/NAME:TAG` prints it as \"Digest\"; write `ADDRESS:PORT/NAME@sha256:…`";
        let Some((name, digest)) = s.rsplit_once('@') else {
            return Err(ref_err("the image is not pinned by a digest", pin_help));
        };
        let digest =
            Digest::parse(digest).map_err(|e| ref_err(format!("bad digest: {e}"), pin_help))?;
        if let Some(rest) = name.strip_prefix("disk:") {
            let (label, tag) = split_tag(rest);
            if label.is_empty()
                || label.len() > 16
                || !label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
            {
                return Err(ref_err(
                    format!("{label:?} is not a filesystem label"),
                    "write `disk:LABEL@sha256:…`: LABEL is the label of a filesystem (1 to 16 letters, digits, '-' or '_') holding an OCI image layout at its root",
                ));
            }
            return Ok(ImageRef {
                source: Source::Disk {
                    label: label.to_string(),
                },
                tag: tag.map(str::to_string),
                digest,
            });
        }
        let Some((host, path)) = name.split_once('/') else {
            return Err(ref_err(
                "the image names no registry",
                "write `ADDRESS:PORT/NAME@sha256:…` with the IP address of the site's registry (reached through the tunnels), or `disk:LABEL@sha256:…`",
            ));
        };
        let (address, port) = parse_host(host)?;
        let (repository, tag) = split_tag(path);
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(ref_err(
                    format!("{t:?} is not a valid tag"),
                    "tags are letters, digits, '.', '_' and '-', at most 128, not starting with '.' or '-'",
                ));
            }
        }
        if repository.is_empty()
            || repository.len() > 255
            || !repository.split('/').all(valid_component)
        {
            return Err(ref_err(
                format!("{repository:?} is not a valid repository name"),
                "repository names are lowercase path components of letters, digits and '.', '_' or '-' separated by '/'",
            ));
        }
        Ok(ImageRef {
            source: Source::Registry {
                address,
                port,
                repository: repository.to_string(),
            },
            tag: tag.map(str::to_string),
            digest,
        })
    }
}

/// `name:tag` → (name, Some(tag)); a ':' inside the last path component only.
fn split_tag(s: &str) -> (&str, Option<&str>) {
    let last = s.rfind('/').map(|i| i + 1).unwrap_or(0);
    match s[last..].find(':') {
        Some(i) => (&s[..last + i], Some(&s[last + i + 1..])),
        None => (s, None),
    }
}

fn parse_host(host: &str) -> Result<(IpAddr, u16), RefError> {
    let no_names = "the node resolves no host names: write the registry's IP address, e.g. `10.10.0.5:5000/site/worker@sha256:…`";
    let (addr, port) = if let Some(rest) = host.strip_prefix('[') {
        let (a, after) = rest
            .split_once(']')
            .ok_or_else(|| ref_err(format!("{host:?}: unclosed '['"), "write [IPV6]:PORT"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => {
                return Err(ref_err(
                    format!("{host:?}: expected ':' after ']'"),
                    "write [IPV6]:PORT",
                ))
            }
        };
        (a, port)
    } else {
        match host.rsplit_once(':') {
            Some((a, p)) => (a, Some(p)),
            None => (host, None),
        }
    };
    let address: IpAddr = addr
        .parse()
        .map_err(|_| ref_err(format!("{addr:?} is not an IP address"), no_names))?;
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| ref_err(format!("{p:?} is not a port"), "a port is 1..=65535"))?,
    };
    Ok((address, port))
}

/// NFS protocol versions a mount may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NfsVersion {
    #[serde(rename = "3")]
    V3,
    #[serde(rename = "4.0")]
    V40,
    #[serde(rename = "4.1")]
    V41,
    #[serde(rename = "4.2")]
    V42,
}

impl NfsVersion {
    pub fn parse(s: &str) -> Option<NfsVersion> {
        Some(match s {
            "3" => NfsVersion::V3,
            "4" | "4.0" => NfsVersion::V40,
            "4.1" => NfsVersion::V41,
            "4.2" => NfsVersion::V42,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NfsVersion::V3 => "3",
            NfsVersion::V40 => "4.0",
            NfsVersion::V41 => "4.1",
            NfsVersion::V42 => "4.2",
        }
    }

    /// NFSv4.0 has no sessions, so the kernel opens one connection whatever nconnect says.
    pub fn allows_nconnect(self) -> bool {
        self != NfsVersion::V40
    }
}

/// One of the site's NFS exports, mounted by the node's kernel and bound into the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NfsMount {
    pub server: IpAddr,
    /// The exported path on the server (for NFSv4, the path in its pseudo file system).
    pub export: String,
    /// Where the job sees it (the site's own path).
    pub path: String,
    pub vers: NfsVersion,
    /// TCP connections; None: the site's link count, so one mount spreads over the links.
    pub nconnect: Option<u32>,
    /// Soft mounts return EIO after the retries; hard mounts (the default) wait for the
    /// server, which is what a batch job writing results needs.
    pub soft: bool,
    pub read_only: bool,
}

impl NfsMount {
    /// The connections this mount opens on a site with `links` links.
    pub fn connections(&self, links: u32) -> u32 {
        if !self.vers.allows_nconnect() {
            return 1;
        }
        self.nconnect.unwrap_or(links).clamp(1, MAX_NCONNECT)
    }

    /// `server:/export`, as `mount` writes it.
    pub fn device(&self) -> String {
        match self.server {
            IpAddr::V6(a) => format!("[{a}]:{}", self.export),
            IpAddr::V4(a) => format!("{a}:{}", self.export),
        }
    }

    /// The kernel's mount options (mount(2) data; no mount.nfs helper on the image).
    pub fn options(&self, links: u32, client: Option<IpAddr>) -> String {
        let mut o = vec![
            format!("vers={}", self.vers.as_str()),
            format!("addr={}", self.server),
            "proto=tcp".to_string(),
            if self.soft { "soft" } else { "hard" }.to_string(),
            "timeo=100".to_string(),
            "retrans=3".to_string(),
        ];
        if self.vers.allows_nconnect() {
            o.push(format!("nconnect={}", self.connections(links)));
        }
        match self.vers {
            // NFSv3 locking needs rpc.statd, which the image does not run: locks stay local.
            NfsVersion::V3 => o.push("nolock".into()),
            _ => {
                if let Some(c) = client {
                    o.push(format!("clientaddr={c}"));
                }
            }
        }
        if self.read_only {
            o.push("ro".into());
        }
        o.join(",")
    }
}

/// A command line: the program and its arguments.
pub type Argv = Vec<String>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub image: ImageRef,
    /// Replaces the image's Entrypoint (with its Cmd dropped unless `args` is set too).
    pub command: Option<Argv>,
    /// Replaces the image's Cmd.
    pub args: Option<Argv>,
    /// Added to (and overriding) the image's environment.
    pub env: Vec<(String, String)>,
    /// The host name the workload sees (default: the node's name).
    pub hostname: Option<String>,
    /// Run inside the workload when the node is drained; its exit (or the workload's) says
    /// the workload is idle.
    pub drain_command: Option<Argv>,
    pub stop_timeout_s: u32,
    pub cpu_weight: u32,
    /// None: the node's memory less what the daemon and the kernel keep.
    pub memory_max_mib: Option<u64>,
    pub pids_max: u32,
    pub mounts: Vec<NfsMount>,
}

impl Workload {
    /// The program and arguments to start, from this block and the image's config (OCI image
    /// spec: Entrypoint then Cmd; a `command` here drops the image's Cmd, as Kubernetes does).
    pub fn argv(&self, entrypoint: &[String], cmd: &[String]) -> Argv {
        match (&self.command, &self.args) {
            (Some(c), Some(a)) => c.iter().chain(a).cloned().collect(),
            (Some(c), None) => c.clone(),
            (None, Some(a)) => entrypoint.iter().chain(a).cloned().collect(),
            (None, None) => entrypoint.iter().chain(cmd).cloned().collect(),
        }
    }
}

/// Mount points the workload may not claim: the ones its own root needs.
pub const RESERVED_PATHS: &[&str] = &["/proc", "/sys", "/dev"];

/// A workload path: absolute, normalised (no `.`, `..` or empty components), not `/` and not
/// inside the paths the container's root needs.
pub fn check_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err("not an absolute path".into());
    }
    if p == "/" {
        return Err("the workload's root cannot be replaced".into());
    }
    if p.len() > 1024 {
        return Err("longer than 1024 bytes".into());
    }
    for c in p[1..].split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(format!(
                "component {c:?} is not allowed (write a plain absolute path)"
            ));
        }
        if c.bytes().any(|b| b == 0 || b == b',') {
            return Err("contains a NUL or ',' byte".into());
        }
    }
    for r in RESERVED_PATHS {
        if p == *r || p.starts_with(&format!("{r}/")) {
            return Err(format!(
                "inside {r}, which the workload's root mounts itself"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_registry_reference_with_a_digest_parses() {
        let r = ImageRef::parse(&format!("10.10.0.5:5000/site/worker:v1@{D}")).unwrap();
        assert_eq!(
            r.source,
            Source::Registry {
                address: "10.10.0.5".parse().unwrap(),
                port: 5000,
                repository: "site/worker".into()
            }
        );
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.to_string(), format!("10.10.0.5:5000/site/worker:v1@{D}"));
        let r = ImageRef::parse(&format!("[fd00::5]:5000/w@{D}")).unwrap();
        assert_eq!(r.to_string(), format!("[fd00::5]:5000/w@{D}"));
        let r = ImageRef::parse(&format!("10.10.0.5/w@{D}")).unwrap();
        assert!(matches!(r.source, Source::Registry { port: 80, .. }));
    }

    #[test]
    fn a_tag_without_a_digest_is_refused_with_how_to_find_the_digest() {
        let e = ImageRef::parse("10.10.0.5:5000/site/worker:v1").unwrap_err();
        assert_eq!(e.message, "the image is not pinned by a digest");
        assert!(e.help.contains("skopeo inspect"), "{}", e.help);
    }

    #[test]
    fn names_short_or_wrong_digests_and_bad_repositories_are_refused() {
        let bad = [
            (format!("registry.site:5000/w@{D}"), "not an IP address"),
            ("10.10.0.5:5000/w@sha256:abc".to_string(), "64 hex digits"),
            (
                format!(
                    "10.10.0.5:5000/w@{}",
                    D.to_uppercase().replace("SHA256", "sha256")
                ),
                "lowercase",
            ),
            (
                format!("10.10.0.5:5000/w@sha512:{}", &D[7..]),
                "not supported",
            ),
            (format!("10.10.0.5:0/w@{D}"), "not a port"),
            (format!("10.10.0.5:5000/Worker@{D}"), "repository name"),
            (format!("10.10.0.5:5000/w:-x@{D}"), "valid tag"),
            (format!("worker@{D}"), "names no registry"),
            (format!("disk:a b@{D}"), "filesystem label"),
        ];
        for (s, want) in bad {
            let e = ImageRef::parse(&s).unwrap_err();
            assert!(e.message.contains(want), "{s}: {e:?}");
        }
    }

    #[test]
    fn a_disk_reference_names_a_label() {
        let r = ImageRef::parse(&format!("disk:WORKLOAD:v2@{D}")).unwrap();
        assert_eq!(
            r.source,
            Source::Disk {
                label: "WORKLOAD".into()
            }
        );
        assert_eq!(r.tag.as_deref(), Some("v2"));
    }

    #[test]
    fn nfs_options_follow_the_version_and_the_link_count() {
        let m = NfsMount {
            server: "10.10.0.5".parse().unwrap(),
            export: "/export".into(),
            path: "/data".into(),
            vers: NfsVersion::V41,
            nconnect: None,
            soft: false,
            read_only: false,
        };
        assert_eq!(
            m.options(4, Some("10.200.0.11".parse().unwrap())),
            "vers=4.1,addr=10.10.0.5,proto=tcp,hard,timeo=100,retrans=3,nconnect=4,clientaddr=10.200.0.11"
        );
        let v3 = NfsMount {
            vers: NfsVersion::V3,
            nconnect: Some(40),
            read_only: true,
            ..m.clone()
        };
        assert_eq!(
            v3.options(4, None),
            "vers=3,addr=10.10.0.5,proto=tcp,hard,timeo=100,retrans=3,nconnect=16,nolock,ro"
        );
        let v40 = NfsMount {
            vers: NfsVersion::V40,
            ..m
        };
        assert_eq!(v40.connections(8), 1);
        assert!(!v40.options(8, None).contains("nconnect"));
    }

    #[test]
    fn command_and_args_replace_entrypoint_and_cmd_as_kubernetes_does() {
        let w = |command: Option<&[&str]>, args: Option<&[&str]>| Workload {
            image: ImageRef::parse(&format!("disk:W@{D}")).unwrap(),
            command: command.map(|c| c.iter().map(|s| s.to_string()).collect()),
            args: args.map(|c| c.iter().map(|s| s.to_string()).collect()),
            env: vec![],
            hostname: None,
            drain_command: None,
            stop_timeout_s: 30,
            cpu_weight: 20,
            memory_max_mib: None,
            pids_max: 100,
            mounts: vec![],
        };
        let ep = vec!["/ep".to_string()];
        let cmd = vec!["cmd".to_string()];
        assert_eq!(w(None, None).argv(&ep, &cmd), ["/ep", "cmd"]);
        assert_eq!(w(Some(&["/x"]), None).argv(&ep, &cmd), ["/x"]);
        assert_eq!(w(None, Some(&["a"])).argv(&ep, &cmd), ["/ep", "a"]);
        assert_eq!(w(Some(&["/x"]), Some(&["a"])).argv(&ep, &cmd), ["/x", "a"]);
    }

    #[test]
    fn workload_paths_are_absolute_plain_and_outside_the_roots_own_mounts() {
        assert!(check_path("/data/cms").is_ok());
        for (p, want) in [
            ("data", "absolute"),
            ("/", "root"),
            ("/data/../etc", "\"..\""),
            ("/data//x", "\"\""),
            ("/proc/x", "/proc"),
            ("/dev", "/dev"),
            ("/a,b", "','"),
        ] {
            let e = check_path(p).unwrap_err();
            assert!(e.contains(want), "{p}: {e}");
        }
    }
}
