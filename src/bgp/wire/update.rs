//! UPDATE (RFC 4271 §4.3, RFC 4760, RFC 7911): path attributes, NLRI with path identifiers,
//! decoding with RFC 7606 error handling, encoding and splitting into messages that fit.

use super::*;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    Igp = 0,
    Egp = 1,
    Incomplete = 2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsSegment {
    Set(Vec<u32>),
    Sequence(Vec<u32>),
}

/// Path attributes we understand, plus unknown optional transitive ones (passed on with the
/// Partial bit set, RFC 4271 §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub origin: Origin,
    pub as_path: Vec<AsSegment>,
    /// NEXT_HOP (IPv4 NLRI) or the MP_REACH next hop (IPv6 NLRI).
    pub next_hop: Option<IpAddr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub atomic_aggregate: bool,
    pub communities: Vec<u32>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    pub unknown: Vec<RawAttribute>,
}

impl Default for Attributes {
    fn default() -> Self {
        Attributes {
            origin: Origin::Igp,
            as_path: Vec::new(),
            next_hop: None,
            med: None,
            local_pref: None,
            atomic_aggregate: false,
            communities: Vec::new(),
            originator_id: None,
            cluster_list: Vec::new(),
            unknown: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawAttribute {
    pub flags: u8,
    pub code: u8,
    pub value: Vec<u8>,
}

/// One NLRI: a prefix and its path identifier. The identifier is on the wire only on sessions
/// that negotiated ADD-PATH for the prefix's family (RFC 7911); elsewhere it is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nlri {
    pub prefix: IpNet,
    pub path_id: u32,
}

impl From<IpNet> for Nlri {
    fn from(prefix: IpNet) -> Nlri {
        Nlri { prefix, path_id: 0 }
    }
}

impl std::fmt::Display for Nlri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.path_id {
            0 => write!(f, "{}", self.prefix),
            id => write!(f, "{} (path {id})", self.prefix),
        }
    }
}

/// UPDATE (RFC 4271 §4.3, RFC 4760): IPv4 NLRI in the classic fields, IPv6 in MP_(UN)REACH.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    pub withdrawn: Vec<Nlri>,
    pub announced: Vec<Nlri>,
    pub attributes: Option<Attributes>,
    /// RFC 7606: a malformed attribute made this UPDATE's announcements withdrawals.
    pub treat_as_withdraw: bool,
    /// What was wrong (malformed or discarded attributes), for counters and logs.
    pub errors: Vec<String>,
    /// The MP_REACH next hop, when the UPDATE also carries IPv4 NLRI whose NEXT_HOP is in
    /// `attributes.next_hop` (one UPDATE may announce both families; each keeps its own).
    pub mp_next_hop: Option<IpAddr>,
}

impl Update {
    /// End-of-RIB marker for IPv4 unicast (RFC 4724 §2): an empty UPDATE.
    pub fn is_end_of_rib(&self) -> bool {
        self.withdrawn.is_empty() && self.announced.is_empty() && self.attributes.is_none()
    }

    /// What a receiver should withdraw: the withdrawn routes, plus the announcements when
    /// the UPDATE is treated as a withdrawal.
    pub fn effective_withdrawn(&self) -> Vec<Nlri> {
        let mut w = self.withdrawn.clone();
        if self.treat_as_withdraw {
            w.extend(self.announced.iter().copied());
        }
        w
    }
}

/// Prefixes in the RFC 4271 NLRI encoding: length in bits, then the significant octets.
/// NLRI of one family; with `add_path`, each prefix follows its 4-octet path identifier.
pub(super) fn decode_prefixes(mut b: &[u8], v6: bool, add_path: bool) -> Result<Vec<Nlri>, String> {
    let mut out = Vec::new();
    let max = if v6 { 128 } else { 32 };
    while !b.is_empty() {
        let mut path_id = 0;
        if add_path {
            let id = b.get(..4).ok_or("path identifier truncated")?;
            path_id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
            b = &b[4..];
            if b.is_empty() {
                return Err("path identifier without a prefix".into());
            }
        }
        let bits = b[0] as usize;
        if bits > max {
            return Err(format!("prefix length {bits} > {max}"));
        }
        let octets = bits.div_ceil(8);
        let raw = b.get(1..1 + octets).ok_or("prefix overruns its field")?;
        let net = if v6 {
            let mut a = [0u8; 16];
            a[..octets].copy_from_slice(raw);
            IpNet::V6(
                Ipv6Net::new(Ipv6Addr::from(a), bits as u8)
                    .expect("length checked")
                    .trunc(),
            )
        } else {
            let mut a = [0u8; 4];
            a[..octets].copy_from_slice(raw);
            IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(a), bits as u8)
                    .expect("length checked")
                    .trunc(),
            )
        };
        out.push(Nlri {
            prefix: net,
            path_id,
        });
        b = &b[1 + octets..];
    }
    Ok(out)
}

