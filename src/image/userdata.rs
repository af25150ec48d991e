//! User-data: how a booted image learns the site config and which host it is. Pure (no I/O):
//! the init driver ([`crate::image`]) fetches bytes from each source and hands them here.
//!
//! Data flow: raw bytes from a source → [`decode`] (32 KiB limit, gzip detected by its
//! `1f 8b` magic, UTF-8) → [`validate`] (split off the optional top-level `appliance { }` block
//! that names this host, parse the rest as the site file with [`config::parse`], check the host
//! exists and its private key matches the site file) → [`Accepted`], whose sha256 and source go
//! into the [`CacheRecord`] kept on the state partition.
//!
//! The `appliance` block is additive: the site file stays exactly the file every host reads, and
//! the host-specific part (name, private key, static addresses) rides next to it in the same
//! user-data. The block is blanked out (spaces, newlines kept) before the site part is parsed,
//! so every diagnostic still points at the right line and column of the user-data.

use crate::model::config::{self, Config, Role};
use crate::model::diag::{suggest, Diagnostic, Report};
use crate::model::key::PrivateKey;
use ipnet::IpNet;
use kdl::{KdlDocument, KdlNode, KdlValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read as _;
use std::net::IpAddr;

/// The most user-data a source may deliver (Exoscale caps it at 32 KiB).
pub const USER_DATA_LIMIT: usize = 32 * 1024;
/// The most a gzip user-data may expand to: a guard against compression bombs.
pub const DECOMPRESSED_LIMIT: usize = 1024 * 1024;

/// Where a config came from, in discovery order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `appliance.config=` on the kernel command line.
    Cmdline,
    /// A NoCloud seed (filesystem label `cidata` / `CIDATA`) or an OpenStack-style `config-2`
    /// drive holding `user-data`.
    Cidata,
    /// The Exoscale metadata service (`http://169.254.169.254/1.0/user-data`).
    Metadata,
    /// The last good config, kept on the state partition.
    Cache,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Cmdline => "cmdline",
            Source::Cidata => "cidata",
            Source::Metadata => "metadata",
            Source::Cache => "cache",
        })
    }
}

/// Why user-data bytes were refused before any parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserDataError {
    /// Sources read at most one byte past the limit: the count is a lower bound.
    #[error("user-data is over the {USER_DATA_LIMIT}-byte limit (read {0} bytes); gzip it: `exo ... --cloud-init-compress`")]
    TooLarge(usize),
    #[error("user-data is empty")]
    Empty,
    #[error("user-data looks gzip-compressed (1f 8b) but does not decompress: {0}")]
    Gzip(String),
    #[error("gzip user-data expands beyond {DECOMPRESSED_LIMIT} bytes")]
    Bomb,
    #[error("user-data is not UTF-8 text (invalid byte at offset {0})")]
    NotUtf8(usize),
    #[error("user-data is a cloud-init document ({0}); this image reads the site file (KDL) with an optional `appliance {{ host \"NAME\" }}` block")]
    CloudInit(String),
}

/// Turn raw user-data into text: size limit, gzip by magic, UTF-8, not a cloud-init document.
pub fn decode(raw: &[u8]) -> Result<String, UserDataError> {
    if raw.len() > USER_DATA_LIMIT {
        return Err(UserDataError::TooLarge(raw.len()));
    }
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw)
            .take(DECOMPRESSED_LIMIT as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| UserDataError::Gzip(e.to_string()))?;
        if out.len() > DECOMPRESSED_LIMIT {
            return Err(UserDataError::Bomb);
        }
        out
    } else {
        raw.to_vec()
    };
    let text = String::from_utf8(bytes)
        .map_err(|e| UserDataError::NotUtf8(e.utf8_error().valid_up_to()))?;
    let first = text.trim_start().lines().next().unwrap_or("").trim();
    if first.is_empty() {
        return Err(UserDataError::Empty);
    }
    if first.starts_with("#cloud-config")
        || first.starts_with("#!")
        || first.starts_with("Content-Type:")
    {
        return Err(UserDataError::CloudInit(first.chars().take(40).collect()));
    }
    Ok(text)
}

/// Lower-case hex sha256 of the decoded user-data text: the config's identity in logs and the
/// cache (the same config gzipped or not has one hash).
pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// Lower-case hex of `bytes` (hashes, verity salts).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Static IPv4/IPv6 settings for one interface, from the `appliance` block. Interfaces not
/// named there use DHCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub name: String,
    pub addresses: Vec<IpNet>,
    pub gateway: Option<IpAddr>,
}

/// A validated user-data: the site config and what this machine is in it.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub host: String,
    pub role: Role,
    pub config: Config,
    /// The site part of the user-data (the `appliance` block blanked out), what `appliance run`
    /// reads.
    pub site_text: String,
    /// This host's private key, when the user-data carries one.
    pub private_key: Option<PrivateKey>,
    pub interfaces: Vec<Interface>,
    /// An IPv4 address behind the tunnels that must answer ICMP echo for this machine to count
    /// as healthy (`health-check` in the block).
    pub health_check: Option<std::net::Ipv4Addr>,
    /// A disk image (file, block device, or `http://` URL of the raw image, gzip or not) to
    /// install into the inactive slot once this boot is healthy (`install-image` in the
    /// block); installed once per root hash.
    pub install_image: Option<String>,
    /// The root hash the image must have (`install-root-hash`; required for URLs, whose
    /// transport authenticates nothing).
    pub install_root_hash: Option<String>,
    /// sha256 of the whole decoded user-data.
    pub sha256: String,
    /// The whole decoded user-data, as validated (what the cache keeps and the hash covers).
    pub original: String,
}

