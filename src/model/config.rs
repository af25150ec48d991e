//! The site configuration: one KDL file describing the whole site, read by every host.
//!
//! Data flow: text → `kdl::KdlDocument` (syntax) → typed [`Config`] (shape: known nodes, one
//! argument each, right types) → semantic checks (overlaps, containment, duplicates). Every
//! problem becomes a positioned [`Diagnostic`]; all of them are collected before failing, and a
//! config with any diagnostic is never returned. Pure: the caller reads the file.
//!
//! We walk the KDL tree by hand instead of using the kdl crate's serde support: that support
//! silently ignores unknown nodes and mishandles repeated or missing children, and it loses the
//! spans we need for errors.

use crate::model::diag::{suggest, Diagnostic, Report};
use crate::model::key::PublicKey;
use ipnet::IpNet;
use kdl::{KdlDocument, KdlNode, KdlValue};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

mod workload;
pub use crate::model::workload::Workload;

pub const DEFAULT_BASE_PORT: u16 = 51820;
/// The highest link port: a node behind relays steers link i by a policy rule on its
/// destination port, and the kernel refuses a rule port range that ends at 65535.
pub const MAX_LINK_PORT: u16 = 65534;
pub const DEFAULT_MTU: u32 = 1420;
pub const DEFAULT_KEEPALIVE_MS: u32 = 300;
pub const DEFAULT_DEAD_AFTER: u32 = 3;
pub const DEFAULT_HOLD_TIME: u16 = 90;
pub const DEFAULT_MAX_PREFIX: u32 = 100;
/// BFD: transmit and receive interval, and the packets a peer may miss (300 ms to detect).
pub const DEFAULT_BFD_INTERVAL_MS: u32 = 100;
pub const DEFAULT_BFD_MULTIPLIER: u8 = 3;
pub const MAX_LINKS: u32 = 64;
/// Linux IFNAMSIZ - 1.
const MAX_IFNAME: usize = 15;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Config {
    pub site: Site,
    pub gateways: Vec<Gateway>,
    /// Explicit nodes followed by the keyed slots of every pool.
    pub nodes: Vec<Node>,
    pub relays: Vec<Relay>,
    pub pools: Vec<Pool>,
    pub bgp: Bgp,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Site {
    pub name: String,
    pub asn: u32,
    /// The site's address blocks lent to the cloud (at most one per family).
    pub cloud_blocks: Vec<IpNet>,
    /// Prefixes on the site LAN that cloud nodes reach through the tunnels.
    pub site_prefixes: Vec<IpNet>,
    /// Parallel tunnels per (gateway, node) pair.
    pub links: u32,
    /// Gateway UDP port of link 0; link i uses `base_port + i`.
    pub base_port: u16,
    pub mtu: u32,
    pub keepalive_ms: u32,
    /// A link silent for this many keepalive intervals is dead.
    pub dead_after: u32,
    /// Clamp the MSS of TCP SYNs crossing a tunnel to what its MTU carries (both directions).
    pub clamp_mss: bool,
    /// Serve Prometheus metrics on this TCP port of each host's own address (off when unset).
    pub metrics_port: Option<u16>,
}

impl Site {
    /// The gateways' UDP port of link `i`.
    pub fn link_port(&self, i: u32) -> u16 {
        self.base_port + i as u16
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Gateway {
    pub name: String,
    /// Public IP address the nodes send their tunnels to.
    pub endpoint: IpAddr,
    /// The gateway's own address on the site LAN (router ID, BGP source).
    pub site_address: IpAddr,
    /// Its IPv6 address on the site LAN, when the site is dual-stack: the next hop the site
    /// router gets for IPv6 routes.
    pub site_address_v6: Option<IpAddr>,
    pub public_key: PublicKey,
    /// The key it moves its links to, one at a time (`next-public-key`, `appliance
    /// rotate-key`): its peers take handshakes signed with either until it is retired.
    pub next_public_key: Option<PublicKey>,
    /// Out of service (`drain #true`, `appliance drain`): its paths leave the site routers and
    /// the nodes stop sending through it, while its tunnels and sessions stay up.
    pub drain: bool,
}

/// Who speaks iBGP for a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BgpSpeaker {
    #[default]
    Appliance,
    External,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Node {
    pub name: String,
    /// Host address inside the cloud block; sits on the node's `ap-lo` device.
    pub address: IpAddr,
    /// Prefixes assigned to this node (default: `address` as a host route).
    pub prefixes: Vec<IpNet>,
    pub public_key: PublicKey,
    /// The key it moves its links to (see [`Gateway::next_public_key`]).
    pub next_public_key: Option<PublicKey>,
    /// Pool this node is a slot of, if any.
    pub pool: Option<String>,
    /// Who speaks iBGP for this node: appliance itself, or a routing daemon of the node's own
    /// (bird, FRR, GoBGP: a Kubernetes CNI, say) peering with the gateways from `address`.
    pub bgp_speaker: BgpSpeaker,
    /// The site's jobs this node runs (its own `workload` block, or its pool's).
    pub workload: Option<Workload>,
    /// Drained from the gateways (`drain #true`, or its slot in its pool's `drain`; `appliance
    /// drain NODE` on a gateway): the gateways' probes ask it to drain.
    pub drain: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Relay {
    pub name: String,
    pub public_address: IpAddr,
    pub private_address: Option<IpAddr>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Pool {
    pub name: String,
    pub prefix: IpNet,
    pub count: u32,
    /// Enrolled slots: index → public key. Slot i is `{name}-{i}` at `prefix.addr + i`.
    pub keys: BTreeMap<u32, PublicKey>,
    /// The first address of the private network's managed DHCP range: an instance whose
    /// lease is `dhcp-start + i` takes slot i (`appliance provision`, pool user-data).
    pub dhcp_start: Option<std::net::Ipv4Addr>,
    /// What every slot runs (the pool's user-data carries the site file, so this block too).
    pub workload: Option<Workload>,
    /// Slots drained from the gateways (`drain 3 7`).
    pub drain: std::collections::BTreeSet<u32>,
}

impl Pool {
    /// The slot an instance holding `addr` on its private network takes.
    pub fn slot_of(&self, addr: IpAddr) -> Option<u32> {
        let (IpAddr::V4(a), Some(start)) = (addr, self.dhcp_start) else {
            return None;
        };
        let i = u32::from(a).checked_sub(u32::from(start))?;
        (i < self.count).then_some(i)
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bgp {
    pub hold_time: u16,
    pub max_prefix: u32,
    /// BFD with the neighbours that ask for it (RFC 5880/5881).
    pub bfd_interval_ms: u32,
    pub bfd_multiplier: u8,
    /// BFD between the gateways (both ends are appliances reading this file; default on).
    pub gateway_bfd: bool,
    pub neighbors: Vec<Neighbor>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Neighbor {
    pub name: String,
    pub address: IpAddr,
    /// Prefixes accepted from this router before its session is stopped (default: the `bgp`
    /// block's `max-prefix`).
    pub max_prefix: u32,
    /// Run BFD with this router: its session going down takes the BGP session down.
    pub bfd: bool,
}

/// What a host is in the site, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gateway,
    Node,
    Relay,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Gateway => "gateway",
            Role::Node => "node",
            Role::Relay => "relay",
        })
    }
}

impl Config {
    pub fn role_of(&self, host: &str) -> Option<Role> {
        if self.gateways.iter().any(|g| g.name == host) {
            Some(Role::Gateway)
        } else if self.nodes.iter().any(|n| n.name == host) {
            Some(Role::Node)
        } else if self.relays.iter().any(|r| r.name == host) {
            Some(Role::Relay)
        } else {
            None
        }
    }

    /// The keys the site file lists for `host`: its public key and its next one (relays have
    /// none).
    fn keys_of(&self, host: &str) -> Option<(PublicKey, Option<PublicKey>)> {
        self.gateways
            .iter()
            .find(|g| g.name == host)
            .map(|g| (g.public_key, g.next_public_key))
            .or_else(|| {
                self.nodes
                    .iter()
                    .find(|n| n.name == host)
                    .map(|n| (n.public_key, n.next_public_key))
            })
    }

    /// The WireGuard public key the site file lists for `host` (relays have none).
    pub fn public_key_of(&self, host: &str) -> Option<PublicKey> {
        self.keys_of(host).map(|k| k.0)
    }

    /// The next key the site file lists for `host` (`next-public-key`), while it rotates.
    pub fn next_public_key_of(&self, host: &str) -> Option<PublicKey> {
        self.keys_of(host).and_then(|k| k.1)
    }

    /// Every host name, for "did you mean" and listing.
    pub fn host_names(&self) -> Vec<&str> {
        self.gateways
            .iter()
            .map(|g| g.name.as_str())
            .chain(self.nodes.iter().map(|n| n.name.as_str()))
            .chain(self.relays.iter().map(|r| r.name.as_str()))
            .collect()
    }
}

/// Tunnel device on a gateway for link `i` (shared by all nodes).
pub fn gateway_link_name(i: u32) -> String {
    format!("ap-l{i}")
}

/// Tunnel device on a node for link `i` towards gateway `gw`.
pub fn node_link_name(gw: &str, i: u32) -> String {
    format!("ap-{gw}-{i}")
}

/// Parse and validate a config. `file` is only used in diagnostics.
/// A config file's bytes as text, or where and why they are not UTF-8 (a file saved in
/// Latin-1, say): `FILE:LINE:COL: ...`.
pub fn text_of(file: &str, bytes: Vec<u8>) -> Result<String, String> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        // Everything before `at` is valid UTF-8.
        let before = std::str::from_utf8(&bytes[..at]).unwrap_or_default();
        let (line, col) = crate::model::diag::line_col(before, at);
        format!(
            "{file}:{line}:{col}: not UTF-8 (byte {:#04x} at offset {at}); save the file as UTF-8",
            bytes[at]
        )
    })
}

pub fn parse(file: &str, source: &str) -> Result<Config, Report> {
    let report = |diagnostics| Report {
        file: file.to_string(),
        source: source.to_string(),
        diagnostics,
    };
    if let Some(d) = too_deep(source) {
        return Err(report(vec![d]));
    }
    let doc = match KdlDocument::parse_v2(source) {
        Ok(doc) => doc,
        Err(e) => {
            let diags = e
                .diagnostics
                .iter()
                .map(|d| {
                    let mut diag = Diagnostic::new(
                        (d.span.offset(), d.span.len()),
                        format!(
                            "KDL syntax: {}",
                            d.message.clone().unwrap_or_else(|| "invalid syntax".into())
                        ),
                    )
                    .label(d.label.clone().unwrap_or_else(|| "here".into()));
                    diag.help = syntax_hint(source, d.span.offset()).or_else(|| d.help.clone());
                    diag
                })
                .collect();
            return Err(report(diags));
        }
    };
    let mut l = Loader {
        source,
        diags: Vec::new(),
        reach: Vec::new(),
    };
    let cfg = l.document(&doc);
    match cfg {
        Some(cfg) if l.diags.is_empty() => Ok(cfg),
        _ => {
            let mut diags = l.diags;
            diags.sort_by_key(|d| d.offset);
            Err(report(diags))
        }
    }
}

fn span_of(node: &KdlNode) -> (usize, usize) {
    let s = node.name().span();
    (s.offset(), s.len())
}

struct Loader<'s> {
    source: &'s str,
    diags: Vec<Diagnostic>,
    /// Addresses a workload needs through the tunnels, checked once the site is known.
    reach: Vec<workload::Reach>,
}

