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

use crate::diag::{suggest, Diagnostic, Report};
use crate::key::PublicKey;
use ipnet::IpNet;
use kdl::{KdlDocument, KdlNode, KdlValue};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

pub const DEFAULT_BASE_PORT: u16 = 51820;
pub const DEFAULT_MTU: u32 = 1420;
pub const DEFAULT_KEEPALIVE_MS: u32 = 300;
pub const DEFAULT_DEAD_AFTER: u32 = 3;
pub const DEFAULT_HOLD_TIME: u16 = 90;
pub const DEFAULT_MAX_PREFIX: u32 = 100;
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
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Gateway {
    pub name: String,
    /// Public IP address the nodes send their tunnels to.
    pub endpoint: IpAddr,
    /// The gateway's own address on the site LAN (router ID, BGP source).
    pub site_address: IpAddr,
    pub public_key: PublicKey,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Node {
    pub name: String,
    /// Host address inside the cloud block; sits on the node's `ap-lo` device.
    pub address: IpAddr,
    /// Prefixes assigned to this node (default: `address` as a host route).
    pub prefixes: Vec<IpNet>,
    pub public_key: PublicKey,
    /// Pool this node is a slot of, if any.
    pub pool: Option<String>,
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
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bgp {
    pub hold_time: u16,
    pub max_prefix: u32,
    pub neighbors: Vec<Neighbor>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Neighbor {
    pub name: String,
    pub address: IpAddr,
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
pub fn parse(file: &str, source: &str) -> Result<Config, Report> {
    let report = |diagnostics| Report {
        file: file.to_string(),
        source: source.to_string(),
        diagnostics,
    };
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
                    diag.help = d.help.clone();
                    diag
                })
                .collect();
            return Err(report(diags));
        }
    };
    let mut l = Loader { diags: Vec::new() };
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

struct Loader {
    diags: Vec<Diagnostic>,
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
];
const GATEWAY: &[&str] = &["endpoint", "site-address", "public-key"];
const NODE: &[&str] = &["address", "prefix", "public-key"];
const RELAY: &[&str] = &["public-address", "private-address"];
const POOL: &[&str] = &["prefix", "count", "key"];
const BGP: &[&str] = &["hold-time", "max-prefix", "neighbor"];
const NEIGHBOR: &[&str] = &["address"];
/// Children that may appear more than once.
const REPEATABLE: &[&str] = &["cloud-block", "site-prefix", "prefix", "key", "neighbor"];

impl Loader {
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
            self.err(
                Diagnostic::new((0, 0), "missing `site` block")
                    .label("the file needs a site block")
                    .help("add `site \"NAME\" { asn 65010; cloud-block \"10.200.0.0/16\"; site-prefix \"10.10.0.0/16\"; links 4 }`"),
            );
        }
        if gateways.is_empty() && site_node.is_some() {
            self.err(
                Diagnostic::new(span_of(site_node.unwrap()), "no `gateway` defined")
                    .label("this site has no gateway")
                    .help("every node tunnels to the gateways; define at least one `gateway \"NAME\" { ... }`"),
            );
        }
        let site = site?;
        let bgp = bgp.map(|b| b.0).unwrap_or(Bgp {
            hold_time: DEFAULT_HOLD_TIME,
            max_prefix: DEFAULT_MAX_PREFIX,
            neighbors: Vec::new(),
        });
        let mut sem = Semantics {
            site: &site,
            diags: &mut self.diags,
        };
        sem.check(&gateways, &nodes, &relays, &pools, &bgp);
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
        self.err(
            Diagnostic::new(span_of(node), format!("duplicate `{name}`"))
                .label("second definition")
                .help(format!(
                    "`{name}` may appear only once; the first one starts at byte {}",
                    first.span().offset()
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
                self.err(
                    Diagnostic::new(span, format!("`{name}` must be an integer"))
                        .label(format!("found {}", type_name(other))),
                );
                None
            }
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
                let help = if s.contains('/') {
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
            (1, 65535),
            "link i uses UDP port base-port + i",
        );
        if let (Some(l), Some(p)) = (links, base_port) {
            if p + l - 1 > 65535 {
                let span = f
                    .by_name
                    .get("base-port")
                    .map(|v| span_of(v[0]))
                    .unwrap_or(span_of(node));
                self.err(
                    Diagnostic::new(
                        span,
                        format!("ports {p}..{} do not fit in 16 bits", p + l - 1),
                    )
                    .label("base-port too high for the link count")
                    .help(format!(
                        "link i uses base-port + i; use a base-port at most {}",
                        65536 - l
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
        Some(Site {
            name: name?,
            asn: asn? as u32,
            cloud_blocks: cloud.into_iter().map(|c| c.0).collect(),
            site_prefixes: site_prefixes.into_iter().map(|c| c.0).collect(),
            links: links? as u32,
            base_port: base_port? as u16,
            mtu: mtu? as u32,
            keepalive_ms: keepalive? as u32,
            dead_after: dead_after? as u32,
        })
    }

    fn gateway(&mut self, node: &KdlNode) -> Option<Gateway> {
        let name = self.block_name(node);
        let f = self.fields(node, GATEWAY);
        let endpoint = self.required(&f, "endpoint").and_then(|n| self.ip(n));
        let site_address = self.required(&f, "site-address").and_then(|n| self.ip(n));
        let public_key = self
            .required(&f, "public-key")
            .and_then(|n| self.field_key(n));
        Some(Gateway {
            name: name?,
            endpoint: endpoint?,
            site_address: site_address?,
            public_key: public_key?,
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
        let address = address?;
        let prefixes = if prefixes.is_empty() && f.by_name.get("prefix").is_none() {
            vec![IpNet::from(address)]
        } else {
            prefixes
        };
        Some(Node {
            name: name?,
            address,
            prefixes,
            public_key: public_key?,
            pool: None,
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
                    self.err(
                        Diagnostic::new(idx_span, "slot index must be a non-negative integer")
                            .label(format!("found {}", type_name(other))),
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
                        .label("second key for this slot"),
                );
                continue;
            }
            keys.insert(idx, key);
        }
        let (prefix, count) = (prefix?, count? as u32);
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
            "prefixes accepted per neighbour before the session is stopped",
        );
        let mut neighbors: Vec<Neighbor> = Vec::new();
        for n in f.by_name.get("neighbor").cloned().unwrap_or_default() {
            let name = self.block_name(n);
            let nf = self.fields(n, NEIGHBOR);
            let address = self.required(&nf, "address").and_then(|a| self.ip(a));
            if let (Some(name), Some(address)) = (name, address) {
                if neighbors.iter().any(|x| x.name == name) {
                    self.err(
                        Diagnostic::new(span_of(n), format!("duplicate neighbor name {name:?}"))
                            .label("second definition"),
                    );
                } else if neighbors.iter().any(|x| x.address == address) {
                    self.err(
                        Diagnostic::new(
                            span_of(n),
                            format!("two neighbors have the address {address}"),
                        )
                        .label("duplicate address"),
                    );
                } else {
                    neighbors.push(Neighbor { name, address });
                }
            }
        }
        Some(Bgp {
            hold_time: hold? as u16,
            max_prefix: max_prefix? as u32,
            neighbors,
        })
    }
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
            pool: Some(p.name.clone()),
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
    diags: &'a mut Vec<Diagnostic>,
}

impl Semantics<'_> {
    fn in_cloud(&self, net: &IpNet) -> bool {
        self.site.cloud_blocks.iter().any(|c| c.contains(net))
    }

    fn check(
        &mut self,
        gateways: &[(Gateway, &KdlNode)],
        nodes: &[(Node, &KdlNode)],
        relays: &[(Relay, &KdlNode)],
        pools: &[(Pool, &KdlNode)],
        bgp: &Bgp,
    ) {
        let cloud = self
            .site
            .cloud_blocks
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        // Unique host names across every kind (pool slot names included).
        let mut names: HashMap<String, (usize, usize)> = HashMap::new();
        let mut claim = |name: &str, span, diags: &mut Vec<Diagnostic>| {
            if names.insert(name.to_string(), span).is_some() {
                diags.push(
                    Diagnostic::new(span, format!("the name {name:?} is used twice"))
                        .label("duplicate name")
                        .help("gateway, node, relay and pool-slot names must be unique: hosts pick themselves by name"),
                );
            }
        };
        for (g, n) in gateways {
            claim(&g.name, span_of(n), self.diags);
        }
        for (x, n) in nodes {
            claim(&x.name, span_of(n), self.diags);
        }
        for (r, n) in relays {
            claim(&r.name, span_of(n), self.diags);
        }
        for (p, n) in pools {
            for slot in pool_slots(p) {
                claim(&slot.name, span_of(n), self.diags);
            }
        }

        // Device names on nodes are ap-{gateway}-{link}; IFNAMSIZ is 16.
        let digits = (self.site.links - 1).to_string().len();
        for (g, n) in gateways {
            let longest = node_link_name(&g.name, self.site.links - 1);
            if longest.len() > MAX_IFNAME {
                self.diags.push(
                    Diagnostic::new(span_of(n), format!("gateway name {:?} is too long for device names", g.name))
                        .label(format!("`{longest}` exceeds 15 characters"))
                        .help(format!(
                            "nodes name their tunnel devices ap-GATEWAY-LINK; with {} links keep gateway names to {} characters",
                            self.site.links,
                            MAX_IFNAME - 4 - digits
                        )),
                );
            }
            if let Some(sp) = self
                .site
                .site_prefixes
                .iter()
                .find(|p| p.contains(&g.endpoint))
            {
                self.diags.push(
                    Diagnostic::new(span_of(n), format!("gateway endpoint {} is inside the site prefix {sp}", g.endpoint))
                        .label("endpoint would route into its own tunnel")
                        .help("nodes route site prefixes into the tunnels; the endpoint must be the gateway's public (underlay) address"),
                );
            }
            if self.in_cloud(&IpNet::from(g.endpoint)) {
                self.diags.push(
                    Diagnostic::new(
                        span_of(n),
                        format!(
                            "gateway endpoint {} is inside the cloud block {cloud}",
                            g.endpoint
                        ),
                    )
                    .label("endpoint would route into its own tunnel")
                    .help("the endpoint is the gateway's public (underlay) address"),
                );
            }
        }

        // Unique public keys.
        let mut keys: HashMap<PublicKey, (usize, usize)> = HashMap::new();
        let mut claim_key = |k: PublicKey, span, diags: &mut Vec<Diagnostic>| {
            if keys.insert(k, span).is_some() {
                diags.push(
                    Diagnostic::new(span, "public key used twice")
                        .label("duplicate key")
                        .help(
                            "each host has its own key pair: generate one with `appliance genkey`",
                        ),
                );
            }
        };
        for (g, n) in gateways {
            claim_key(g.public_key, span_of(n), self.diags);
        }
        for (x, n) in nodes {
            claim_key(x.public_key, span_of(n), self.diags);
        }
        for (p, n) in pools {
            for k in p.keys.values() {
                claim_key(*k, span_of(n), self.diags);
            }
        }

        // Unique addresses (gateway endpoints and site addresses, node addresses, relays).
        let mut addrs: HashMap<IpAddr, (usize, usize)> = HashMap::new();
        let mut claim_addr = |a: IpAddr, span, diags: &mut Vec<Diagnostic>| {
            if addrs.insert(a, span).is_some() {
                diags.push(
                    Diagnostic::new(span, format!("address {a} is used twice"))
                        .label("duplicate address")
                        .help("every endpoint and host address must be unique in the site"),
                );
            }
        };
        for (g, n) in gateways {
            claim_addr(g.endpoint, span_of(n), self.diags);
            claim_addr(g.site_address, span_of(n), self.diags);
        }
        for (x, n) in nodes {
            claim_addr(x.address, span_of(n), self.diags);
        }
        for (r, n) in relays {
            claim_addr(r.public_address, span_of(n), self.diags);
            if let Some(a) = r.private_address {
                claim_addr(a, span_of(n), self.diags);
            }
        }
        for nb in &bgp.neighbors {
            if gateways.iter().any(|(g, _)| g.site_address == nb.address) {
                // A gateway peering with itself is a config slip worth naming.
                let span = gateways
                    .iter()
                    .find(|(g, _)| g.site_address == nb.address)
                    .map(|(_, n)| span_of(n))
                    .unwrap_or((0, 0));
                self.diags.push(
                    Diagnostic::new(span, format!("BGP neighbor {:?} has this gateway's site address {}", nb.name, nb.address))
                        .label("gateway and neighbor share an address")
                        .help("`bgp { neighbor }` lists the site routers; gateways peer with each other automatically"),
                );
            }
        }

        // Node prefixes: inside the cloud block, containing the address, not overlapping.
        let mut owned: Vec<(IpNet, String, (usize, usize))> = Vec::new();
        for (x, n) in nodes {
            let span = span_of(n);
            if !self.in_cloud(&IpNet::from(x.address)) {
                self.diags.push(
                    Diagnostic::new(
                        span,
                        format!(
                            "node {:?}: address {} is outside the cloud block {cloud}",
                            x.name, x.address
                        ),
                    )
                    .label("outside the cloud block")
                    .help("node addresses are lent from the site's cloud block"),
                );
            }
            if x.prefixes.is_empty() {
                continue;
            }
            if !x.prefixes.iter().any(|p| p.contains(&x.address)) {
                self.diags.push(
                    Diagnostic::new(
                        span,
                        format!(
                            "node {:?}: address {} is in none of its prefixes",
                            x.name, x.address
                        ),
                    )
                    .label("address outside its own prefixes")
                    .help("a node's address must lie in one of its `prefix` entries"),
                );
            }
            for p in &x.prefixes {
                if !self.in_cloud(p) {
                    self.diags.push(
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
                owned.push((*p, x.name.clone(), span));
            }
        }
        for (p, n) in pools {
            let span = span_of(n);
            if !self.in_cloud(&p.prefix) {
                self.diags.push(
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
            owned.push((p.prefix, format!("pool {}", p.name), span));
        }
        for (i, (a, an, _)) in owned.iter().enumerate() {
            for (b, bn, span) in &owned[i + 1..] {
                if a.contains(b) || b.contains(a) {
                    self.diags.push(
                        Diagnostic::new(*span, format!("{b} ({bn}) overlaps {a} ({an})"))
                            .label("overlapping assignment")
                            .help("every node and pool needs its own part of the cloud block"),
                    );
                }
            }
        }
    }
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
        let cfg = parse("t.kdl", &minimal("")).unwrap();
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