/// Who this machine may be: what the user-data's host is resolved with.
#[derive(Debug, Default, Clone, Copy)]
pub struct Who<'a> {
    /// The host name when the user-data names none (`appliance.host=`, `--node`).
    pub host: Option<&'a str>,
    /// This machine's addresses (DHCP leases): a pool user-data's slot is the one whose
    /// range holds one of them.
    pub addresses: &'a [IpAddr],
    /// A pool slot chosen explicitly (`appliance run --user-data F --slot N`).
    pub slot: Option<u32>,
}

impl<'a> Who<'a> {
    pub fn named(host: Option<&'a str>) -> Who<'a> {
        Who {
            host,
            ..Who::default()
        }
    }
}

const BLOCK: &str = "appliance";
const BLOCK_FIELDS: &[&str] = &[
    "host",
    "pool",
    "pool-secret",
    "private-key",
    "interface",
    "health-check",
    "install-image",
];
const INTERFACE_FIELDS: &[&str] = &["address", "gateway"];

/// What the `appliance` block said, with spans for later checks.
#[derive(Default)]
struct HostBlock {
    host: Option<(String, (usize, usize))>,
    pool: Option<(String, (usize, usize))>,
    pool_secret: Option<([u8; 32], (usize, usize))>,
    private_key: Option<(PrivateKey, (usize, usize))>,
    interfaces: Vec<Interface>,
    health_check: Option<std::net::Ipv4Addr>,
    install_image: Option<(String, (usize, usize))>,
    install_root_hash: Option<String>,
}

/// `text` with the value of every `private-key "..."` and `pool-secret "..."` replaced by as
/// many `*` (offsets and lines stay where they were): no diagnostic may quote a secret, valid
/// or not.
pub fn redact_private_keys(text: &str) -> String {
    let mut out = text.as_bytes().to_vec();
    for word in ["private-key", "pool-secret"] {
        redact_after(text, word, &mut out);
    }
    String::from_utf8(out).expect("only ASCII bytes were replaced")
}

fn redact_after(text: &str, word: &str, out: &mut [u8]) {
    let mut from = 0;
    while let Some(i) = text[from..].find(word) {
        let mut j = from + i + word.len();
        let b = text.as_bytes();
        while j < b.len() && matches!(b[j], b' ' | b'\t' | b'=') {
            j += 1;
        }
        if j < b.len() && b[j] == b'"' {
            j += 1;
            while j < b.len() && b[j] != b'"' && b[j] != b'\n' {
                if b[j].is_ascii() {
                    out[j] = b'*';
                }
                j += 1;
            }
        }
        from = j.max(from + i + 1);
    }
}

/// Validate decoded user-data. `file` names it in diagnostics (e.g. `user-data (cidata)`);
/// `fallback_host` is used when the user-data names no host (`appliance.host=` on the kernel
/// command line). Every problem is a positioned diagnostic; nothing is accepted partially.
pub fn validate(file: &str, text: &str, who: &Who) -> Result<Accepted, Report> {
    // Diagnostics quote source lines: private keys are blanked in what they quote.
    let shown = redact_private_keys(text);
    let report = |diagnostics: Vec<Diagnostic>| Report {
        file: file.to_string(),
        source: shown.clone(),
        diagnostics,
    };
    // A syntax error (or nesting too deep for the parser) is reported by the site parser,
    // which renders KDL errors well.
    if config::too_deep(text).is_some() || KdlDocument::parse_v2(text).is_err() {
        let r = config::parse(file, text).expect_err("KDL that does not parse is refused");
        return Err(report(r.diagnostics));
    }
    let Ok(doc) = KdlDocument::parse_v2(text) else {
        unreachable!("parsed above")
    };
    let mut diags = Vec::new();
    let mut block = HostBlock::default();
    let mut site_text = text.to_string();
    let mut seen: Option<&KdlNode> = None;
    for node in doc.nodes().iter().filter(|n| n.name().value() == BLOCK) {
        if let Some(first) = seen {
            let (line, _) = crate::model::diag::line_col(text, first.span().offset());
            diags.push(
                Diagnostic::new(name_span(node), "duplicate `appliance` block")
                    .label("second block")
                    .help(format!("merge it into the first one (line {line})")),
            );
            continue;
        }
        seen = Some(node);
        block = host_block(node, &mut diags);
        blank(&mut site_text, node.span().offset(), node.span().len());
    }
    let parsed = config::parse(file, &site_text);
    let cfg = match parsed {
        Ok(cfg) => Some(cfg),
        Err(r) => {
            diags.extend(r.diagnostics);
            None
        }
    };
    let mut host = None;
    if let Some(cfg) = &cfg {
        host = match block.pool.is_some() {
            true => check_slot(cfg, &block, who, &mut diags),
            false => check_host(cfg, &block, who.host, &doc, &mut diags),
        };
    }
    match (cfg, host) {
        (Some(config), Some((host, role, key))) if diags.is_empty() => Ok(Accepted {
            host,
            role,
            config,
            site_text,
            private_key: key.or(block.private_key.map(|(k, _)| k)),
            interfaces: block.interfaces,
            health_check: block.health_check,
            install_image: block.install_image.map(|(s, _)| s),
            install_root_hash: block.install_root_hash,
            sha256: sha256_hex(text),
            original: text.to_string(),
        }),
        _ => {
            diags.sort_by_key(|d| d.offset);
            Err(report(diags))
        }
    }
}

fn name_span(node: &KdlNode) -> (usize, usize) {
    let s = node.name().span();
    (s.offset(), s.len())
}

/// Replace a byte range with spaces, keeping newlines so positions after it do not move.
fn blank(text: &mut String, offset: usize, len: usize) {
    let end = (offset + len).min(text.len());
    // Byte for byte, so multi-byte characters keep their length too.
    let spaces: String = text.as_bytes()[offset..end]
        .iter()
        .map(|&b| if b == b'\n' { '\n' } else { ' ' })
        .collect();
    text.replace_range(offset..end, &spaces);
}

fn only_string(node: &KdlNode, diags: &mut Vec<Diagnostic>) -> Option<(String, (usize, usize))> {
    let entries = node.entries();
    match entries {
        [e] if e.name().is_none() => match e.value() {
            KdlValue::String(s) => Some((s.clone(), (e.span().offset(), e.span().len()))),
            _ => {
                diags.push(
                    Diagnostic::new(
                        (e.span().offset(), e.span().len()),
                        format!("`{}` takes a string", node.name().value()),
                    )
                    .label("not a string"),
                );
                None
            }
        },
        _ => {
            diags.push(
                Diagnostic::new(
                    name_span(node),
                    format!(
                        "`{}` takes exactly one string argument",
                        node.name().value()
                    ),
                )
                .label("here"),
            );
            None
        }
    }
}

fn host_block(node: &KdlNode, diags: &mut Vec<Diagnostic>) -> HostBlock {
    let mut b = HostBlock::default();
    if !node.entries().is_empty() {
        diags.push(
            Diagnostic::new(name_span(node), "the `appliance` block takes no arguments")
                .label("here")
                .help("write `appliance { host \"NAME\" }`"),
        );
    }
    let Some(children) = node.children() else {
        return b;
    };
    for field in children.nodes() {
        let name = field.name().value();
        match name {
            "host" | "pool" | "pool-secret" | "private-key" | "health-check" | "install-image"
                if field.children().is_some() =>
            {
                diags.push(
                    Diagnostic::new(name_span(field), format!("`{name}` takes no block"))
                        .label("here"),
                )
            }
            "host" => {
                if b.host.is_some() {
                    diags.push(
                        Diagnostic::new(name_span(field), "duplicate `host`").label("second one"),
                    );
                } else {
                    b.host = only_string(field, diags);
                }
            }
            "pool" => b.pool = only_string(field, diags),
            "pool-secret" => {
                if let Some((s, span)) = only_string(field, diags) {
                    match crate::model::key::decode_key(&s) {
                        Ok(k) => b.pool_secret = Some((k, span)),
                        Err(e) => diags.push(
                            Diagnostic::new(span, format!("invalid pool secret: {e}"))
                                .label("not a pool secret")
                                .help("the secret is 44 characters of base64, as `appliance provision` writes it"),
                        ),
                    }
                }
            }
            "private-key" => {
                if let Some((s, span)) = only_string(field, diags) {
                    match s.parse::<PrivateKey>() {
                        Ok(k) => b.private_key = Some((k, span)),
                        Err(e) => diags.push(
                            Diagnostic::new(span, format!("invalid private key: {e}"))
                                .label("not a WireGuard key")
                                .help("a key is 44 characters of base64, as `appliance genkey` prints"),
                        ),
                    }
                }
            }
            "install-image" => {
                if let Some((s, span)) = only_string(field, diags) {
                    if s.starts_with('/') || s.starts_with("http://") {
                        b.install_image = Some((s, span));
                    } else {
                        diags.push(
                            Diagnostic::new(span, format!("install-image {s:?} is neither an absolute path nor an http:// URL"))
                                .label("not a path or URL")
                                .help("name a block device or image file (\"/dev/vdb\"), or the raw image's URL (\"http://10.0.0.5/appliance.raw.gz\")"),
                        );
                    }
                }
            }
            "install-root-hash" => {
                if let Some((s, span)) = only_string(field, diags) {
                    if s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit()) {
                        b.install_root_hash = Some(s.to_ascii_lowercase());
                    } else {
                        diags.push(
                            Diagnostic::new(span, "install-root-hash is not a 64-digit hex sha256")
                                .label("not a root hash")
                                .help("copy it from the image's root-hash-A file (images/build.sh prints it)"),
                        );
                    }
                }
            }
            "health-check" => {
                if let Some((s, span)) = only_string(field, diags) {
                    match s.parse::<std::net::Ipv4Addr>() {
                        Ok(a) => b.health_check = Some(a),
                        Err(_) => diags.push(
                            Diagnostic::new(span, format!("invalid health-check address {s:?}"))
                                .label("not an IPv4 address")
                                .help("name an IPv4 address behind the tunnels that answers ping, e.g. a gateway's site-address"),
                        ),
                    }
                }
            }
            "interface" => {
                if let Some(i) = interface(field, diags) {
                    if b.interfaces.iter().any(|x| x.name == i.name) {
                        diags.push(
                            Diagnostic::new(
                                name_span(field),
                                format!("duplicate interface {:?}", i.name),
                            )
                            .label("second one"),
                        );
                    } else {
                        b.interfaces.push(i);
                    }
                }
            }
            other => {
                let mut d = Diagnostic::new(
                    name_span(field),
                    format!("unknown field `{other}` in the appliance block"),
                )
                .label("unknown");
                d.help = Some(match suggest(other, BLOCK_FIELDS) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("expected one of: {}", BLOCK_FIELDS.join(", ")),
                });
                diags.push(d);
            }
        }
    }
    if let Some((url, span)) = &b.install_image {
        if url.starts_with("http://") && b.install_root_hash.is_none() {
            diags.push(
                Diagnostic::new(*span, "an install-image URL needs install-root-hash")
                    .label("unauthenticated download")
                    .help("plain HTTP proves nothing about the image: pin its root hash with `install-root-hash \"…\"` (root-hash-A of the build)"),
            );
        }
    }
    b
}