/// Child nodes of a block, grouped by name, after checking names against the allowed set.
struct Fields<'a> {
    parent: &'a KdlNode,
    by_name: HashMap<&'a str, Vec<&'a KdlNode>>,
}

const TOP: &[&str] = &["site", "gateway", "node", "relay", "pool", "bgp"];
const SITE: &[&str] = &[
    "asn",
    "cloud-block",
    "site-prefix",
    "links",
    "base-port",
    "mtu",
    "keepalive-ms",
    "dead-after",
    "clamp-mss",
    "metrics-port",
];
const GATEWAY: &[&str] = &[
    "endpoint",
    "site-address",
    "public-key",
    "next-public-key",
    "drain",
];
const NODE: &[&str] = &[
    "address",
    "prefix",
    "public-key",
    "next-public-key",
    "bgp-speaker",
    "workload",
    "drain",
];
const RELAY: &[&str] = &["public-address", "private-address"];
const POOL: &[&str] = &["prefix", "count", "key", "dhcp-start", "workload", "drain"];
const BGP: &[&str] = &[
    "hold-time",
    "max-prefix",
    "bfd-interval-ms",
    "bfd-multiplier",
    "gateway-bfd",
    "neighbor",
];
const NEIGHBOR: &[&str] = &["address", "max-prefix", "bfd"];
/// Children that may appear more than once.
const REPEATABLE: &[&str] = &[
    "cloud-block",
    "site-prefix",
    "prefix",
    "key",
    "neighbor",
    "site-address",
    "env",
    "mount",
];