pub(super) fn decode_update(b: &[u8], ctx: Context) -> Result<Update, DecodeError> {
    let malformed = |why: String| err(3, 1, &[], why);
    let wlen = u16::from_be_bytes([b[0], b[1]]) as usize;
    let withdrawn_raw = b
        .get(2..2 + wlen)
        .ok_or_else(|| malformed("withdrawn routes length overruns the UPDATE".into()))?;
    let rest = &b[2 + wlen..];
    if rest.len() < 2 {
        return Err(malformed("no room for the path attribute length".into()));
    }
    let alen = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let attrs_raw = rest
        .get(2..2 + alen)
        .ok_or_else(|| malformed("total path attribute length overruns the UPDATE".into()))?;
    let nlri_raw = &rest[2 + alen..];
    let mut u = Update {
        withdrawn: decode_prefixes(withdrawn_raw, false, ctx.add_path_rx.ipv4)
            .map_err(|e| err(3, 1, &[], format!("withdrawn routes: {e}")))?,
        announced: decode_prefixes(nlri_raw, false, ctx.add_path_rx.ipv4)
            .map_err(|e| err(3, 10, &[], format!("NLRI: {e}")))?,
        ..Default::default()
    };
    if attrs_raw.is_empty() {
        if !u.announced.is_empty() {
            // RFC 7606 §3.d: missing mandatory attributes → treat-as-withdraw.
            u.treat_as_withdraw = true;
            u.errors.push("NLRI without path attributes".into());
        }
        return Ok(u);
    }
    let mut a = Attributes::default();
    let mut seen = [false; 256];
    let (mut have_origin, mut have_as_path, mut have_v4_next_hop) = (false, false, false);
    let (mut v4_next_hop, mut mp_next_hop) = (None, None);
    let mut p = attrs_raw;
    while !p.is_empty() {
        if p.len() < 3 {
            u.treat_as_withdraw = true;
            u.errors.push("truncated attribute header".into());
            break;
        }
        let (flags, code) = (p[0], p[1]);
        let (len, hdr) = if flags & EXTENDED != 0 {
            if p.len() < 4 {
                u.treat_as_withdraw = true;
                u.errors.push("truncated extended attribute header".into());
                break;
            }
            (u16::from_be_bytes([p[2], p[3]]) as usize, 4)
        } else {
            (p[2] as usize, 3)
        };
        let Some(value) = p.get(hdr..hdr + len) else {
            // RFC 7606 §4: the last attribute overruns the attribute list.
            u.treat_as_withdraw = true;
            u.errors
                .push(format!("attribute {code} overruns the attribute list"));
            break;
        };
        p = &p[hdr + len..];
        if std::mem::replace(&mut seen[code as usize], true) {
            if code == MP_REACH || code == MP_UNREACH {
                return Err(malformed(format!("attribute {code} appears twice")));
            }
            u.errors
                .push(format!("duplicate attribute {code} discarded"));
            continue;
        }
        let well_known = |f: u8| f & (OPTIONAL | TRANSITIVE) == TRANSITIVE;
        let optional_non_transitive = |f: u8| f & (OPTIONAL | TRANSITIVE) == OPTIONAL;
        let mut withdraw = |why: String| {
            u.treat_as_withdraw = true;
            u.errors.push(why);
        };
        match code {
            ORIGIN => {
                if !well_known(flags) || len != 1 || value[0] > 2 {
                    withdraw(format!(
                        "malformed ORIGIN (flags {flags:#04x}, length {len})"
                    ));
                } else {
                    a.origin = [Origin::Igp, Origin::Egp, Origin::Incomplete][value[0] as usize];
                    have_origin = true;
                }
            }
            AS_PATH => match (well_known(flags), decode_as_path(value, ctx.four_octet_as)) {
                // RFC 7607: AS 0 in AS_PATH makes the UPDATE malformed.
                (true, Ok(path)) if has_as_zero(&path) => {
                    withdraw("AS_PATH contains AS 0 (RFC 7607)".into());
                    have_as_path = true;
                }
                (true, Ok(path)) => {
                    a.as_path = path;
                    have_as_path = true;
                }
                (false, _) => withdraw(format!("AS_PATH flags {flags:#04x}")),
                (_, Err(e)) => withdraw(format!("malformed AS_PATH: {e}")),
            },
            NEXT_HOP => {
                if !well_known(flags) || len != 4 {
                    withdraw(format!(
                        "malformed NEXT_HOP (flags {flags:#04x}, length {len})"
                    ));
                } else {
                    let nh = Ipv4Addr::new(value[0], value[1], value[2], value[3]);
                    if nh.is_unspecified() || nh.is_multicast() || nh.is_broadcast() {
                        withdraw(format!("invalid NEXT_HOP {nh}"));
                    } else {
                        v4_next_hop = Some(IpAddr::V4(nh));
                        have_v4_next_hop = true;
                    }
                }
            }
            MED => {
                if !optional_non_transitive(flags) || len != 4 {
                    withdraw(format!(
                        "malformed MULTI_EXIT_DISC (flags {flags:#04x}, length {len})"
                    ));
                } else {
                    a.med = Some(u32::from_be_bytes([value[0], value[1], value[2], value[3]]));
                }
            }
            LOCAL_PREF => {
                if !well_known(flags) || len != 4 {
                    withdraw(format!(
                        "malformed LOCAL_PREF (flags {flags:#04x}, length {len})"
                    ));
                } else {
                    a.local_pref =
                        Some(u32::from_be_bytes([value[0], value[1], value[2], value[3]]));
                }
            }
            ATOMIC_AGGREGATE => {
                if !well_known(flags) || len != 0 {
                    u.errors.push("malformed ATOMIC_AGGREGATE discarded".into());
                } else {
                    a.atomic_aggregate = true;
                }
            }
            AGGREGATOR => {
                let want = if ctx.four_octet_as { 8 } else { 6 };
                if flags & (OPTIONAL | TRANSITIVE) != (OPTIONAL | TRANSITIVE) || len != want {
                    u.errors.push("malformed AGGREGATOR discarded".into());
                } else if value[..want - 4].iter().all(|b| *b == 0) {
                    u.errors
                        .push("AGGREGATOR from AS 0 discarded (RFC 7607)".into());
                } else {
                    a.unknown.push(RawAttribute {
                        flags,
                        code,
                        value: value.to_vec(),
                    });
                }
            }
            COMMUNITIES => {
                if flags & (OPTIONAL | TRANSITIVE) != (OPTIONAL | TRANSITIVE) || len % 4 != 0 {
                    withdraw(format!("malformed COMMUNITIES (length {len})"));
                } else {
                    a.communities = value
                        .chunks(4)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                }
            }
            ORIGINATOR_ID => {
                if !optional_non_transitive(flags) || len != 4 {
                    withdraw(format!("malformed ORIGINATOR_ID (length {len})"));
                } else {
                    a.originator_id = Some(Ipv4Addr::new(value[0], value[1], value[2], value[3]));
                }
            }
            CLUSTER_LIST => {
                if !optional_non_transitive(flags) || len % 4 != 0 {
                    withdraw(format!("malformed CLUSTER_LIST (length {len})"));
                } else {
                    a.cluster_list = value
                        .chunks(4)
                        .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                        .collect();
                }
            }
            MP_REACH => {
                // RFC 7606 §7.11: a malformed MP_REACH hides its NLRI: session reset.
                let (nh, nlri) = decode_mp_reach(value, ctx.add_path_rx)
                    .map_err(|e| malformed(format!("MP_REACH_NLRI: {e}")))?;
                mp_next_hop = nh.or(mp_next_hop);
                u.announced.extend(nlri);
            }
            MP_UNREACH => {
                let nlri = decode_mp_unreach(value, ctx.add_path_rx)
                    .map_err(|e| malformed(format!("MP_UNREACH_NLRI: {e}")))?;
                u.withdrawn.extend(nlri);
            }
            // RFC 6793 §6 and RFC 7607: a malformed AS4_PATH, or one holding AS 0, is discarded.
            AS4_PATH => match decode_as_path(value, true) {
                Ok(path) if !has_as_zero(&path) => a.unknown.push(RawAttribute {
                    flags: flags | PARTIAL,
                    code,
                    value: value.to_vec(),
                }),
                Ok(_) => u
                    .errors
                    .push("AS4_PATH with AS 0 discarded (RFC 7607)".into()),
                Err(e) => u.errors.push(format!("malformed AS4_PATH discarded: {e}")),
            },
            // RFC 7606 §7.14, RFC 8092 §6: a length that is no multiple of the entry size (or
            // an empty LARGE_COMMUNITY) is treat-as-withdraw.
            EXTENDED_COMMUNITIES if len % 8 != 0 => {
                withdraw(format!("malformed EXTENDED_COMMUNITIES (length {len})"))
            }
            LARGE_COMMUNITY if len % 12 != 0 || len == 0 => {
                withdraw(format!("malformed LARGE_COMMUNITY (length {len})"))
            }
            _ if flags & OPTIONAL == 0 => {
                // RFC 4271 §6.3: an unrecognized well-known attribute is a session error.
                return Err(err(
                    3,
                    2,
                    &[flags, code],
                    format!("unrecognized well-known attribute {code}"),
                ));
            }
            _ if flags & TRANSITIVE != 0 => a.unknown.push(RawAttribute {
                flags: flags | PARTIAL,
                code,
                value: value.to_vec(),
            }),
            _ => {} // unknown optional non-transitive: quietly ignored (RFC 4271 §5)
        }
    }
    let has_v4_nlri = u.announced.iter().any(|n| matches!(n.prefix, IpNet::V4(_)));
    let has_v6_nlri = u.announced.iter().any(|n| matches!(n.prefix, IpNet::V6(_)));
    // Each family its own next hop: NEXT_HOP for IPv4 NLRI, MP_REACH's for IPv6.
    if has_v4_nlri {
        a.next_hop = v4_next_hop;
        u.mp_next_hop = if has_v6_nlri { mp_next_hop } else { None };
    } else {
        a.next_hop = mp_next_hop.or(v4_next_hop);
    }
    if !u.announced.is_empty() {
        let mut missing = Vec::new();
        if !have_origin {
            missing.push("ORIGIN");
        }
        if !have_as_path {
            missing.push("AS_PATH");
        }
        if has_v4_nlri && !have_v4_next_hop && !u.treat_as_withdraw {
            missing.push("NEXT_HOP");
        }
        if !missing.is_empty() && !u.treat_as_withdraw {
            u.treat_as_withdraw = true;
            u.errors.push(format!(
                "missing well-known attribute(s): {}",
                missing.join(", ")
            ));
        }
        u.attributes = Some(a);
    }
    Ok(u)
}