fn interface(node: &KdlNode, diags: &mut Vec<Diagnostic>) -> Option<Interface> {
    let (name, _) = only_string(node, diags)?;
    let mut i = Interface {
        name,
        addresses: Vec::new(),
        gateway: None,
    };
    for field in node.children().map(|c| c.nodes()).unwrap_or_default() {
        let fname = field.name().value();
        match fname {
            "address" => {
                let (s, span) = only_string(field, diags)?;
                match s.parse::<IpNet>() {
                    Ok(n) => i.addresses.push(n),
                    Err(_) => diags.push(
                        Diagnostic::new(span, format!("invalid address {s:?}"))
                            .label("not an address with a prefix length")
                            .help("write it as ADDRESS/PREFIX, e.g. \"192.0.2.10/24\""),
                    ),
                }
            }
            "gateway" => {
                let (s, span) = only_string(field, diags)?;
                match s.parse::<IpAddr>() {
                    Ok(a) => i.gateway = Some(a),
                    Err(_) => diags.push(
                        Diagnostic::new(span, format!("invalid gateway address {s:?}"))
                            .label("not an IP address"),
                    ),
                }
            }
            other => diags.push(
                Diagnostic::new(
                    name_span(field),
                    format!("unknown field `{other}` in an interface"),
                )
                .label("unknown")
                .help(format!("expected one of: {}", INTERFACE_FIELDS.join(", "))),
            ),
        }
    }
    if i.addresses.is_empty() {
        diags.push(
            Diagnostic::new(
                name_span(node),
                format!("interface {:?} has no address", i.name),
            )
            .label("static interface without an address")
            .help("add `address \"ADDRESS/PREFIX\"`, or leave the interface out to use DHCP"),
        );
        return None;
    }
    Some(i)
}