impl Loader<'_> {
    fn err(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn document(&mut self, doc: &KdlDocument) -> Option<Config> {
        let mut site = None;
        let mut gateways = Vec::new();
        let mut nodes = Vec::new();
        let mut relays = Vec::new();
        let mut pools = Vec::new();
        let mut bgp: Option<(Bgp, &KdlNode)> = None;
        let mut site_node: Option<&KdlNode> = None;
        for node in doc.nodes() {
            let name = node.name().value();
            match name {
                "site" => {
                    if let Some(first) = site_node {
                        self.duplicate(node, first);
                        continue;
                    }
                    site_node = Some(node);
                    site = self.site(node);
                }
                "gateway" => gateways.extend(self.gateway(node).map(|g| (g, node))),
                "node" => nodes.extend(self.node(node).map(|n| (n, node))),
                "relay" => relays.extend(self.relay(node).map(|r| (r, node))),
                "pool" => pools.extend(self.pool(node).map(|p| (p, node))),
                "bgp" => {
                    if let Some((_, first)) = bgp {
                        self.duplicate(node, first);
                        continue;
                    }
                    bgp = self.bgp(node).map(|b| (b, node));
                }
                "private-key" | "private-key-file" => self.err(private_key_here(node)),
                other => self.unknown(node, other, TOP, "top level"),
            }
        }
        if site_node.is_none() {
            let at = doc.nodes().first().map(span_of).unwrap_or((0, 0));
            self.err(
                Diagnostic::new(at, "missing `site` block")
                    .label("the file needs a site block")
                    .help("add `site \"NAME\" { asn 65010; cloud-block \"10.200.0.0/16\"; site-prefix \"10.10.0.0/16\"; links 4 }`"),
            );
        }
        let gateway_blocks = doc
            .nodes()
            .iter()
            .filter(|n| n.name().value() == "gateway")
            .count();
        if let (0, Some(site_node)) = (gateway_blocks, site_node) {
            self.err(
                Diagnostic::new(span_of(site_node), "no `gateway` defined")
                    .label("this site has no gateway")
                    .help("every node tunnels to the gateways; define at least one `gateway \"NAME\" { ... }`"),
            );
        }
        let site = site?;
        let bgp_node = bgp.as_ref().map(|b| b.1);
        let bgp = bgp.map(|b| b.0).unwrap_or(Bgp {
            hold_time: DEFAULT_HOLD_TIME,
            max_prefix: DEFAULT_MAX_PREFIX,
            bfd_interval_ms: DEFAULT_BFD_INTERVAL_MS,
            bfd_multiplier: DEFAULT_BFD_MULTIPLIER,
            gateway_bfd: true,
            neighbors: Vec::new(),
        });
        let mut sem = Semantics {
            site: &site,
            source: self.source,
            diags: &mut self.diags,
        };
        sem.check(&gateways, &nodes, &relays, &pools, &bgp, bgp_node);
        for r in std::mem::take(&mut self.reach) {
            if !site.site_prefixes.iter().any(|p| p.contains(&r.address)) {
                self.err(
                    Diagnostic::new(r.span, format!("{} {} is not on the site", r.what, r.address))
                        .label("outside every site-prefix")
                        .help("a node reaches the site only through the tunnels, so only addresses inside a `site-prefix`: add the prefix to the site block or use an address inside one"),
                );
            }
        }
        let mut all_nodes: Vec<Node> = nodes.into_iter().map(|(n, _)| n).collect();
        for (p, _) in &pools {
            all_nodes.extend(pool_slots(p));
        }
        Some(Config {
            site,
            gateways: gateways.into_iter().map(|(g, _)| g).collect(),
            nodes: all_nodes,
            relays: relays.into_iter().map(|(r, _)| r).collect(),
            pools: pools.into_iter().map(|(p, _)| p).collect(),
            bgp,
        })
    }

    fn duplicate(&mut self, node: &KdlNode, first: &KdlNode) {
        let name = node.name().value();
        let (line, col) = crate::model::diag::line_col(self.source, first.span().offset());
        self.err(
            Diagnostic::new(span_of(node), format!("duplicate `{name}`"))
                .label("second definition")
                .help(format!(
                    "`{name}` may appear only once; the first one is at line {line}, column {col}: merge them"
                )),
        );
    }

    fn unknown(&mut self, node: &KdlNode, name: &str, allowed: &[&str], place: &str) {
        let mut d = Diagnostic::new(span_of(node), format!("unknown node `{name}` in {place}"))
            .label("not understood");
        d.help = Some(match suggest(name, allowed) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("allowed here: {}", allowed.join(", ")),
        });
        self.err(d);
    }

    /// The single string argument naming a block (`gateway "gw1" { ... }`); checks there are no
    /// properties.
    fn block_name(&mut self, node: &KdlNode) -> Option<String> {
        let kind = node.name().value();
        let mut name = None;
        for (i, e) in node.entries().iter().enumerate() {
            let span = (e.span().offset(), e.span().len());
            if let Some(prop) = e.name() {
                self.err(
                    Diagnostic::new(
                        span,
                        format!("unexpected property `{}` on `{kind}`", prop.value()),
                    )
                    .label("properties are not used")
                    .help(format!(
                        "write settings as children: `{kind} \"NAME\" {{ {} ... }}`",
                        prop.value()
                    )),
                );
            } else if i > 0 {
                self.err(
                    Diagnostic::new(span, format!("`{kind}` takes one name"))
                        .label("extra argument"),
                );
            } else {
                match e.value() {
                    KdlValue::String(s) => {
                        if let Err(why) = check_host_name(s) {
                            self.err(
                                Diagnostic::new(span, format!("invalid {kind} name {s:?}"))
                                    .label(why)
                                    .help("names are lowercase letters, digits and '-', starting with a letter"),
                            );
                        } else {
                            name = Some(s.clone());
                        }
                    }
                    other => self.err(
                        Diagnostic::new(span, format!("`{kind}` name must be a string"))
                            .label(format!("found {}", type_name(other))),
                    ),
                }
            }
        }
        if node.entries().is_empty() {
            self.err(
                Diagnostic::new(span_of(node), format!("`{kind}` needs a name"))
                    .label("name missing")
                    .help(format!("write `{kind} \"NAME\" {{ ... }}`")),
            );
        }
        name
    }

    /// Check a block's children against `allowed`, reporting unknown and repeated ones.
    fn fields<'a>(&mut self, parent: &'a KdlNode, allowed: &[&str]) -> Fields<'a> {
        let kind = parent.name().value();
        let mut by_name: HashMap<&'a str, Vec<&'a KdlNode>> = HashMap::new();
        if let Some(children) = parent.children() {
            for child in children.nodes() {
                let name = child.name().value();
                if name == "private-key" || name == "private-key-file" {
                    self.err(private_key_here(child));
                    continue;
                }
                if !allowed.contains(&name) {
                    self.unknown(child, name, allowed, &format!("`{kind}`"));
                    continue;
                }
                let list = by_name.entry(name).or_default();
                if !list.is_empty() && !REPEATABLE.contains(&name) {
                    self.err(
                        Diagnostic::new(span_of(child), format!("`{name}` set twice in `{kind}`"))
                            .label("second value")
                            .help(format!("`{name}` takes one value; remove one of them")),
                    );
                    continue;
                }
                list.push(child);
            }
        }
        Fields { parent, by_name }
    }

    /// The single argument of a field node (`mtu 1420`).
    fn arg<'a>(&mut self, field: &'a KdlNode) -> Option<(&'a KdlValue, (usize, usize))> {
        let name = field.name().value();
        if field.children().is_some() {
            self.err(
                Diagnostic::new(
                    span_of(field),
                    format!("`{name}` takes a value, not a block"),
                )
                .label("unexpected children"),
            );
            return None;
        }
        let entries = field.entries();
        if let Some(prop) = entries.iter().find(|e| e.name().is_some()) {
            self.err(
                Diagnostic::new(
                    (prop.span().offset(), prop.span().len()),
                    format!("`{name}` takes no properties"),
                )
                .label("unexpected property")
                .help(format!("write `{name} VALUE`")),
            );
            return None;
        }
        match entries {
            [one] => Some((one.value(), (one.span().offset(), one.span().len()))),
            [] => {
                self.err(
                    Diagnostic::new(span_of(field), format!("`{name}` needs a value"))
                        .label("value missing")
                        .help(format!("write `{name} VALUE`")),
                );
                None
            }
            [_, extra, ..] => {
                self.err(
                    Diagnostic::new(
                        (extra.span().offset(), extra.span().len()),
                        format!("`{name}` takes exactly one value"),
                    )
                    .label("extra value"),
                );
                None
            }
        }
    }

    fn required<'a>(&mut self, f: &Fields<'a>, name: &str) -> Option<&'a KdlNode> {
        match f.by_name.get(name).and_then(|v| v.first()) {
            Some(n) => Some(*n),
            // Written as a property: already reported with the fix.
            None if f.parent.entry(name).is_some() => None,
            None => {
                let kind = f.parent.name().value();
                self.err(
                    Diagnostic::new(span_of(f.parent), format!("`{kind}` is missing `{name}`"))
                        .label(format!("needs `{name}`"))
                        .help(format!("add `{name} VALUE` inside this block")),
                );
                None
            }
        }
    }

    fn int(&mut self, field: &KdlNode, min: i128, max: i128, help: &str) -> Option<i128> {
        let (v, span) = self.arg(field)?;
        let name = field.name().value();
        match v {
            KdlValue::Integer(i) if (min..=max).contains(i) => Some(*i),
            KdlValue::Integer(i) => {
                self.err(
                    Diagnostic::new(span, format!("`{name}` {i} is out of range"))
                        .label(format!("expected {min}..={max}"))
                        .help(help.to_string()),
                );
                None
            }
            other => {
                let mut d = Diagnostic::new(span, format!("`{name}` must be an integer"))
                    .label(format!("found {}", type_name(other)));
                if let KdlValue::String(s) = other {
                    if s.trim().parse::<i128>().is_ok() {
                        d = d.help(format!("remove the quotes: `{name} {}`", s.trim()));
                    }
                } else if let KdlValue::Float(f) = other {
                    d = d.help(format!(
                        "write a whole number, such as `{name} {}`",
                        f.round()
                    ));
                }
                self.err(d);
                None
            }
        }
    }

    /// A list of slot indices (`drain 3 7`) of a pool with `count` slots. None: an error was
    /// reported.
    fn slot_list(
        &mut self,
        f: &Fields<'_>,
        name: &str,
        count: Option<i128>,
    ) -> Option<std::collections::BTreeSet<u32>> {
        let mut out = std::collections::BTreeSet::new();
        let Some(field) = f.by_name.get(name).and_then(|v| v.first()) else {
            return Some(out);
        };
        let mut ok = true;
        for e in field.entries() {
            let span = (e.span().offset(), e.span().len());
            match (e.name(), e.value()) {
                (None, KdlValue::Integer(i)) if *i >= 0 && count.is_none_or(|c| *i < c) => {
                    out.insert(*i as u32);
                }
                _ => {
                    self.err(
                        Diagnostic::new(span, format!("`{name}` takes slot indices of this pool"))
                            .label("not a slot")
                            .help(format!(
                                "write `{name} 3 7`: slots are numbered from 0 to count-1"
                            )),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// The optional `workload` block of a node or pool. Outer None: an error was reported.
    fn opt_workload(&mut self, f: &Fields<'_>) -> Option<Option<Workload>> {
        match f.by_name.get("workload").and_then(|v| v.first()) {
            None => Some(None),
            Some(n) => self.workload(n).map(Some),
        }
    }

    fn opt_int(
        &mut self,
        f: &Fields<'_>,
        name: &str,
        default: i128,
        range: (i128, i128),
        help: &str,
    ) -> Option<i128> {
        match f.by_name.get(name).and_then(|v| v.first()) {
            Some(n) => self.int(n, range.0, range.1, help),
            None => Some(default),
        }
    }

    fn boolean(&mut self, field: &KdlNode) -> Option<bool> {
        let (v, span) = self.arg(field)?;
        match v {
            KdlValue::Bool(b) => Some(*b),
            other => {
                self.err(
                    Diagnostic::new(
                        span,
                        format!("`{}` must be #true or #false", field.name().value()),
                    )
                    .label(format!("found {}", type_name(other)))
                    .help("KDL 2 writes booleans as #true and #false"),
                );
                None
            }
        }
    }

    fn string<'a>(&mut self, field: &'a KdlNode) -> Option<(&'a str, (usize, usize))> {
        let (v, span) = self.arg(field)?;
        match v {
            KdlValue::String(s) => Some((s.as_str(), span)),
            other => {
                self.err(
                    Diagnostic::new(span, format!("`{}` must be a string", field.name().value()))
                        .label(format!("found {}", type_name(other)))
                        .help("quote the value"),
                );
                None
            }
        }
    }

    fn ip(&mut self, field: &KdlNode) -> Option<IpAddr> {
        let (s, span) = self.string(field)?;
        match s.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                let help = if s.starts_with('[') {
                    "write the IPv6 address without brackets and port: ports come from `base-port`"
                } else if s.contains('/') {
                    "this is an address, not a prefix: drop the /length"
                } else if s.contains(':') && s.contains('.') {
                    "write the address without a port: ports come from `base-port`"
                } else {
                    "write an IPv4 or IPv6 address such as \"192.0.2.1\"; host names are not resolved"
                };
                self.err(
                    Diagnostic::new(
                        span,
                        format!("`{}`: {s:?} is not an IP address", field.name().value()),
                    )
                    .label("invalid address")
                    .help(help),
                );
                None
            }
        }
    }

    fn net(&mut self, field: &KdlNode) -> Option<IpNet> {
        let (s, span) = self.string(field)?;
        match s.parse::<IpNet>() {
            Ok(net) if net.trunc() == net => Some(net),
            Ok(net) => {
                self.err(
                    Diagnostic::new(
                        span,
                        format!("`{}`: {s:?} has host bits set", field.name().value()),
                    )
                    .label("not a network address")
                    .help(format!("did you mean \"{}\"?", net.trunc())),
                );
                None
            }
            Err(_) => {
                self.err(
                    Diagnostic::new(
                        span,
                        format!("`{}`: {s:?} is not a prefix", field.name().value()),
                    )
                    .label("invalid prefix")
                    .help("write address/length, such as \"10.200.0.0/16\""),
                );
                None
            }
        }
    }

    fn nets(&mut self, f: &Fields<'_>, name: &str) -> Vec<(IpNet, (usize, usize))> {
        let fields = f.by_name.get(name).cloned().unwrap_or_default();
        fields
            .into_iter()
            .filter_map(|n| self.net(n).map(|net| (net, span_of(n))))
            .collect()
    }

    fn key(&mut self, value: &KdlValue, span: (usize, usize)) -> Option<PublicKey> {
        match value {
            KdlValue::String(s) => match s.parse::<PublicKey>() {
                Ok(k) => Some(k),
                Err(why) => {
                    self.err(
                        Diagnostic::new(span, format!("invalid public key: {why}"))
                            .label("not a WireGuard key")
                            .help("a key is 32 bytes in base64 (44 characters), as printed by `appliance pubkey` or `wg pubkey`"),
                    );
                    None
                }
            },
            other => {
                self.err(
                    Diagnostic::new(span, "public key must be a string")
                        .label(format!("found {}", type_name(other))),
                );
                None
            }
        }
    }

    /// `next-public-key`: `Some(None)` when it is absent, `None` when it is invalid.
    fn next_key(&mut self, f: &Fields<'_>) -> Option<Option<PublicKey>> {
        match f.by_name.get("next-public-key").and_then(|v| v.first()) {
            None => Some(None),
            Some(n) => self.field_key(n).map(Some),
        }
    }

    fn field_key(&mut self, field: &KdlNode) -> Option<PublicKey> {
        let (v, span) = self.arg(field)?;
        self.key(v, span)
    }

    fn site(&mut self, node: &KdlNode) -> Option<Site> {
        let name = self.block_name(node);
        let f = self.fields(node, SITE);
        let asn = self
            .required(&f, "asn")
            .and_then(|n| self.int(n, 1, u32::MAX as i128, "an AS number is 1..=4294967295; private ranges are 64512-65534 and 4200000000-4294967294"));
        let cloud = self.nets(&f, "cloud-block");
        if cloud.is_empty() {
            self.required(&f, "cloud-block");
        }
        let mut seen_family = HashMap::new();
        for (net, span) in &cloud {
            let fam = matches!(net, IpNet::V4(_));
            if let Some(first) = seen_family.insert(fam, *net) {
                self.err(
                    Diagnostic::new(*span, format!("second cloud block of the same family ({first} and {net})"))
                        .label("one block per address family")
                        .help("lend one contiguous block per family; give nodes more prefixes inside it instead"),
                );
            }
        }
        let site_prefixes = self.nets(&f, "site-prefix");
        if site_prefixes.is_empty() {
            self.required(&f, "site-prefix");
        }
        for (sp, span) in &site_prefixes {
            for (cb, _) in &cloud {
                if sp.contains(cb) || cb.contains(sp) {
                    self.err(
                        Diagnostic::new(*span, format!("site prefix {sp} overlaps the cloud block {cb}"))
                            .label("overlap")
                            .help("the cloud block is routed into the tunnels; site prefixes are routed out of them: they must be disjoint"),
                    );
                }
            }
        }
        check_overlaps(&site_prefixes, "site prefix", &mut self.diags);
        let links = self.opt_int(
            &f,
            "links",
            4,
            (1, MAX_LINKS as i128),
            "the link count is the number of parallel tunnels per gateway-node pair: 1..=64",
        );
        let base_port = self.opt_int(
            &f,
            "base-port",
            DEFAULT_BASE_PORT as i128,
            (1, MAX_LINK_PORT as i128),
            "link i uses UDP port base-port + i, at most 65534",
        );
        if let (Some(l), Some(p)) = (links, base_port) {
            if p + l - 1 > MAX_LINK_PORT as i128 {
                let span = f
                    .by_name
                    .get("base-port")
                    .map(|v| span_of(v[0]))
                    .unwrap_or(span_of(node));
                self.err(
                    Diagnostic::new(span, format!("ports {p}..{} go past 65534", p + l - 1))
                        .label("base-port too high for the link count")
                        .help(format!(
                            "link i uses base-port + i, and the kernel's policy rules that steer \
                         links through relays take ports up to 65534; use a base-port at most {}",
                            MAX_LINK_PORT as i128 + 1 - l
                        )),
                );
            }
        }
        let mtu = self.opt_int(
            &f,
            "mtu",
            DEFAULT_MTU as i128,
            (1280, 9000),
            "tunnel MTU: 1280 (IPv6 minimum) to 9000; 1420 fits a 1500-byte underlay",
        );
        let keepalive = self.opt_int(
            &f,
            "keepalive-ms",
            DEFAULT_KEEPALIVE_MS as i128,
            (50, 60_000),
            "keepalive interval in milliseconds: 50..=60000",
        );
        let dead_after = self.opt_int(
            &f,
            "dead-after",
            DEFAULT_DEAD_AFTER as i128,
            (2, 100),
            "a link silent for dead-after keepalive intervals leaves the routes: 2..=100",
        );
        let clamp_mss = match f.by_name.get("clamp-mss").and_then(|v| v.first()) {
            Some(n) => self.boolean(n),
            None => Some(true),
        };
        let metrics_port = match f.by_name.get("metrics-port").and_then(|v| v.first()) {
            None => None,
            Some(n) => self
                .int(n, 1, 65535, "the TCP port /metrics is served on: 1..=65535")
                .map(|p| (p as u16, span_of(n))),
        };
        if let Some((179, span)) = metrics_port {
            self.err(
                Diagnostic::new(span, "metrics-port 179 is BGP's port")
                    .label("already in use by the iBGP speaker")
                    .help("pick a free TCP port, e.g. 9477"),
            );
        }
        // A bad field is reported above; keep a placeholder so the checks across blocks still
        // run and report everything at once. The config is never returned with a diagnostic.
        Some(Site {
            name: name.unwrap_or_default(),
            asn: asn.unwrap_or(0) as u32,
            cloud_blocks: cloud.into_iter().map(|c| c.0).collect(),
            site_prefixes: site_prefixes.into_iter().map(|c| c.0).collect(),
            links: links.unwrap_or(4) as u32,
            base_port: base_port.unwrap_or(DEFAULT_BASE_PORT as i128) as u16,
            mtu: mtu.unwrap_or(DEFAULT_MTU as i128) as u32,
            keepalive_ms: keepalive.unwrap_or(DEFAULT_KEEPALIVE_MS as i128) as u32,
            dead_after: dead_after.unwrap_or(DEFAULT_DEAD_AFTER as i128) as u32,
            clamp_mss: clamp_mss.unwrap_or(true),
            metrics_port: metrics_port.map(|m| m.0),
        })
    }

    fn gateway(&mut self, node: &KdlNode) -> Option<Gateway> {
        let name = self.block_name(node);
        let f = self.fields(node, GATEWAY);
        let endpoint = self.required(&f, "endpoint").and_then(|n| self.ip(n));
        let first = self.required(&f, "site-address").and_then(|n| self.ip(n));
        let mut site_address_v6 = None;
        let extra: Vec<&KdlNode> = f
            .by_name
            .get("site-address")
            .map(|v| v.iter().skip(1).copied().collect())
            .unwrap_or_default();
        for (i, field) in extra.into_iter().enumerate() {
            let Some(a) = self.ip(field) else { continue };
            let why = match (first, a) {
                (None, _) => continue, // the first one is already reported
                (Some(IpAddr::V4(_)), IpAddr::V6(_)) if i == 0 => {
                    site_address_v6 = Some(a);
                    continue;
                }
                (Some(IpAddr::V6(_)), IpAddr::V4(_)) => {
                    "the IPv4 site address must come first (it is the router ID)".to_string()
                }
                (_, a) => format!(
                    "this gateway already has an {} site address",
                    if a.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            };
            self.err(
                Diagnostic::new(
                    field_span(node, "site-address", i + 1),
                    format!("`site-address` {a}: {why}"),
                )
                .label("extra site address")
                .help("give the IPv4 site address first, then at most one IPv6 one for a dual-stack site"),
            );
        }
        let public_key = self
            .required(&f, "public-key")
            .and_then(|n| self.field_key(n));
        let next_public_key = self.next_key(&f)?;
        let drain = match f.by_name.get("drain").and_then(|v| v.first()) {
            Some(n) => self.boolean(n)?,
            None => false,
        };
        Some(Gateway {
            name: name?,
            endpoint: endpoint?,
            site_address: first?,
            site_address_v6,
            public_key: public_key?,
            next_public_key,
            drain,
        })
    }

    fn node(&mut self, node: &KdlNode) -> Option<Node> {
        let name = self.block_name(node);
        let f = self.fields(node, NODE);
        let address = self.required(&f, "address").and_then(|n| self.ip(n));
        let prefixes: Vec<IpNet> = self.nets(&f, "prefix").into_iter().map(|p| p.0).collect();
        let public_key = self
            .required(&f, "public-key")
            .and_then(|n| self.field_key(n));
        let next_public_key = self.next_key(&f)?;
        let bgp_speaker = match f.by_name.get("bgp-speaker").and_then(|v| v.first()) {
            None => Some(BgpSpeaker::Appliance),
            Some(field) => match self.string(field) {
                Some(("appliance", _)) => Some(BgpSpeaker::Appliance),
                Some(("external", _)) => Some(BgpSpeaker::External),
                Some((other, span)) => {
                    self.err(
                        Diagnostic::new(span, format!("`bgp-speaker` {other:?} is not known"))
                            .label("expected \"appliance\" or \"external\"")
                            .help("\"external\": a routing daemon on the node peers with the gateways itself"),
                    );
                    None
                }
                None => None,
            },
        };
        let workload = self.opt_workload(&f)?;
        let drain = match f.by_name.get("drain").and_then(|v| v.first()) {
            Some(n) => self.boolean(n)?,
            None => false,
        };
        let address = address?;
        let prefixes = if prefixes.is_empty() && !f.by_name.contains_key("prefix") {
            vec![IpNet::from(address)]
        } else {
            prefixes
        };
        Some(Node {
            name: name?,
            address,
            prefixes,
            public_key: public_key?,
            next_public_key,
            pool: None,
            bgp_speaker: bgp_speaker?,
            workload,
            drain,
        })
    }

    fn relay(&mut self, node: &KdlNode) -> Option<Relay> {
        let name = self.block_name(node);
        let f = self.fields(node, RELAY);
        let public_address = self.required(&f, "public-address").and_then(|n| self.ip(n));
        let private_address = match f.by_name.get("private-address") {
            Some(v) => Some(self.ip(v[0])?),
            None => None,
        };
        Some(Relay {
            name: name?,
            public_address: public_address?,
            private_address,
        })
    }

    fn pool(&mut self, node: &KdlNode) -> Option<Pool> {
        let name = self.block_name(node);
        let f = self.fields(node, POOL);
        let prefix = self.required(&f, "prefix").and_then(|n| self.net(n));
        let count = self
            .required(&f, "count")
            .and_then(|n| self.int(n, 1, 65536, "a pool has 1..=65536 slots"));
        let mut keys = BTreeMap::new();
        let mut key_spans: HashMap<u32, (usize, usize)> = HashMap::new();
        for k in f.by_name.get("key").cloned().unwrap_or_default() {
            let entries = k.entries();
            let ok_shape = entries.len() == 2
                && entries.iter().all(|e| e.name().is_none())
                && k.children().is_none();
            if !ok_shape {
                self.err(
                    Diagnostic::new(span_of(k), "`key` takes a slot index and a public key")
                        .label("malformed")
                        .help("write `key 0 \"BASE64KEY\"`"),
                );
                continue;
            }
            let idx_span = (entries[0].span().offset(), entries[0].span().len());
            let idx = match entries[0].value() {
                KdlValue::Integer(i) if *i >= 0 && *i < u32::MAX as i128 => *i as u32,
                other => {
                    let found = match other {
                        KdlValue::Integer(i) if *i < 0 => "negative".to_string(),
                        other => format!("found {}", type_name(other)),
                    };
                    self.err(
                        Diagnostic::new(idx_span, "slot index must be a non-negative integer")
                            .label(found)
                            .help("slots are numbered from 0: slot i is the pool's address + i"),
                    );
                    continue;
                }
            };
            if let Some(c) = count {
                if idx as i128 >= c {
                    self.err(
                        Diagnostic::new(idx_span, format!("slot {idx} is outside the pool"))
                            .label(format!("pool has slots 0..={}", c - 1))
                            .help("raise `count` or use a lower index"),
                    );
                    continue;
                }
            }
            let key_span = (entries[1].span().offset(), entries[1].span().len());
            let Some(key) = self.key(entries[1].value(), key_span) else {
                continue;
            };
            if key_spans.insert(idx, idx_span).is_some() {
                self.err(
                    Diagnostic::new(idx_span, format!("slot {idx} has two keys"))
                        .label("second key for this slot")
                        .help("each slot is one host with one key: remove one `key` line or use another slot index"),
                );
                continue;
            }
            keys.insert(idx, key);
        }
        let dhcp_start = match f.by_name.get("dhcp-start").and_then(|v| v.first()) {
            None => None,
            Some(n) => match self.ip(n) {
                Some(IpAddr::V4(a)) => {
                    if let Some(c) = count {
                        if u32::from(a) as i128 + c - 1 > u32::MAX as i128 {
                            self.err(
                                Diagnostic::new(span_of(n), "the DHCP range runs past 255.255.255.255")
                                    .label(format!("{c} slots from here"))
                                    .help("dhcp-start is the first address of the private network's DHCP range"),
                            );
                        }
                    }
                    Some(a)
                }
                Some(IpAddr::V6(_)) => {
                    self.err(
                        Diagnostic::new(span_of(n), "dhcp-start must be an IPv4 address")
                            .label("IPv6")
                            .help("Exoscale's managed private networks lease IPv4 addresses"),
                    );
                    None
                }
                None => None,
            },
        };
        let workload = self.opt_workload(&f);
        let drain = self.slot_list(&f, "drain", count);
        let (prefix, count, workload, drain) = (prefix?, count? as u32, workload?, drain?);
        let size: u128 = match prefix {
            IpNet::V4(p) => 1u128 << (32 - p.prefix_len()),
            IpNet::V6(p) => 1u128
                .checked_shl(128 - p.prefix_len() as u32)
                .unwrap_or(u128::MAX),
        };
        if count as u128 > size {
            let span = span_of(f.by_name["count"][0]);
            self.err(
                Diagnostic::new(
                    span,
                    format!("{count} slots do not fit in {prefix} ({size} addresses)"),
                )
                .label("too many slots")
                .help("use a larger prefix or fewer slots"),
            );
            return None;
        }
        Some(Pool {
            name: name?,
            prefix,
            count,
            keys,
            dhcp_start,
            workload,
            drain,
        })
    }

    fn bgp(&mut self, node: &KdlNode) -> Option<Bgp> {
        if !node.entries().is_empty() {
            self.err(
                Diagnostic::new(span_of(node), "`bgp` takes no arguments")
                    .label("unexpected arguments"),
            );
        }
        let f = self.fields(node, BGP);
        let hold = self.opt_int(
            &f,
            "hold-time",
            DEFAULT_HOLD_TIME as i128,
            (0, 65535),
            "hold time in seconds: 0 (no keepalives) or 3..=65535 (RFC 4271)",
        );
        if hold.is_some_and(|h| h == 1 || h == 2) {
            let span = span_of(f.by_name["hold-time"][0]);
            self.err(
                Diagnostic::new(span, "hold time of 1 or 2 seconds is not allowed")
                    .label("RFC 4271 §4.2")
                    .help("use 0 or at least 3"),
            );
        }
        let max_prefix = self.opt_int(
            &f,
            "max-prefix",
            DEFAULT_MAX_PREFIX as i128,
            (1, 1_000_000),
            "prefixes accepted from a site router before its session is stopped (nodes and gateways get limits from their assignments)",
        );
        let bfd_interval = self.opt_int(
            &f,
            "bfd-interval-ms",
            DEFAULT_BFD_INTERVAL_MS as i128,
            (10, 10_000),
            "BFD transmit and receive interval in ms: 10..=10000",
        );
        let bfd_mult = self.opt_int(
            &f,
            "bfd-multiplier",
            DEFAULT_BFD_MULTIPLIER as i128,
            (2, 255),
            "BFD packets a peer may miss before its session is down: 2..=255",
        );
        let gateway_bfd = match f.by_name.get("gateway-bfd").and_then(|v| v.first()) {
            Some(b) => self.boolean(b),
            None => Some(true),
        };
        let mut neighbors: Vec<Neighbor> = Vec::new();
        for n in f.by_name.get("neighbor").cloned().unwrap_or_default() {
            let name = self.block_name(n);
            let nf = self.fields(n, NEIGHBOR);
            let address = self.required(&nf, "address").and_then(|a| self.ip(a));
            let own_max = self.opt_int(
                &nf,
                "max-prefix",
                max_prefix.unwrap_or(DEFAULT_MAX_PREFIX as i128),
                (1, 1_000_000),
                "prefixes accepted from this router before its session is stopped",
            );
            let bfd = match nf.by_name.get("bfd").and_then(|v| v.first()) {
                Some(b) => self.boolean(b),
                None => Some(false),
            };
            if let (Some(name), Some(address), Some(own_max), Some(bfd)) =
                (name, address, own_max, bfd)
            {
                if neighbors.iter().any(|x| x.name == name) {
                    self.err(
                        Diagnostic::new(span_of(n), format!("duplicate neighbor name {name:?}"))
                            .label("second definition")
                            .help("each BGP neighbor needs its own name: rename or remove one"),
                    );
                } else if neighbors.iter().any(|x| x.address == address) {
                    self.err(
                        Diagnostic::new(
                            span_of(n),
                            format!("two neighbors have the address {address}"),
                        )
                        .label("duplicate address")
                        .help("one session per router address: remove one neighbor"),
                    );
                } else if bfd && address.is_ipv6() {
                    self.err(
                        Diagnostic::new(span_of(n), format!("BFD with {address}"))
                            .label("IPv6 neighbour")
                            .help("BFD runs over IPv4 here: peer over the router's IPv4 address, or drop `bfd`"),
                    );
                } else {
                    neighbors.push(Neighbor {
                        name,
                        address,
                        max_prefix: own_max as u32,
                        bfd,
                    });
                }
            }
        }
        Some(Bgp {
            hold_time: hold? as u16,
            max_prefix: max_prefix? as u32,
            bfd_interval_ms: bfd_interval? as u32,
            bfd_multiplier: bfd_mult? as u8,
            gateway_bfd: gateway_bfd?,
            neighbors,
        })
    }
}

/// Blocks nested deeper than this are refused before the KDL parser sees them: it recurses
/// per level, and 20,000 levels (40 KB) overflowed its stack and aborted the process (PID 1 in
/// the image). A site file nests two (`bgp { neighbor { } }`).
pub const MAX_DEPTH: usize = 16;

/// The first `{` deeper than [`MAX_DEPTH`], outside strings and comments.
pub fn too_deep(source: &str) -> Option<Diagnostic> {
    let b = source.as_bytes();
    let (mut i, mut depth, mut comment, mut in_str) = (0, 0usize, 0usize, false);
    while i < b.len() {
        let rest = &b[i..];
        if comment > 0 {
            if rest.starts_with(b"*/") {
                comment -= 1;
                i += 2;
            } else if rest.starts_with(b"/*") {
                comment += 1;
                i += 2;
            } else {
                i += 1;
            }
            continue;
        }
        if in_str {
            match b[i] {
                b'\\' => i += 1,
                b'"' => in_str = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if rest.starts_with(b"//") {
            i += rest.iter().position(|c| *c == b'\n').unwrap_or(rest.len());
            continue;
        }
        if rest.starts_with(b"/*") {
            comment = 1;
            i += 2;
            continue;
        }
        match b[i] {
            b'"' => in_str = true,
            b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(
                        Diagnostic::new((i, 1), format!("blocks nested deeper than {MAX_DEPTH}"))
                            .label("too deep")
                            .help("a site file nests two levels (`bgp { neighbor \"r\" { } }`): close the blocks"),
                    );
                }
            }
            b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Better help for the KDL syntax errors site engineers make most.
fn syntax_hint(source: &str, offset: usize) -> Option<String> {
    let line_start = source[..offset.min(source.len())]
        .rfind('\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let rest = &source[line_start..];
    let line = rest.split('\n').next().unwrap_or("");
    if line.trim_start().starts_with('#') {
        return Some(
            "KDL comments are `//` or `/* ... */`; `#` starts keywords such as #true".into(),
        );
    }
    let word = source
        .get(offset..)
        .unwrap_or("")
        .split(|c: char| c.is_whitespace() || c == '}' || c == ';')
        .next()
        .unwrap_or("");
    let looks_like_ip = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/'))
        && word.chars().any(|c| matches!(c, '.' | ':'));
    let token_start = source[..offset.min(source.len())]
        .rfind(|c: char| c.is_whitespace())
        .map(|i| i + 1)
        .unwrap_or(0);
    let token = source[token_start..]
        .split(|c: char| c.is_whitespace() || c == '}' || c == ';')
        .next()
        .unwrap_or("");
    if looks_like_ip || token.matches('.').count() >= 2 || token.contains('/') {
        return Some(format!("quote addresses and prefixes: \"{token}\""));
    }
    None
}

fn private_key_here(node: &KdlNode) -> Diagnostic {
    Diagnostic::new(span_of(node), "private keys do not belong in the site file")
        .label("secret in a shared file")
        .help("every host reads this file; give each host its own key with `--key-file` (default /var/lib/appliance/private.key) or its user-data, and list only `public-key` here")
}

fn type_name(v: &KdlValue) -> &'static str {
    match v {
        KdlValue::String(_) => "a string",
        KdlValue::Integer(_) => "an integer",
        KdlValue::Float(_) => "a float",
        KdlValue::Bool(_) => "a boolean",
        KdlValue::Null => "#null",
    }
}

fn check_host_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty name");
    }
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err("must start with a lowercase letter");
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err("only a-z, 0-9 and '-' are allowed");
    }
    if s.len() > 63 {
        return Err("longer than 63 characters");
    }
    Ok(())
}

fn check_overlaps(nets: &[(IpNet, (usize, usize))], what: &str, diags: &mut Vec<Diagnostic>) {
    for (i, (a, _)) in nets.iter().enumerate() {
        for (b, span) in &nets[i + 1..] {
            if a.contains(b) || b.contains(a) {
                diags.push(
                    Diagnostic::new(*span, format!("{what} {b} overlaps {a}"))
                        .label("overlap")
                        .help("each prefix may be listed once; remove the covered one"),
                );
            }
        }
    }
}

/// The enrolled slots of a pool as nodes.
fn pool_slots(p: &Pool) -> impl Iterator<Item = Node> + '_ {
    p.keys.iter().map(move |(i, key)| {
        let address = nth_address(p.prefix, *i);
        Node {
            name: format!("{}-{i}", p.name),
            address,
            prefixes: vec![IpNet::from(address)],
            public_key: *key,
            next_public_key: None,
            pool: Some(p.name.clone()),
            bgp_speaker: BgpSpeaker::Appliance,
            workload: p.workload.clone(),
            drain: p.drain.contains(i),
        }
    })
}

fn nth_address(prefix: IpNet, i: u32) -> IpAddr {
    match prefix {
        IpNet::V4(p) => IpAddr::V4((u32::from(p.network()) + i).into()),
        IpNet::V6(p) => IpAddr::V6((u128::from(p.network()) + i as u128).into()),
    }
}

/// Checks across blocks: containment in the cloud block, overlaps, duplicate names, keys and
/// addresses, device-name lengths.
struct Semantics<'a> {
    site: &'a Site,
    source: &'a str,
    diags: &'a mut Vec<Diagnostic>,
}