fn has_as_zero(path: &[AsSegment]) -> bool {
    path.iter().any(|s| match s {
        AsSegment::Set(v) | AsSegment::Sequence(v) => v.contains(&0),
    })
}

pub(super) fn decode_as_path(mut v: &[u8], four: bool) -> Result<Vec<AsSegment>, String> {
    let width = if four { 4 } else { 2 };
    let mut out = Vec::new();
    while !v.is_empty() {
        if v.len() < 2 {
            return Err("truncated segment header".into());
        }
        let (t, n) = (v[0], v[1] as usize);
        if n == 0 {
            return Err("empty segment".into());
        }
        let body = v
            .get(2..2 + n * width)
            .ok_or("segment overruns the attribute")?;
        let asns: Vec<u32> = body
            .chunks(width)
            .map(|c| {
                if four {
                    u32::from_be_bytes([c[0], c[1], c[2], c[3]])
                } else {
                    u16::from_be_bytes([c[0], c[1]]) as u32
                }
            })
            .collect();
        out.push(match t {
            1 => AsSegment::Set(asns),
            2 => AsSegment::Sequence(asns),
            _ => return Err(format!("segment type {t}")),
        });
        v = &v[2 + n * width..];
    }
    Ok(out)
}

pub(super) fn afi_is_v6(afi: u16, safi: u8) -> Result<bool, String> {
    match (afi, safi) {
        (AFI_IPV4, SAFI_UNICAST) => Ok(false),
        (AFI_IPV6, SAFI_UNICAST) => Ok(true),
        _ => Err(format!("unsupported AFI/SAFI {afi}/{safi}")),
    }
}