/// A pool user-data: the slot from this machine's address (or `who.slot`), its key derived
/// from the pool secret and checked against the key the site file enrolled for the slot.
fn check_slot(
    cfg: &Config,
    block: &HostBlock,
    who: &Who,
    diags: &mut Vec<Diagnostic>,
) -> Option<(String, Role, Option<PrivateKey>)> {
    let (name, at) = block.pool.clone()?;
    for (what, given) in [
        ("host", block.host.as_ref().map(|h| h.1)),
        ("private-key", block.private_key.as_ref().map(|k| k.1)),
    ] {
        if let Some(span) = given {
            diags.push(
                Diagnostic::new(span, format!("a pool user-data has no `{what}`"))
                    .label("not with `pool`")
                    .help("every instance of the pool boots the same user-data; each takes the slot of its private-network address and derives that slot's key"),
            );
            return None;
        }
    }
    let Some((secret, _)) = block.pool_secret else {
        diags.push(
            Diagnostic::new(at, format!("pool {name:?} without `pool-secret`"))
                .label("no secret to derive the slot key from")
                .help("write the user-data with `appliance provision --pool NAME`"),
        );
        return None;
    };
    let Some(pool) = cfg.pools.iter().find(|p| p.name == name) else {
        let names: Vec<&str> = cfg.pools.iter().map(|p| p.name.as_str()).collect();
        diags.push(
            Diagnostic::new(at, format!("pool {name:?} is not in the site file"))
                .label("unknown pool")
                .help(match suggest(&name, &names) {
                    Some(s) => format!("did you mean {s:?}?"),
                    None => format!("the site file's pools: {}", names.join(", ")),
                }),
        );
        return None;
    };
    let slot = match who.slot {
        Some(s) if s < pool.count => s,
        Some(s) => {
            diags.push(
                Diagnostic::new(at, format!("slot {s} is outside pool {name:?}"))
                    .label(format!("the pool has slots 0..={}", pool.count - 1)),
            );
            return None;
        }
        None => match who.addresses.iter().find_map(|a| pool.slot_of(*a)) {
            Some(s) => s,
            None => {
                let range = match pool.dhcp_start {
                    Some(a) => format!(
                        "{a} .. {}",
                        std::net::Ipv4Addr::from(u32::from(a).saturating_add(pool.count - 1))
                    ),
                    None => "none: the pool sets no dhcp-start".into(),
                };
                let have: Vec<String> = who.addresses.iter().map(|a| a.to_string()).collect();
                diags.push(
                    Diagnostic::new(at, format!("no address of this machine is in pool {name:?}'s DHCP range ({range})"))
                        .label("cannot tell which slot this is")
                        .help(format!(
                            "this machine has {}; the slot is the private-network lease minus dhcp-start",
                            if have.is_empty() { "no address yet".to_string() } else { have.join(", ") }
                        )),
                );
                return None;
            }
        },
    };
    let key = PrivateKey::for_slot(&secret, &name, slot);
    let host = format!("{name}-{slot}");
    match pool.keys.get(&slot) {
        None => {
            diags.push(
                Diagnostic::new(at, format!("slot {slot} of pool {name:?} is not enrolled in the site file"))
                    .label(format!("{host} has no key"))
                    .help("run `appliance provision --pool NAME` and deploy its site file to the gateways"),
            );
            None
        }
        Some(k) if *k != key.public() => {
            diags.push(
                Diagnostic::new(at, format!("slot {slot} of pool {name:?} is enrolled with a key this pool secret does not derive"))
                    .label(format!("{host} keeps its own key"))
                    .help(format!(
                        "the site file lists {k} for {host}; the secret derives {}: a slot keyed by hand is not for the pool's instances",
                        key.public()
                    )),
            );
            None
        }
        Some(_) => Some((host, Role::Node, Some(key))),
    }
}