impl Semantics<'_> {
    fn in_cloud(&self, net: &IpNet) -> bool {
        self.site.cloud_blocks.iter().any(|c| c.contains(net))
    }

    /// Containment checks are skipped when no cloud block parsed (already reported).
    fn outside_cloud(&self, net: &IpNet) -> bool {
        !self.site.cloud_blocks.is_empty() && !self.in_cloud(net)
    }

    fn cloud(&self) -> String {
        let v: Vec<String> = self
            .site
            .cloud_blocks
            .iter()
            .map(|c| c.to_string())
            .collect();
        v.join(", ")
    }

    fn line(&self, span: Span) -> usize {
        crate::model::diag::line_col(self.source, span.0).0
    }

    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn check(
        &mut self,
        gateways: &[(Gateway, &KdlNode)],
        nodes: &[(Node, &KdlNode)],
        relays: &[(Relay, &KdlNode)],
        pools: &[(Pool, &KdlNode)],
        bgp: &Bgp,
        bgp_node: Option<&KdlNode>,
    ) {
        self.unique_names(gateways, nodes, relays, pools);
        self.unique_keys(gateways, nodes, pools);
        self.unique_addresses(gateways, nodes, relays);
        self.gateways(gateways);
        self.relays(relays);
        self.neighbors(gateways, bgp, bgp_node);
        self.assignments(nodes, pools);
    }

    fn unique_names(
        &mut self,
        gateways: &[(Gateway, &KdlNode)],
        nodes: &[(Node, &KdlNode)],
        relays: &[(Relay, &KdlNode)],
        pools: &[(Pool, &KdlNode)],
    ) {
        let mut seen: HashMap<String, (Span, String)> = HashMap::new();
        let mut all: Vec<(String, Span, String)> = Vec::new();
        for (g, n) in gateways {
            all.push((g.name.clone(), block_span(n), "gateway".into()));
        }
        for (x, n) in nodes {
            all.push((x.name.clone(), block_span(n), "node".into()));
        }
        for (r, n) in relays {
            all.push((r.name.clone(), block_span(n), "relay".into()));
        }
        for (p, n) in pools {
            for slot in pool_slots(p) {
                all.push((
                    slot.name,
                    block_span(n),
                    format!("slot of pool {:?}", p.name),
                ));
            }
        }
        for (name, span, what) in all {
            if let Some((first, first_what)) = seen.get(&name) {
                let line = self.line(*first);
                self.push(
                    Diagnostic::new(span, format!("the name {name:?} is used twice"))
                        .label(format!("already the name of a {first_what} (line {line})"))
                        .help("gateway, node, relay and pool-slot names must be unique: hosts pick themselves by name"),
                );
            } else {
                seen.insert(name, (span, what));
            }
        }
    }

    fn unique_keys(
        &mut self,
        gateways: &[(Gateway, &KdlNode)],
        nodes: &[(Node, &KdlNode)],
        pools: &[(Pool, &KdlNode)],
    ) {
        // Where a key is written, resolved only for a diagnostic: finding a pool key's span
        // scans the pool block, which would make a 10,000-slot pool quadratic.
        enum At<'n> {
            Field(&'n KdlNode),
            Next(&'n KdlNode),
            Slot(&'n KdlNode, u32),
        }
        let span = |at: &At<'_>| match at {
            At::Field(n) => field_span(n, "public-key", 0),
            At::Next(n) => field_span(n, "next-public-key", 0),
            At::Slot(n, i) => pool_key_span(n, *i),
        };
        let mut all: Vec<(PublicKey, At<'_>, String)> = Vec::new();
        for (g, n) in gateways {
            all.push((g.public_key, At::Field(n), format!("gateway {:?}", g.name)));
            if let Some(k) = g.next_public_key {
                all.push((k, At::Next(n), format!("gateway {:?}'s next key", g.name)));
            }
        }
        for (x, n) in nodes {
            all.push((x.public_key, At::Field(n), format!("node {:?}", x.name)));
            if let Some(k) = x.next_public_key {
                all.push((k, At::Next(n), format!("node {:?}'s next key", x.name)));
            }
        }
        for (p, n) in pools {
            for (i, k) in &p.keys {
                all.push((
                    *k,
                    At::Slot(n, *i),
                    format!("slot {i} of pool {:?}", p.name),
                ));
            }
        }
        let mut seen: HashMap<PublicKey, (At<'_>, String)> = HashMap::new();
        for (key, at, who) in all {
            if let Some((first_at, first_who)) = seen.get(&key) {
                let line = self.line(span(first_at));
                self.push(
                    Diagnostic::new(
                        span(&at),
                        format!("public key of {who} is already the key of {first_who}"),
                    )
                    .label(format!("same key as line {line}"))
                    .help("each host has its own key pair: generate one with `appliance genkey`"),
                );
            } else {
                seen.insert(key, (at, who));
            }
        }
    }

    fn unique_addresses(
        &mut self,
        gateways: &[(Gateway, &KdlNode)],
        nodes: &[(Node, &KdlNode)],
        relays: &[(Relay, &KdlNode)],
    ) {
        let mut all: Vec<(IpAddr, Span, String)> = Vec::new();
        for (g, n) in gateways {
            all.push((
                g.endpoint,
                field_span(n, "endpoint", 0),
                format!("endpoint of gateway {:?}", g.name),
            ));
            all.push((
                g.site_address,
                field_span(n, "site-address", 0),
                format!("site address of gateway {:?}", g.name),
            ));
        }
        for (x, n) in nodes {
            all.push((
                x.address,
                field_span(n, "address", 0),
                format!("address of node {:?}", x.name),
            ));
        }
        for (r, n) in relays {
            all.push((
                r.public_address,
                field_span(n, "public-address", 0),
                format!("public address of relay {:?}", r.name),
            ));
            if let Some(a) = r.private_address {
                all.push((
                    a,
                    field_span(n, "private-address", 0),
                    format!("private address of relay {:?}", r.name),
                ));
            }
        }
        let mut seen: HashMap<IpAddr, (Span, String)> = HashMap::new();
        for (addr, span, what) in all {
            if let Some((first, first_what)) = seen.get(&addr) {
                let line = self.line(*first);
                self.push(
                    Diagnostic::new(span, format!("address {addr} is used twice"))
                        .label(format!("already the {first_what} (line {line})"))
                        .help("every endpoint and host address must be unique in the site"),
                );
            } else {
                seen.insert(addr, (span, what));
            }
        }
    }

    fn gateways(&mut self, gateways: &[(Gateway, &KdlNode)]) {
        let digits = (self.site.links.max(1) - 1).to_string().len();
        for (g, n) in gateways {
            let longest = node_link_name(&g.name, self.site.links.max(1) - 1);
            if longest.len() > MAX_IFNAME {
                self.push(
                    Diagnostic::new(block_span(n), format!("gateway name {:?} is too long for device names", g.name))
                        .label(format!("`{longest}` exceeds 15 characters"))
                        .help(format!(
                            "nodes name their tunnel devices ap-GATEWAY-LINK; with {} links keep gateway names to {} characters",
                            self.site.links,
                            MAX_IFNAME - 4 - digits
                        )),
                );
            }
            let endpoint = field_span(n, "endpoint", 0);
            if let Some(sp) = self
                .site
                .site_prefixes
                .iter()
                .find(|p| p.contains(&g.endpoint))
            {
                self.push(
                    Diagnostic::new(endpoint, format!("gateway endpoint {} is inside the site prefix {sp}", g.endpoint))
                        .label("endpoint would route into its own tunnel")
                        .help("nodes route site prefixes into the tunnels; the endpoint must be the gateway's public (underlay) address"),
                );
            }
            if self.in_cloud(&IpNet::from(g.endpoint)) {
                self.push(
                    Diagnostic::new(
                        endpoint,
                        format!(
                            "gateway endpoint {} is inside the cloud block {}",
                            g.endpoint,
                            self.cloud()
                        ),
                    )
                    .label("endpoint would route into its own tunnel")
                    .help("the endpoint is the gateway's public (underlay) address"),
                );
            }
            for (i, a) in std::iter::once(g.site_address)
                .chain(g.site_address_v6)
                .enumerate()
            {
                if self.in_cloud(&IpNet::from(a)) {
                    self.push(
                        Diagnostic::new(
                            field_span(n, "site-address", i),
                            format!(
                                "gateway site address {a} is inside the cloud block {}",
                                self.cloud()
                            ),
                        )
                        .label("a site-LAN address cannot be lent to the cloud")
                        .help("`site-address` is the gateway's own address on the site LAN"),
                    );
                }
            }
        }
    }

    fn relays(&mut self, relays: &[(Relay, &KdlNode)]) {
        for (r, n) in relays {
            if self.in_cloud(&IpNet::from(r.public_address)) {
                self.push(
                    Diagnostic::new(
                        field_span(n, "public-address", 0),
                        format!(
                            "relay public address {} is inside the cloud block {}",
                            r.public_address,
                            self.cloud()
                        ),
                    )
                    .label("underlay address inside the tunnelled block")
                    .help(
                        "`public-address` is the relay's public IP in the cloud provider's network",
                    ),
                );
            }
            if let Some(a) = r.private_address {
                let inside = self
                    .site
                    .site_prefixes
                    .iter()
                    .chain(&self.site.cloud_blocks)
                    .find(|p| p.contains(&a));
                if let Some(p) = inside {
                    self.push(
                        Diagnostic::new(field_span(n, "private-address", 0), format!("relay private address {a} is inside {p}, which nodes route into the tunnels"))
                            .label("nodes could not reach their relay")
                            .help("`private-address` is the relay's address on the cloud's private network, outside the site's prefixes"),
                    );
                }
            }
        }
    }

    fn neighbors(
        &mut self,
        gateways: &[(Gateway, &KdlNode)],
        bgp: &Bgp,
        bgp_node: Option<&KdlNode>,
    ) {
        let v6_cloud = self
            .site
            .cloud_blocks
            .iter()
            .find(|c| matches!(c, IpNet::V6(_)));
        if let (Some(cb), false) = (v6_cloud, bgp.neighbors.is_empty()) {
            for (g, n) in gateways {
                if g.site_address_v6.is_none() && g.site_address.is_ipv4() {
                    self.push(
                        Diagnostic::new(
                            field_span(n, "site-address", 0),
                            format!("gateway {:?} has no IPv6 site address, but the cloud block {cb} is IPv6", g.name),
                        )
                        .label("only an IPv4 site address")
                        .help("add `site-address \"<its IPv6 address on the site LAN>\"`: the site router needs an IPv6 next hop for the IPv6 cloud routes"),
                    );
                }
            }
        }
        for nb in &bgp.neighbors {
            let span = bgp_node
                .and_then(|b| b.children())
                .and_then(|c| {
                    c.nodes().iter().find(|n| {
                        n.name().value() == "neighbor"
                            && matches!(n.entries().first().map(|e| e.value()), Some(KdlValue::String(s)) if *s == nb.name)
                    })
                })
                .map(|n| field_span(n, "address", 0))
                .unwrap_or((0, 0));
            if let Some((g, _)) = gateways.iter().find(|(g, _)| {
                g.site_address == nb.address || g.site_address_v6 == Some(nb.address)
            }) {
                self.push(
                    Diagnostic::new(span, format!("BGP neighbor {:?} has the site address of gateway {:?}", nb.name, g.name))
                        .label("a gateway, not a site router")
                        .help("`bgp { neighbor }` lists the site routers; gateways peer with each other automatically"),
                );
            }
            if self.in_cloud(&IpNet::from(nb.address)) {
                self.push(
                    Diagnostic::new(span, format!("BGP neighbor {:?} address {} is inside the cloud block {}", nb.name, nb.address, self.cloud()))
                        .label("site routers live on the site LAN")
                        .help("neighbors are the site's routers; cloud nodes peer with the gateways automatically"),
                );
            }
        }
    }

    /// Node and pool prefixes: inside the cloud block, containing the address, not overlapping.
    fn assignments(&mut self, nodes: &[(Node, &KdlNode)], pools: &[(Pool, &KdlNode)]) {
        let cloud = self.cloud();
        let mut owned: Vec<(IpNet, String, Span)> = Vec::new();
        for (x, n) in nodes {
            let addr_span = field_span(n, "address", 0);
            let explicit = n
                .children()
                .is_some_and(|c| c.nodes().iter().any(|f| f.name().value() == "prefix"));
            let address_outside = self.outside_cloud(&IpNet::from(x.address));
            if address_outside {
                self.push(
                    Diagnostic::new(
                        addr_span,
                        format!(
                            "node {:?}: address {} is outside the cloud block {cloud}",
                            x.name, x.address
                        ),
                    )
                    .label("outside the cloud block")
                    .help("node addresses are lent from the site's cloud block"),
                );
            }
            if explicit
                && !x.prefixes.is_empty()
                && !x.prefixes.iter().any(|p| p.contains(&x.address))
            {
                self.push(
                    Diagnostic::new(
                        addr_span,
                        format!(
                            "node {:?}: address {} is in none of its prefixes",
                            x.name, x.address
                        ),
                    )
                    .label("address outside its own prefixes")
                    .help(format!(
                        "a node's address must lie in one of its `prefix` entries ({})",
                        x.prefixes
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                );
            }
            for (i, p) in x.prefixes.iter().enumerate() {
                let span = if explicit {
                    field_span(n, "prefix", i)
                } else {
                    addr_span
                };
                if explicit && self.outside_cloud(p) {
                    self.push(
                        Diagnostic::new(
                            span,
                            format!(
                                "node {:?}: prefix {p} is outside the cloud block {cloud}",
                                x.name
                            ),
                        )
                        .label("outside the cloud block")
                        .help("a node may only hold prefixes inside the cloud block"),
                    );
                }
                owned.push((*p, format!("node {:?}", x.name), span));
            }
        }
        for (p, n) in pools {
            let span = field_span(n, "prefix", 0);
            if self.outside_cloud(&p.prefix) {
                self.push(
                    Diagnostic::new(
                        span,
                        format!(
                            "pool {:?}: prefix {} is outside the cloud block {cloud}",
                            p.name, p.prefix
                        ),
                    )
                    .label("outside the cloud block")
                    .help("pool slots are carved from the cloud block"),
                );
            }
            owned.push((p.prefix, format!("pool {:?}", p.name), span));
        }
        for (i, (a, an, aspan)) in owned.iter().enumerate() {
            for (b, bn, span) in &owned[i + 1..] {
                // Two equal host prefixes are two equal addresses: already reported as such.
                let same_host = a == b && a.prefix_len() == a.max_prefix_len();
                if (a.contains(b) || b.contains(a)) && !same_host {
                    let line = self.line(*aspan);
                    self.push(
                        Diagnostic::new(*span, format!("{b} ({bn}) overlaps {a} ({an})"))
                            .label(format!("overlaps line {line}"))
                            .help("every node and pool needs its own part of the cloud block"),
                    );
                }
            }
        }
    }
}

type Span = (usize, usize);

/// The span of a block's name argument (`"gw1"` in `gateway "gw1"`), else its keyword.
fn block_span(node: &KdlNode) -> Span {
    node.entries()
        .first()
        .map(|e| (e.span().offset(), e.span().len()))
        .unwrap_or_else(|| span_of(node))
}

/// The span of the value of the `nth` child named `field` of `node`; the block name if absent.
fn field_span(node: &KdlNode, field: &str, nth: usize) -> Span {
    node.children()
        .and_then(|c| {
            c.nodes()
                .iter()
                .filter(|n| n.name().value() == field)
                .nth(nth)
        })
        .and_then(|n| n.entries().first())
        .map(|e| (e.span().offset(), e.span().len()))
        .unwrap_or_else(|| block_span(node))
}

/// The span of the key of slot `idx` in a pool block.
fn pool_key_span(node: &KdlNode, idx: u32) -> Span {
    node.children()
        .and_then(|c| {
            c.nodes().iter().find(|n| {
                n.name().value() == "key"
                    && matches!(n.entries().first().map(|e| e.value()), Some(KdlValue::Integer(i)) if *i == idx as i128)
            })
        })
        .and_then(|n| n.entries().get(1))
        .map(|e| (e.span().offset(), e.span().len()))
        .unwrap_or_else(|| block_span(node))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "6cj1RvbVBWr0NVyNHRuy8hK7mnHS6+DtmnOfUM+bX30=";
    const K2: &str = "GOyUYEa7nTv58wvUzQ4UWjkzE0FKEkfWXaC6VOYbdHY=";
    const K3: &str = "/+L7JHOehgMGbhdBGrlYhAvEgkTA2x08wpLJX+Az0Ho=";

    fn minimal(extra: &str) -> String {
        format!(
            r#"site "lab" {{
    asn 65010
    cloud-block "10.200.0.0/16"
    site-prefix "10.10.0.0/16"
    links 2
}}
gateway "gw1" {{
    endpoint "192.0.2.1"
    site-address "10.10.0.2"
    public-key "{K1}"
}}
node "c1" {{
    address "10.200.0.11"
    public-key "{K2}"
}}
{extra}"#
        )
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = parse("t.kdl", &minimal("")).unwrap_or_else(|r| panic!("{}", r.render()));
        assert_eq!(cfg.site.base_port, 51820);
        assert_eq!(cfg.site.mtu, 1420);
        assert_eq!(
            cfg.nodes[0].prefixes,
            vec!["10.200.0.11/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(cfg.role_of("gw1"), Some(Role::Gateway));
        assert_eq!(cfg.role_of("c1"), Some(Role::Node));
    }

    #[test]
    fn a_next_key_is_listed_beside_the_current_one_and_must_be_nobody_elses() {
        let rotating = minimal("").replace(
            &format!("public-key \"{K2}\"\n"),
            &format!("public-key \"{K2}\"\n    next-public-key \"{K3}\"\n"),
        );
        let cfg = parse("t.kdl", &rotating).unwrap_or_else(|r| panic!("{}", r.render()));
        assert_eq!(cfg.next_public_key_of("c1"), Some(K3.parse().unwrap()));
        assert_eq!(cfg.next_public_key_of("gw1"), None);
        let gw = crate::intent::one_shot(&cfg, "gw1", &[]).unwrap();
        let keys: Vec<_> = gw.links[0].peers[0].keys().collect();
        assert_eq!(
            keys,
            [K2.parse().unwrap(), K3.parse().unwrap()],
            "the gateway takes both"
        );
        // The gateway's key as c1's next one: two hosts would hold one key.
        let stolen = minimal("").replace(
            &format!("public-key \"{K2}\"\n"),
            &format!("public-key \"{K2}\"\n    next-public-key \"{K1}\"\n"),
        );
        let msgs: Vec<String> = parse("t.kdl", &stolen)
            .unwrap_err()
            .diagnostics
            .iter()
            .map(|d| d.message.clone())
            .collect();
        assert!(
            msgs.iter().any(|m| m
                == "public key of node \"c1\"'s next key is already the key of gateway \"gw1\""),
            "{msgs:?}"
        );
        let bad = minimal("").replace(
            &format!("public-key \"{K2}\"\n"),
            &format!("public-key \"{K2}\"\n    next-public-key \"nope\"\n"),
        );
        assert!(parse("t.kdl", &bad)
            .unwrap_err()
            .render()
            .contains("invalid public key"));
    }

    #[test]
    fn metrics_are_off_unless_a_port_is_set_and_never_on_bgps() {
        let cfg = parse("t.kdl", &minimal("")).unwrap();
        assert_eq!(cfg.site.metrics_port, None);
        assert_eq!(crate::intent::metrics_listen(&cfg, "gw1"), None);
        let on = minimal("").replace("links 2\n", "links 2\n    metrics-port 9477\n");
        let cfg = parse("t.kdl", &on).unwrap_or_else(|r| panic!("{}", r.render()));
        assert_eq!(
            crate::intent::metrics_listen(&cfg, "gw1"),
            Some("10.10.0.2:9477".parse().unwrap()),
            "a gateway serves on its site address"
        );
        assert_eq!(
            crate::intent::metrics_listen(&cfg, "c1"),
            Some("10.200.0.11:9477".parse().unwrap()),
            "a node on its cloud address"
        );
        let bgp = minimal("").replace("links 2\n", "links 2\n    metrics-port 179\n");
        let err = parse("t.kdl", &bgp).unwrap_err().render();
        assert!(
            err.contains("t.kdl:6:") && err.contains("metrics-port 179 is BGP's port"),
            "{err}"
        );
    }

    #[test]
    fn pool_slots_become_nodes_at_consecutive_addresses() {
        let cfg = parse(
            "t.kdl",
            &minimal(&format!(
                "pool \"burst\" {{\n prefix \"10.200.1.0/28\"\n count 16\n key 3 \"{K3}\"\n}}\n"
            )),
        )
        .unwrap();
        let slot = cfg.nodes.iter().find(|n| n.name == "burst-3").unwrap();
        assert_eq!(slot.address.to_string(), "10.200.1.3");
        assert_eq!(slot.pool.as_deref(), Some("burst"));
    }

    #[test]
    fn a_gateway_takes_an_ipv6_site_address_only_after_its_ipv4_one() {
        let dual = minimal("").replace(
            "site-address \"10.10.0.2\"",
            "site-address \"10.10.0.2\"\n    site-address \"2001:db8:10::2\"",
        );
        let cfg = parse("t.kdl", &dual).unwrap_or_else(|r| panic!("{}", r.render()));
        assert_eq!(
            cfg.gateways[0].site_address_v6,
            Some("2001:db8:10::2".parse().unwrap())
        );
        let swapped = minimal("").replace(
            "site-address \"10.10.0.2\"",
            "site-address \"2001:db8:10::2\"\n    site-address \"10.10.0.2\"",
        );
        let e = parse("t.kdl", &swapped).unwrap_err().render();
        assert!(e.contains("the IPv4 site address must come first"), "{e}");
    }

    #[test]
    fn all_errors_are_reported_not_just_the_first() {
        let src = minimal(
            "node \"c2\" {\n address \"10.99.0.1\"\n public-key \"nope\"\n}\nfrobnicate 1\n",
        );
        let err = parse("t.kdl", &src).unwrap_err();
        let msgs: Vec<_> = err.diagnostics.iter().map(|d| d.message.as_str()).collect();
        assert!(
            msgs.iter().any(|m| m.contains("invalid public key")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.contains("unknown node `frobnicate`")),
            "{msgs:?}"
        );
    }

    #[test]
    fn long_gateway_names_are_rejected_for_device_names() {
        let src = minimal("").replace("\"gw1\"", "\"gateway-zurich\"");
        let err = parse("t.kdl", &src).unwrap_err();
        assert!(
            err.render().contains("too long for device names"),
            "{}",
            err.render()
        );
    }
}

#[cfg(test)]
mod hostile {
    use super::*;

    /// 32 KB of `x;` (what user-data may hold): thousands of errors on one line. The report
    /// stays small and fast to build, whatever the input.
    #[test]
    fn thousands_of_errors_on_one_long_line_render_a_bounded_report() {
        let text = "x;".repeat(16_000);
        let t = std::time::Instant::now();
        let r = parse("user-data", &text).unwrap_err();
        let out = r.render();
        let took = t.elapsed();
        assert!(out.len() < 64 * 1024, "{} bytes of diagnostics", out.len());
        assert!(
            out.contains("more errors not shown"),
            "{}",
            &out[out.len() - 300..]
        );
        assert!(
            out.ends_with("errors found; nothing was applied\n"),
            "{}",
            &out[out.len() - 200..]
        );
        assert!(r.located().len() <= 100);
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn a_file_that_is_not_utf8_is_refused_with_its_position() {
        let mut bytes = b"site \"lab\" {\n asn 65010\n // caf".to_vec();
        bytes.push(0xe9); // Latin-1 e-acute
        bytes.extend_from_slice(b"\n}\n");
        let e = text_of("site.kdl", bytes).unwrap_err();
        assert_eq!(
            e,
            "site.kdl:3:8: not UTF-8 (byte 0xe9 at offset 31); save the file as UTF-8"
        );
        assert_eq!(text_of("x", b"ok".to_vec()).unwrap(), "ok");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        for text in [
            "a {".repeat(20_000),
            "a { ".repeat(5_000) + &"}".repeat(5_000),
        ] {
            let r = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || {
                    // The image's user-data path too (PID 1 reads it).
                    let u = crate::image::userdata::validate(
                        "user-data",
                        &text,
                        &crate::image::userdata::Who::named(Some("gw1")),
                    );
                    assert!(u.unwrap_err().render().contains("nested deeper than 16"));
                    parse("user-data", &text)
                        .map(|_| ())
                        .map_err(|r| r.render())
                })
                .unwrap()
                .join();
            let r = r.expect("the parser must not overflow its stack");
            let e = r.unwrap_err();
            assert!(e.len() < 64 * 1024, "{} bytes", e.len());
        }
    }
}