pub(super) fn decode_mp_reach(
    v: &[u8],
    rx: Families,
) -> Result<(Option<IpAddr>, Vec<Nlri>), String> {
    if v.len() < 5 {
        return Err("too short".into());
    }
    let v6 = afi_is_v6(u16::from_be_bytes([v[0], v[1]]), v[2])?;
    let nh_len = v[3] as usize;
    let nh = v.get(4..4 + nh_len).ok_or("next hop overruns")?;
    let next_hop = match (v6, nh_len) {
        (true, 16) | (true, 32) => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(&nh[..16]).expect("16"),
        ))),
        (false, 4) => Some(IpAddr::V4(Ipv4Addr::new(nh[0], nh[1], nh[2], nh[3]))),
        _ => return Err(format!("next hop length {nh_len}")),
    };
    let rest = v.get(4 + nh_len..).ok_or("truncated")?;
    if rest.is_empty() {
        return Err("no reserved octet".into());
    }
    Ok((next_hop, decode_prefixes(&rest[1..], v6, rx.has(v6))?))
}

pub(super) fn decode_mp_unreach(v: &[u8], rx: Families) -> Result<Vec<Nlri>, String> {
    if v.len() < 3 {
        return Err("too short".into());
    }
    let v6 = afi_is_v6(u16::from_be_bytes([v[0], v[1]]), v[2])?;
    decode_prefixes(&v[3..], v6, rx.has(v6))
}