fn check_host(
    cfg: &Config,
    block: &HostBlock,
    fallback: Option<&str>,
    doc: &KdlDocument,
    diags: &mut Vec<Diagnostic>,
) -> Option<(String, Role, Option<PrivateKey>)> {
    let at = block
        .host
        .as_ref()
        .map(|h| h.1)
        .or_else(|| {
            doc.nodes()
                .iter()
                .find(|n| n.name().value() == BLOCK)
                .map(name_span)
        })
        .unwrap_or((0, 0));
    let Some(host) = block.host.as_ref().map(|h| h.0.as_str()).or(fallback) else {
        diags.push(
            Diagnostic::new(at, "the user-data does not say which host this machine is")
                .label("no host name")
                .help("add `appliance { host \"NAME\" }` with a gateway, node or relay name of the site file, or `appliance.host=NAME` on the kernel command line"),
        );
        return None;
    };
    let Some(role) = cfg.role_of(host) else {
        let names = cfg.host_names();
        let mut d = Diagnostic::new(at, format!("host {host:?} is not in the site file"))
            .label("unknown host");
        d.help = Some(match suggest(host, &names) {
            Some(s) => format!("did you mean {s:?}?"),
            None => format!("the site file names: {}", names.join(", ")),
        });
        diags.push(d);
        return None;
    };
    if let Some((key, span)) = &block.private_key {
        if let Some(listed) = cfg.public_key_of(host) {
            if listed != key.public() {
                diags.push(
                    Diagnostic::new(*span, format!("this private key does not belong to {host}"))
                        .label("wrong key")
                        .help(format!(
                            "its public key is {}, the site file lists {listed} for {host}",
                            key.public()
                        )),
                );
                return None;
            }
        }
    }
    Some((host.to_string(), role, None))
}

/// The last good config as kept on the state partition: one JSON file, replaced atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// Where the config was first accepted from.
    pub source: Source,
    pub sha256: String,
    /// The decoded user-data, exactly as validated.
    pub user_data: String,
}

impl CacheRecord {
    pub fn new(source: Source, text: &str) -> CacheRecord {
        CacheRecord {
            source,
            sha256: sha256_hex(text),
            user_data: text.to_string(),
        }
    }

    /// Read a cache file, refusing one whose hash does not match its content.
    pub fn from_json(bytes: &[u8]) -> Result<CacheRecord, String> {
        let r: CacheRecord =
            serde_json::from_slice(bytes).map_err(|e| format!("not a cache record: {e}"))?;
        let actual = sha256_hex(&r.user_data);
        if actual != r.sha256 {
            return Err(format!(
                "cache record is damaged: hash {actual}, recorded {}",
                r.sha256
            ));
        }
        Ok(r)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a cache record serialises")
    }
}

/// What the kernel command line says to the image (`appliance.*` parameters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// `appliance.config=`: `base64:DATA` (the user-data, possibly gzip, base64) or
    /// `http://IP[:PORT]/PATH`.
    pub config: Option<String>,
    /// `appliance.host=NAME`: which host this is when the user-data does not say.
    pub host: Option<String>,
    /// `appliance.verity=HEX`: the root hash of the slot's dm-verity tree.
    pub verity: Option<String>,
    /// `appliance.slot=A|B`: the root slot to mount.
    pub slot: Option<String>,
    /// `appliance.wait=SECONDS`: how long to poll the live sources before the cache is used.
    pub wait: Option<u64>,
    /// `appliance.metadata=URL`: the metadata service base (default the Exoscale one).
    pub metadata: Option<String>,
}

/// Split a kernel command line into words, honouring double quotes like the kernel does.
fn cmdline_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

impl Cmdline {
    pub fn parse(s: &str) -> Cmdline {
        let mut c = Cmdline::default();
        for w in cmdline_words(s) {
            let Some((k, v)) = w.split_once('=') else {
                continue;
            };
            let v = v.to_string();
            match k {
                "appliance.config" => c.config = Some(v),
                "appliance.host" => c.host = Some(v),
                "appliance.verity" => c.verity = Some(v),
                "appliance.slot" => c.slot = Some(v),
                "appliance.wait" => c.wait = v.parse().ok(),
                "appliance.metadata" => c.metadata = Some(v),
                _ => {}
            }
        }
        c
    }
}

/// How `appliance.config=` asks for the user-data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdlineConfig {
    Inline(Vec<u8>),
    Url(String),
}

pub fn cmdline_config(value: &str) -> Result<CmdlineConfig, String> {
    use base64::Engine as _;
    if let Some(data) = value.strip_prefix("base64:") {
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .map(CmdlineConfig::Inline)
            .map_err(|e| format!("appliance.config=base64:…: not valid base64 ({e})"))
    } else if value.starts_with("http://") {
        Ok(CmdlineConfig::Url(value.to_string()))
    } else {
        Err(format!(
            "appliance.config={value:?}: expected `base64:DATA` or `http://IP/PATH`"
        ))
    }
}

/// One live source's answer in a discovery round.
#[derive(Debug, Clone)]
pub enum Found {
    /// Nothing there (yet): no parameter, no seed device, no answer from the service.
    Absent,
    /// Nothing there yet, for a reason worth telling while the image waits (e.g. the metadata
    /// service does not answer).
    Unavailable(String),
    /// Something there that was refused, and why (the full, rendered reason).
    Refused {
        sha256: Option<String>,
        reason: String,
    },
    Valid(Box<Accepted>),
}

/// What to do after a discovery round.
#[derive(Debug)]
pub enum Decision {
    Apply(Source, Box<Accepted>),
    /// Use the cached config: the live sources gave nothing valid within the wait.
    UseCache,
    /// Keep polling.
    Wait,
}