pub(super) fn encode_prefix(out: &mut Vec<u8>, nlri: &Nlri, tx: Families) {
    let n = &nlri.prefix;
    if tx.has(matches!(n, IpNet::V6(_))) {
        out.extend_from_slice(&nlri.path_id.to_be_bytes());
    }
    let bits = n.prefix_len();
    out.push(bits);
    let octets = (bits as usize).div_ceil(8);
    match n.addr() {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()[..octets]),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()[..octets]),
    }
}

pub(super) fn attr(out: &mut Vec<u8>, flags: u8, code: u8, value: &[u8]) {
    if value.len() > 255 {
        out.extend_from_slice(&[flags | EXTENDED, code]);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[flags & !EXTENDED, code, value.len() as u8]);
    }
    out.extend_from_slice(value);
}

pub(super) fn encode_update(u: &Update, ctx: Context) -> Vec<u8> {
    let tx = ctx.add_path_tx;
    let (w4, w6): (Vec<_>, Vec<_>) = u
        .withdrawn
        .iter()
        .partition(|n| matches!(n.prefix, IpNet::V4(_)));
    let (a4, a6): (Vec<_>, Vec<_>) = u
        .announced
        .iter()
        .partition(|n| matches!(n.prefix, IpNet::V4(_)));
    let mut withdrawn = Vec::new();
    for n in &w4 {
        encode_prefix(&mut withdrawn, n, tx);
    }
    let mut attrs = Vec::new();
    if let Some(a) = &u.attributes {
        attr(&mut attrs, TRANSITIVE, ORIGIN, &[a.origin as u8]);
        let mut path = Vec::new();
        for seg in &a.as_path {
            let (t, asns) = match seg {
                AsSegment::Set(v) => (1, v),
                AsSegment::Sequence(v) => (2, v),
            };
            path.extend_from_slice(&[t, asns.len() as u8]);
            for asn in asns {
                if ctx.four_octet_as {
                    path.extend_from_slice(&asn.to_be_bytes());
                } else {
                    let a = if *asn > u16::MAX as u32 {
                        AS_TRANS
                    } else {
                        *asn as u16
                    };
                    path.extend_from_slice(&a.to_be_bytes());
                }
            }
        }
        attr(&mut attrs, TRANSITIVE, AS_PATH, &path);
        if let (Some(IpAddr::V4(nh)), false) = (a.next_hop, a4.is_empty()) {
            attr(&mut attrs, TRANSITIVE, NEXT_HOP, &nh.octets());
        }
        if let Some(med) = a.med {
            attr(&mut attrs, OPTIONAL, MED, &med.to_be_bytes());
        }
        if let Some(lp) = a.local_pref {
            attr(&mut attrs, TRANSITIVE, LOCAL_PREF, &lp.to_be_bytes());
        }
        if a.atomic_aggregate {
            attr(&mut attrs, TRANSITIVE, ATOMIC_AGGREGATE, &[]);
        }
        if !a.communities.is_empty() {
            let v: Vec<u8> = a.communities.iter().flat_map(|c| c.to_be_bytes()).collect();
            attr(&mut attrs, OPTIONAL | TRANSITIVE, COMMUNITIES, &v);
        }
        if let Some(o) = a.originator_id {
            attr(&mut attrs, OPTIONAL, ORIGINATOR_ID, &o.octets());
        }
        if !a.cluster_list.is_empty() {
            let v: Vec<u8> = a.cluster_list.iter().flat_map(|c| c.octets()).collect();
            attr(&mut attrs, OPTIONAL, CLUSTER_LIST, &v);
        }
        if !a6.is_empty() {
            let mut v = AFI_IPV6.to_be_bytes().to_vec();
            v.push(SAFI_UNICAST);
            match u.mp_next_hop.or(a.next_hop) {
                Some(IpAddr::V6(nh)) => {
                    v.push(16);
                    v.extend_from_slice(&nh.octets());
                }
                // An IPv4 next hop for IPv6 routes: the IPv4-mapped form (RFC 4798 style).
                Some(IpAddr::V4(nh)) => {
                    v.push(16);
                    v.extend_from_slice(&nh.to_ipv6_mapped().octets());
                }
                None => v.push(0),
            }
            v.push(0);
            for n in &a6 {
                encode_prefix(&mut v, n, tx);
            }
            attr(&mut attrs, OPTIONAL, MP_REACH, &v);
        }
        for raw in &a.unknown {
            attr(&mut attrs, raw.flags, raw.code, &raw.value);
        }
    }
    if !w6.is_empty() {
        let mut v = AFI_IPV6.to_be_bytes().to_vec();
        v.push(SAFI_UNICAST);
        for n in &w6 {
            encode_prefix(&mut v, n, tx);
        }
        attr(&mut attrs, OPTIONAL, MP_UNREACH, &v);
    }
    let mut b = (withdrawn.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(&withdrawn);
    b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    b.extend_from_slice(&attrs);
    for n in &a4 {
        encode_prefix(&mut b, n, tx);
    }
    b
}

/// Split announcements or withdrawals sharing `attributes` into UPDATEs that each fit in
/// 4096 bytes once encoded.
pub fn updates(
    withdrawn: &[Nlri],
    announced: &[Nlri],
    attributes: Option<&Attributes>,
) -> Vec<Update> {
    // 21 bytes per IPv6 prefix at most (with a path identifier): 150 per message leave room
    // for the attributes.
    let mut out: Vec<Update> = withdrawn
        .chunks(150)
        .map(|chunk| Update {
            withdrawn: chunk.to_vec(),
            ..Default::default()
        })
        .collect();
    out.extend(announced.chunks(150).map(|chunk| Update {
        announced: chunk.to_vec(),
        attributes: attributes.cloned(),
        ..Default::default()
    }));
    out
}

/// [`updates`], encoded.
pub fn encode_updates(
    withdrawn: &[Nlri],
    announced: &[Nlri],
    attributes: Option<&Attributes>,
    ctx: Context,
) -> Vec<Vec<u8>> {
    updates(withdrawn, announced, attributes)
        .into_iter()
        .map(|u| encode(&Message::Update(u), ctx))
        .collect()
}