/// Decide from one round of live sources (in discovery order: cmdline, cidata, metadata).
/// The first valid source wins; refused ones are skipped (the caller logs why). Once the wait
/// is over the cache stands in; with no cache the image keeps polling, forever.
pub fn decide(round: Vec<(Source, Found)>, wait_over: bool, have_cache: bool) -> Decision {
    for (source, found) in round {
        if let Found::Valid(a) = found {
            return Decision::Apply(source, a);
        }
    }
    if wait_over && have_cache {
        Decision::UseCache
    } else {
        Decision::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    const SITE: &str = r#"site "s" {
    asn 65010
    cloud-block "10.200.0.0/16"
    site-prefix "10.10.0.0/16"
    links 2
}
gateway "gw1" {
    endpoint "192.0.2.1"
    site-address "10.10.0.2"
    public-key "1nE7Va0QzFM6HwnWNX6LFyqkPZDBqPd1ib73nKyCE2Y="
}
node "c1" {
    address "10.200.0.11"
    public-key "Yv/7p9TBowqS327ezLJ0y0qDFu1eWh6tlOG0wxZybZE="
}
"#;
    const GW1_PRIVATE: &str = "AKJjz/CfPmr/9gHKILEiAShBWbid0apMxtuByI43EGc=";

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn plain_user_data_decodes_to_its_text() {
        assert_eq!(decode(SITE.as_bytes()).unwrap(), SITE);
    }

    #[test]
    fn gzip_user_data_is_detected_by_its_magic_and_expanded() {
        assert_eq!(decode(&gzip(SITE.as_bytes())).unwrap(), SITE);
    }

    #[test]
    fn user_data_over_32_kib_is_refused_before_decompression() {
        let big = vec![b' '; USER_DATA_LIMIT + 1];
        assert_eq!(
            decode(&big),
            Err(UserDataError::TooLarge(USER_DATA_LIMIT + 1))
        );
        assert!(decode(&vec![b'x'; USER_DATA_LIMIT]).is_ok());
    }

    #[test]
    fn a_gzip_bomb_is_refused() {
        let bomb = gzip(&vec![b' '; DECOMPRESSED_LIMIT + 10]);
        assert!(bomb.len() <= USER_DATA_LIMIT);
        assert_eq!(decode(&bomb), Err(UserDataError::Bomb));
    }

    #[test]
    fn truncated_gzip_is_refused_with_the_reason() {
        let g = gzip(SITE.as_bytes());
        assert!(matches!(
            decode(&g[..g.len() / 2]),
            Err(UserDataError::Gzip(_))
        ));
    }

    #[test]
    fn cloud_config_documents_are_refused_with_a_hint() {
        let e = decode(b"#cloud-config\nusers: []\n").unwrap_err();
        assert!(e.to_string().contains("appliance { host"), "{e}");
        assert_eq!(decode(b"  \n\n"), Err(UserDataError::Empty));
        assert_eq!(decode(&[b'a', 0xff]), Err(UserDataError::NotUtf8(1)));
    }

    #[test]
    fn the_appliance_block_names_the_host_and_is_blanked_for_the_site_parser() {
        let text = format!("appliance {{\n    host \"c1\"\n}}\n{SITE}");
        let a = validate("user-data", &text, &Who::default()).unwrap();
        assert_eq!((a.host.as_str(), a.role), ("c1", Role::Node));
        assert_eq!(a.site_text.len(), text.len());
        assert!(!a.site_text.contains("appliance"));
        assert_eq!(a.site_text.lines().count(), text.lines().count());
        assert_eq!(a.sha256, sha256_hex(&text));
        config::parse("x", &a.site_text).unwrap();
    }

    #[test]
    fn diagnostics_after_the_block_keep_their_line_numbers() {
        let text = format!(
            "appliance {{ host \"c1\" }}\n{}",
            SITE.replace("links 2", "links 0")
        );
        let r = validate("user-data", &text, &Who::default()).unwrap_err();
        let loc = r.located();
        assert_eq!(loc[0].line, 6, "{}", r.render());
    }

    #[test]
    fn without_a_block_the_kernel_command_line_host_is_used() {
        assert_eq!(
            validate("u", SITE, &Who::named(Some("gw1"))).unwrap().role,
            Role::Gateway
        );
        let r = validate("u", SITE, &Who::default()).unwrap_err();
        assert!(
            r.render().contains("does not say which host"),
            "{}",
            r.render()
        );
    }

    #[test]
    fn an_unknown_host_is_refused_with_a_suggestion() {
        let text = format!("appliance {{ host \"c2\" }}\n{SITE}");
        let r = validate("u", &text, &Who::default()).unwrap_err().render();
        assert!(
            r.contains("host \"c2\" is not in the site file") && r.contains("did you mean \"c1\""),
            "{r}"
        );
    }

    #[test]
    fn a_private_key_must_match_the_site_files_public_key() {
        let ok = format!("appliance {{ host \"gw1\"; private-key \"{GW1_PRIVATE}\" }}\n{SITE}");
        let a = validate("u", &ok, &Who::default()).unwrap();
        assert_eq!(a.private_key.unwrap().to_base64(), GW1_PRIVATE);
        let wrong = format!("appliance {{ host \"c1\"; private-key \"{GW1_PRIVATE}\" }}\n{SITE}");
        let r = validate("u", &wrong, &Who::default()).unwrap_err().render();
        assert!(r.contains("does not belong to c1"), "{r}");
        assert!(
            !r.contains("1nE7Va0QzFM6HwnWNX6LFyqkPZDBqPd1ib73nKyCE2Y= for"),
            "{r}"
        );
        assert!(!r.contains(GW1_PRIVATE), "the key is quoted: {r}");
        assert!(r.contains("private-key \"********"), "{r}");
        // Nor when another error sits on its line, the key is invalid, or the text does not
        // parse at all.
        for text in [
            format!("appliance {{ host \"gw1\"; private-key \"{GW1_PRIVATE}\"; health-check \"x\" }}\n{SITE}"),
            format!("appliance {{ host \"gw1\"; private-key \"{}\" }}\n{SITE}", &GW1_PRIVATE[..40]),
            format!("appliance {{ host \"gw1\"; private-key \"{GW1_PRIVATE}\" }} }}\n{SITE}"),
        ] {
            let r = validate("u", &text, &Who::default()).unwrap_err().render();
            assert!(!r.contains(&GW1_PRIVATE[..40]), "the key is quoted: {r}");
        }
    }

    #[test]
    fn static_interfaces_are_read_and_checked() {
        let text = format!(
            "appliance {{ host \"c1\"; interface \"eth1\" {{ address \"192.0.2.5/24\"; gateway \"192.0.2.1\" }} }}\n{SITE}"
        );
        let a = validate("u", &text, &Who::default()).unwrap();
        assert_eq!(a.interfaces[0].addresses[0].to_string(), "192.0.2.5/24");
        let bad = format!(
            "appliance {{ host \"c1\"; interface \"eth1\" {{ address \"192.0.2.5\" }} }}\n{SITE}"
        );
        assert!(validate("u", &bad, &Who::default())
            .unwrap_err()
            .render()
            .contains("ADDRESS/PREFIX"));
    }

    #[test]
    fn a_health_check_names_an_ipv4_address() {
        let text = format!("appliance {{ host \"c1\"; health-check \"10.10.0.2\" }}\n{SITE}");
        assert_eq!(
            validate("u", &text, &Who::default()).unwrap().health_check,
            Some("10.10.0.2".parse().unwrap())
        );
        let bad = format!("appliance {{ host \"c1\"; health-check \"gw1\" }}\n{SITE}");
        assert!(validate("u", &bad, &Who::default())
            .unwrap_err()
            .render()
            .contains("not an IPv4 address"));
    }

    #[test]
    fn an_install_url_must_pin_the_root_hash() {
        let url = format!(
            "appliance {{ host \"c1\"; install-image \"http://10.0.0.5/a.raw.gz\" }}\n{SITE}"
        );
        assert!(validate("u", &url, &Who::default())
            .unwrap_err()
            .render()
            .contains("needs install-root-hash"));
        let pinned = url.replace(
            "a.raw.gz\"",
            &format!("a.raw.gz\"; install-root-hash \"{}\"", "AB".repeat(32)),
        );
        let a = validate("u", &pinned, &Who::default()).unwrap();
        assert_eq!(a.install_root_hash, Some("ab".repeat(32)));
        let relative = format!("appliance {{ host \"c1\"; install-image \"vdb\" }}\n{SITE}");
        assert!(validate("u", &relative, &Who::default())
            .unwrap_err()
            .render()
            .contains("neither an absolute path"));
    }

    #[test]
    fn unknown_and_duplicate_block_fields_are_refused() {
        let text = format!("appliance {{ hots \"c1\" }}\n{SITE}");
        assert!(validate("u", &text, &Who::default())
            .unwrap_err()
            .render()
            .contains("did you mean `host`"));
        let text = format!("appliance {{ host \"c1\" }}\nappliance {{ host \"c1\" }}\n{SITE}");
        assert!(validate("u", &text, &Who::default())
            .unwrap_err()
            .render()
            .contains("duplicate `appliance` block"));
    }

    #[test]
    fn kdl_syntax_errors_are_reported_with_their_position() {
        let r = validate(
            "user-data (cidata)",
            "site \"s\" {\n  asn 1\n",
            &Who::default(),
        )
        .unwrap_err();
        assert!(r.render().contains("user-data (cidata)"), "{}", r.render());
    }

    #[test]
    fn a_cache_record_round_trips_and_detects_damage() {
        let r = CacheRecord::new(Source::Metadata, SITE);
        let back = CacheRecord::from_json(r.to_json().as_bytes()).unwrap();
        assert_eq!(back, r);
        let damaged = r.to_json().replace("asn 65010", "asn 65011");
        assert!(CacheRecord::from_json(damaged.as_bytes())
            .unwrap_err()
            .contains("damaged"));
    }

    #[test]
    fn cmdline_parameters_are_read_and_quotes_honoured() {
        let c = Cmdline::parse(
            "BOOT_IMAGE=x console=ttyS0 appliance.slot=A appliance.verity=abcd \"appliance.host=c 1\" appliance.wait=5 quiet",
        );
        assert_eq!(c.slot.as_deref(), Some("A"));
        assert_eq!(c.verity.as_deref(), Some("abcd"));
        assert_eq!(c.host.as_deref(), Some("c 1"));
        assert_eq!(c.wait, Some(5));
        assert_eq!(c.config, None);
    }

    #[test]
    fn cmdline_config_takes_base64_or_an_http_url() {
        assert_eq!(
            cmdline_config("base64:aGk=").unwrap(),
            CmdlineConfig::Inline(b"hi".to_vec())
        );
        assert!(matches!(
            cmdline_config("http://10.0.0.1/u"),
            Ok(CmdlineConfig::Url(_))
        ));
        assert!(cmdline_config("file:/x").unwrap_err().contains("expected"));
        assert!(cmdline_config("base64:!!").unwrap_err().contains("base64"));
    }

    fn accepted() -> Box<Accepted> {
        Box::new(validate("u", SITE, &Who::named(Some("c1"))).unwrap())
    }

    #[test]
    fn the_first_valid_source_in_order_wins() {
        let round = vec![
            (Source::Cmdline, Found::Absent),
            (
                Source::Cidata,
                Found::Refused {
                    sha256: None,
                    reason: "bad".into(),
                },
            ),
            (Source::Metadata, Found::Valid(accepted())),
        ];
        assert!(matches!(
            decide(round, false, true),
            Decision::Apply(Source::Metadata, _)
        ));
        let round = vec![
            (Source::Cmdline, Found::Valid(accepted())),
            (Source::Cidata, Found::Valid(accepted())),
        ];
        assert!(matches!(
            decide(round, false, false),
            Decision::Apply(Source::Cmdline, _)
        ));
    }

    #[test]
    fn the_cache_stands_in_only_after_the_wait() {
        let nothing = || {
            vec![
                (Source::Cmdline, Found::Absent),
                (Source::Metadata, Found::Absent),
            ]
        };
        assert!(matches!(decide(nothing(), false, true), Decision::Wait));
        assert!(matches!(decide(nothing(), true, true), Decision::UseCache));
    }

    #[test]
    fn with_no_config_at_all_the_image_keeps_waiting() {
        let round = vec![(
            Source::Cidata,
            Found::Refused {
                sha256: None,
                reason: "bad".into(),
            },
        )];
        assert!(matches!(decide(round, true, false), Decision::Wait));
    }
}
