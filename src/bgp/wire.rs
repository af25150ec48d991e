//! BGP-4 message codec (RFC 4271) with 4-octet AS numbers (RFC 6793), multiprotocol IPv4/IPv6
//! unicast (RFC 4760), route refresh (RFC 2918), route reflection attributes (RFC 4456) and
//! revised error handling (RFC 7606). Pure: bytes in, values out, and back.
//!
//! Decoding never panics. A header or OPEN error, or an UPDATE that cannot be parsed reliably
//! (attribute list inconsistent with the message, malformed MP_REACH/MP_UNREACH), is a
//! [`DecodeError`] that carries the NOTIFICATION to send (session reset). A malformed
//! attribute in an otherwise parseable UPDATE marks it `treat_as_withdraw` (its announcements
//! become withdrawals) or discards just that attribute, as RFC 7606 §3/§7 prescribes; the
//! reasons are kept in [`Update::errors`] so they can be counted and logged.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                         Marker (16 x 0xff)                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          Length               |      Type     |    (RFC 4271 §4.1)
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const HEADER_LEN: usize = 19;
pub const MAX_LEN: usize = 4096;
pub const AS_TRANS: u16 = 23456;

const OPEN: u8 = 1;
const UPDATE: u8 = 2;
const NOTIFICATION: u8 = 3;
const KEEPALIVE: u8 = 4;
const ROUTE_REFRESH: u8 = 5;

pub const AFI_IPV4: u16 = 1;
pub const AFI_IPV6: u16 = 2;
pub const SAFI_UNICAST: u8 = 1;

// Path attribute type codes.
const ORIGIN: u8 = 1;
const AS_PATH: u8 = 2;
const NEXT_HOP: u8 = 3;
const MED: u8 = 4;
const LOCAL_PREF: u8 = 5;
const ATOMIC_AGGREGATE: u8 = 6;
const AGGREGATOR: u8 = 7;
const COMMUNITIES: u8 = 8;
const ORIGINATOR_ID: u8 = 9;
const CLUSTER_LIST: u8 = 10;
const MP_REACH: u8 = 14;
const MP_UNREACH: u8 = 15;

// Attribute flags.
const OPTIONAL: u8 = 0x80;
const TRANSITIVE: u8 = 0x40;
const PARTIAL: u8 = 0x20;
const EXTENDED: u8 = 0x10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh { afi: u16, safi: u8 },
}

/// OPEN (RFC 4271 §4.2). `asn` is the real AS: the 4-octet capability's value when present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub asn: u32,
    pub hold_time: u16,
    pub bgp_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// RFC 4760 (code 1).
    Multiprotocol {
        afi: u16,
        safi: u8,
    },
    /// RFC 2918 (code 2).
    RouteRefresh,
    /// RFC 4724 (code 64): restart flags (R bit), restart time, per-family forwarding state.
    GracefulRestart {
        restarting: bool,
        time: u16,
        families: Vec<(u16, u8, bool)>,
    },
    /// RFC 6793 (code 65).
    FourOctetAs(u32),
    /// RFC 7911 (code 69): (afi, safi, send/receive bits).
    AddPath(Vec<(u16, u8, u8)>),
    Unknown {
        code: u8,
        value: Vec<u8>,
    },
}

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: Vec<u8>) -> Self {
        Notification {
            code,
            subcode,
            data,
        }
    }

    pub fn cease(subcode: u8) -> Self {
        Notification::new(6, subcode, Vec::new())
    }

    /// Human name, for logs and status.
    pub fn describe(&self) -> String {
        let what = match (self.code, self.subcode) {
            (1, 1) => "message header: connection not synchronized",
            (1, 2) => "message header: bad message length",
            (1, 3) => "message header: bad message type",
            (2, 1) => "OPEN: unsupported version number",
            (2, 2) => "OPEN: bad peer AS",
            (2, 3) => "OPEN: bad BGP identifier",
            (2, 4) => "OPEN: unsupported optional parameter",
            (2, 6) => "OPEN: unacceptable hold time",
            (2, 7) => "OPEN: unsupported capability",
            (3, 1) => "UPDATE: malformed attribute list",
            (3, 2) => "UPDATE: unrecognized well-known attribute",
            (3, 3) => "UPDATE: missing well-known attribute",
            (3, 4) => "UPDATE: attribute flags error",
            (3, 5) => "UPDATE: attribute length error",
            (3, 6) => "UPDATE: invalid ORIGIN",
            (3, 8) => "UPDATE: invalid NEXT_HOP",
            (3, 9) => "UPDATE: optional attribute error",
            (3, 10) => "UPDATE: invalid network field",
            (3, 11) => "UPDATE: malformed AS_PATH",
            (4, _) => "hold timer expired",
            (5, _) => "finite state machine error",
            (6, 1) => "cease: maximum number of prefixes reached",
            (6, 2) => "cease: administrative shutdown",
            (6, 3) => "cease: peer de-configured",
            (6, 4) => "cease: administrative reset",
            (6, 5) => "cease: connection rejected",
            (6, 6) => "cease: other configuration change",
            (6, 7) => "cease: connection collision resolution",
            (6, 8) => "cease: out of resources",
            (6, 9) => "cease: hard reset",
            (6, _) => "cease",
            _ => "unknown error",
        };
        format!("{what} ({}/{})", self.code, self.subcode)
    }
}

/// A message that cannot be accepted: send `notification` and close the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub notification: Notification,
    pub reason: String,
}

fn err(code: u8, subcode: u8, data: &[u8], reason: impl Into<String>) -> DecodeError {
    DecodeError {
        notification: Notification::new(code, subcode, data.to_vec()),
        reason: reason.into(),
    }
}

/// Session parameters that change how messages are read and written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Context {
    /// Both sides sent the 4-octet AS capability: AS_PATH carries 4-octet numbers.
    pub four_octet_as: bool,
    /// ADD-PATH (RFC 7911): the families whose NLRI we read carry path identifiers.
    pub add_path_rx: Families,
    /// The families whose NLRI we write carry path identifiers.
    pub add_path_tx: Families,
}

impl Context {
    /// 2-octet AS, no ADD-PATH: a session before its OPENs are exchanged.
    pub const PLAIN: Context = Context {
        four_octet_as: false,
        add_path_rx: Families::NONE,
        add_path_tx: Families::NONE,
    };

    /// A session whose peer agreed to all we offer: 4-octet AS, ADD-PATH both ways, both
    /// families.
    pub const ALL: Context = Context {
        four_octet_as: true,
        add_path_rx: Families::BOTH,
        add_path_tx: Families::BOTH,
    };
}

/// A flag per address family (IPv4 unicast, IPv6 unicast).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Families {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Families {
    pub const NONE: Families = Families {
        ipv4: false,
        ipv6: false,
    };

    pub const BOTH: Families = Families {
        ipv4: true,
        ipv6: true,
    };

    pub fn has(&self, v6: bool) -> bool {
        if v6 {
            self.ipv6
        } else {
            self.ipv4
        }
    }
}

/// Length of the message at the start of `buf`, once its header is there. Checks the marker
/// and length (RFC 4271 §6.1), so a stream reader can frame before decoding.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return Err(err(1, 1, &[], "marker is not all ones"));
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
    if !(HEADER_LEN..=MAX_LEN).contains(&len) {
        return Err(err(
            1,
            2,
            &buf[16..18],
            format!("message length {len} outside 19..=4096"),
        ));
    }
    Ok(Some(len))
}

/// Decode one whole message (as framed by [`frame_len`]).
pub fn decode(msg: &[u8], ctx: Context) -> Result<Message, DecodeError> {
    let len = frame_len(msg)?.ok_or_else(|| err(1, 2, &[], "truncated header"))?;
    if len != msg.len() {
        return Err(err(
            1,
            2,
            &msg[16..18],
            "length field does not match the message",
        ));
    }
    let body = &msg[HEADER_LEN..];
    let bad_len = || {
        err(
            1,
            2,
            &msg[16..18],
            format!("bad length {len} for message type {}", msg[18]),
        )
    };
    match msg[18] {
        OPEN => decode_open(body).map(Message::Open),
        UPDATE => {
            if len < 23 {
                return Err(bad_len());
            }
            decode_update(body, ctx).map(Message::Update)
        }
        NOTIFICATION => {
            if len < 21 {
                return Err(bad_len());
            }
            Ok(Message::Notification(Notification::new(
                body[0],
                body[1],
                body[2..].to_vec(),
            )))
        }
        KEEPALIVE => {
            if len != HEADER_LEN {
                return Err(bad_len());
            }
            Ok(Message::Keepalive)
        }
        ROUTE_REFRESH => {
            if len != 23 {
                return Err(bad_len());
            }
            Ok(Message::RouteRefresh {
                afi: u16::from_be_bytes([body[0], body[1]]),
                safi: body[3],
            })
        }
        t => Err(err(1, 3, &[t], format!("unknown message type {t}"))),
    }
}

fn decode_open(b: &[u8]) -> Result<Open, DecodeError> {
    if b.len() < 10 {
        return Err(err(1, 2, &[], "OPEN shorter than 29 bytes"));
    }
    if b[0] != 4 {
        return Err(err(2, 1, &[0, 4], format!("BGP version {} (only 4)", b[0])));
    }
    let my_as = u16::from_be_bytes([b[1], b[2]]);
    let hold_time = u16::from_be_bytes([b[3], b[4]]);
    if hold_time == 1 || hold_time == 2 {
        return Err(err(2, 6, &[], format!("hold time {hold_time}")));
    }
    let bgp_id = Ipv4Addr::new(b[5], b[6], b[7], b[8]);
    if bgp_id.is_unspecified() || bgp_id.is_multicast() || bgp_id.is_broadcast() {
        return Err(err(2, 3, &[], format!("BGP identifier {bgp_id}")));
    }
    let opt_len = b[9] as usize;
    let params = b
        .get(10..10 + opt_len)
        .ok_or_else(|| err(1, 2, &[], "optional parameters overrun the OPEN"))?;
    if 10 + opt_len != b.len() {
        return Err(err(1, 2, &[], "OPEN length disagrees with its parameters"));
    }
    let mut caps = Vec::new();
    let mut p = params;
    while !p.is_empty() {
        if p.len() < 2 {
            return Err(err(2, 0, &[], "truncated optional parameter"));
        }
        let (ptype, plen) = (p[0], p[1] as usize);
        let value = p
            .get(2..2 + plen)
            .ok_or_else(|| err(2, 0, &[], "optional parameter overruns"))?;
        if ptype != 2 {
            return Err(err(
                2,
                4,
                &[],
                format!("unsupported optional parameter {ptype}"),
            ));
        }
        decode_capabilities(value, &mut caps)?;
        p = &p[2 + plen..];
    }
    let asn = caps
        .iter()
        .find_map(|c| match c {
            Capability::FourOctetAs(a) => Some(*a),
            _ => None,
        })
        .unwrap_or(my_as as u32);
    Ok(Open {
        asn,
        hold_time,
        bgp_id,
        capabilities: caps,
    })
}

fn decode_capabilities(mut v: &[u8], caps: &mut Vec<Capability>) -> Result<(), DecodeError> {
    while !v.is_empty() {
        if v.len() < 2 {
            return Err(err(2, 0, &[], "truncated capability"));
        }
        let (code, len) = (v[0], v[1] as usize);
        let value = v
            .get(2..2 + len)
            .ok_or_else(|| err(2, 0, &[], "capability overruns its parameter"))?;
        let bad = || err(2, 0, &[], format!("capability {code} has bad length {len}"));
        caps.push(match code {
            1 => {
                if len != 4 {
                    return Err(bad());
                }
                Capability::Multiprotocol {
                    afi: u16::from_be_bytes([value[0], value[1]]),
                    safi: value[3],
                }
            }
            2 => Capability::RouteRefresh,
            64 => {
                if len < 2 || (len - 2) % 4 != 0 {
                    return Err(bad());
                }
                let word = u16::from_be_bytes([value[0], value[1]]);
                Capability::GracefulRestart {
                    restarting: word & 0x8000 != 0,
                    time: word & 0x0fff,
                    families: value[2..]
                        .chunks(4)
                        .map(|c| (u16::from_be_bytes([c[0], c[1]]), c[2], c[3] & 0x80 != 0))
                        .collect(),
                }
            }
            65 => {
                if len != 4 {
                    return Err(bad());
                }
                Capability::FourOctetAs(u32::from_be_bytes([
                    value[0], value[1], value[2], value[3],
                ]))
            }
            69 => {
                if len % 4 != 0 {
                    return Err(bad());
                }
                Capability::AddPath(
                    value
                        .chunks(4)
                        .map(|c| (u16::from_be_bytes([c[0], c[1]]), c[2], c[3]))
                        .collect(),
                )
            }
            _ => Capability::Unknown {
                code,
                value: value.to_vec(),
            },
        });
        v = &v[2 + len..];
    }
    Ok(())
}

/// Prefixes in the RFC 4271 NLRI encoding: length in bits, then the significant octets.
/// NLRI of one family; with `add_path`, each prefix follows its 4-octet path identifier.
fn decode_prefixes(mut b: &[u8], v6: bool, add_path: bool) -> Result<Vec<Nlri>, String> {
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

fn decode_update(b: &[u8], ctx: Context) -> Result<Update, DecodeError> {
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
                        a.next_hop.get_or_insert(IpAddr::V4(nh));
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
                if let Some(nh) = nh {
                    a.next_hop = Some(nh);
                }
                u.announced.extend(nlri);
            }
            MP_UNREACH => {
                let nlri = decode_mp_unreach(value, ctx.add_path_rx)
                    .map_err(|e| malformed(format!("MP_UNREACH_NLRI: {e}")))?;
                u.withdrawn.extend(nlri);
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

fn decode_as_path(mut v: &[u8], four: bool) -> Result<Vec<AsSegment>, String> {
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

fn afi_is_v6(afi: u16, safi: u8) -> Result<bool, String> {
    match (afi, safi) {
        (AFI_IPV4, SAFI_UNICAST) => Ok(false),
        (AFI_IPV6, SAFI_UNICAST) => Ok(true),
        _ => Err(format!("unsupported AFI/SAFI {afi}/{safi}")),
    }
}

fn decode_mp_reach(v: &[u8], rx: Families) -> Result<(Option<IpAddr>, Vec<Nlri>), String> {
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

fn decode_mp_unreach(v: &[u8], rx: Families) -> Result<Vec<Nlri>, String> {
    if v.len() < 3 {
        return Err("too short".into());
    }
    let v6 = afi_is_v6(u16::from_be_bytes([v[0], v[1]]), v[2])?;
    decode_prefixes(&v[3..], v6, rx.has(v6))
}

// ---------------------------------------------------------------------------------- encode

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_be_bytes());
    m.push(kind);
    m.extend_from_slice(body);
    m
}

/// Encode one message. UPDATEs must fit in 4096 bytes: see [`encode_updates`] for splitting.
pub fn encode(msg: &Message, ctx: Context) -> Vec<u8> {
    match msg {
        Message::Keepalive => frame(KEEPALIVE, &[]),
        Message::Notification(n) => {
            let mut b = vec![n.code, n.subcode];
            b.extend_from_slice(&n.data);
            frame(NOTIFICATION, &b)
        }
        Message::RouteRefresh { afi, safi } => {
            let mut b = afi.to_be_bytes().to_vec();
            b.extend_from_slice(&[0, *safi]);
            frame(ROUTE_REFRESH, &b)
        }
        Message::Open(o) => frame(OPEN, &encode_open(o)),
        Message::Update(u) => frame(UPDATE, &encode_update(u, ctx)),
    }
}

fn encode_open(o: &Open) -> Vec<u8> {
    let mut caps = Vec::new();
    for c in &o.capabilities {
        let (code, value): (u8, Vec<u8>) = match c {
            Capability::Multiprotocol { afi, safi } => {
                (1, vec![(afi >> 8) as u8, *afi as u8, 0, *safi])
            }
            Capability::RouteRefresh => (2, vec![]),
            Capability::GracefulRestart {
                restarting,
                time,
                families,
            } => {
                let word = (*time & 0x0fff) | if *restarting { 0x8000 } else { 0 };
                let mut v = word.to_be_bytes().to_vec();
                for (afi, safi, fwd) in families {
                    v.extend_from_slice(&afi.to_be_bytes());
                    v.extend_from_slice(&[*safi, if *fwd { 0x80 } else { 0 }]);
                }
                (64, v)
            }
            Capability::FourOctetAs(a) => (65, a.to_be_bytes().to_vec()),
            Capability::AddPath(v) => (
                69,
                v.iter()
                    .flat_map(|(afi, safi, sr)| [(afi >> 8) as u8, *afi as u8, *safi, *sr])
                    .collect(),
            ),
            Capability::Unknown { code, value } => (*code, value.clone()),
        };
        caps.push(code);
        caps.push(value.len() as u8);
        caps.extend_from_slice(&value);
    }
    let my_as = if o.asn > u16::MAX as u32 {
        AS_TRANS
    } else {
        o.asn as u16
    };
    let mut b = vec![4];
    b.extend_from_slice(&my_as.to_be_bytes());
    b.extend_from_slice(&o.hold_time.to_be_bytes());
    b.extend_from_slice(&o.bgp_id.octets());
    if caps.is_empty() {
        b.push(0);
    } else {
        b.push((caps.len() + 2) as u8);
        b.push(2);
        b.push(caps.len() as u8);
        b.extend_from_slice(&caps);
    }
    b
}

fn encode_prefix(out: &mut Vec<u8>, nlri: &Nlri, tx: Families) {
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

fn attr(out: &mut Vec<u8>, flags: u8, code: u8, value: &[u8]) {
    if value.len() > 255 {
        out.extend_from_slice(&[flags | EXTENDED, code]);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[flags & !EXTENDED, code, value.len() as u8]);
    }
    out.extend_from_slice(value);
}

fn encode_update(u: &Update, ctx: Context) -> Vec<u8> {
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
            match a.next_hop {
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

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: Context = Context {
        four_octet_as: true,
        ..Context::PLAIN
    };

    #[test]
    fn add_path_nlri_carry_a_path_identifier_before_each_prefix() {
        let u = Update {
            announced: vec![
                Nlri {
                    prefix: net("10.12.0.0/16"),
                    path_id: 7,
                },
                Nlri {
                    prefix: net("10.12.0.0/16"),
                    path_id: 9,
                },
            ],
            attributes: Some(ibgp_attrs("10.10.0.1")),
            ..Default::default()
        };
        let m = encode(&Message::Update(u.clone()), Context::ALL);
        // The NLRI field ends the message: id 7, /16, 10.12; id 9, /16, 10.12.
        assert_eq!(
            &m[m.len() - 14..],
            &[0, 0, 0, 7, 16, 10, 12, 0, 0, 0, 9, 16, 10, 12]
        );
        assert_eq!(decode(&m, Context::ALL).unwrap(), Message::Update(u));
    }

    #[test]
    fn add_path_ipv6_nlri_and_withdrawals_round_trip_in_mp_attributes() {
        let u = Update {
            announced: vec![Nlri {
                prefix: net("2001:db8:200::/64"),
                path_id: 3,
            }],
            // IPv4 withdrawals come first on the wire, then MP_UNREACH_NLRI.
            withdrawn: vec![
                Nlri {
                    prefix: net("10.1.0.0/16"),
                    path_id: 5,
                },
                Nlri {
                    prefix: net("2001:db8:1::/48"),
                    path_id: 4,
                },
            ],
            attributes: Some(ibgp_attrs("2001:db8::1")),
            ..Default::default()
        };
        let m = encode(&Message::Update(u.clone()), Context::ALL);
        assert_eq!(decode(&m, Context::ALL).unwrap(), Message::Update(u));
    }

    #[test]
    fn add_path_nlri_read_on_a_session_without_add_path_are_an_invalid_network_field() {
        let u = Update {
            announced: vec![Nlri {
                prefix: net("10.12.0.0/16"),
                path_id: 0x0a0b_0c0d,
            }],
            attributes: Some(ibgp_attrs("10.10.0.1")),
            ..Default::default()
        };
        let m = encode(&Message::Update(u), Context::ALL);
        // Read as plain NLRI, 0a 0b 0c 0d 10 0a 0c is 11.0.0.0/10, 16.8.0.0/13, then a /12
        // with no octets left: the prefix overruns the field (RFC 4271: invalid network field).
        let e = decode(&m, CTX).unwrap_err();
        assert_eq!((e.notification.code, e.notification.subcode), (3, 10));
        assert!(e.reason.contains("overruns"), "{}", e.reason);
    }

    #[test]
    fn a_path_identifier_with_no_prefix_after_it_is_an_invalid_network_field() {
        let mut m = encode(
            &Message::Update(Update {
                attributes: Some(ibgp_attrs("10.10.0.1")),
                announced: vec![nlri("10.12.0.0/16")],
                ..Default::default()
            }),
            CTX,
        );
        // Replace the plain NLRI (3 octets) by a lone 4-octet path identifier.
        m.truncate(m.len() - 3);
        m.extend_from_slice(&[0, 0, 0, 1]);
        let len = m.len() as u16;
        m[16..18].copy_from_slice(&len.to_be_bytes());
        let e = decode(&m, Context::ALL).unwrap_err();
        assert_eq!((e.notification.code, e.notification.subcode), (3, 10));
        assert!(e.reason.contains("path identifier"), "{}", e.reason);
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn nlri(s: &str) -> Nlri {
        net(s).into()
    }

    fn ibgp_attrs(nh: &str) -> Attributes {
        Attributes {
            next_hop: Some(nh.parse().unwrap()),
            local_pref: Some(100),
            ..Default::default()
        }
    }

    fn roundtrip(m: &Message) {
        let bytes = encode(m, CTX);
        assert_eq!(&decode(&bytes, CTX).unwrap(), m, "{bytes:02x?}");
    }

    #[test]
    fn every_message_type_round_trips() {
        roundtrip(&Message::Keepalive);
        roundtrip(&Message::Notification(Notification::cease(2)));
        roundtrip(&Message::RouteRefresh {
            afi: AFI_IPV6,
            safi: SAFI_UNICAST,
        });
        roundtrip(&Message::Open(Open {
            asn: 4_200_000_001,
            hold_time: 90,
            bgp_id: "10.10.0.2".parse().unwrap(),
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                },
                Capability::Multiprotocol {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                },
                Capability::RouteRefresh,
                Capability::GracefulRestart {
                    restarting: true,
                    time: 120,
                    families: vec![(AFI_IPV4, SAFI_UNICAST, true)],
                },
                Capability::FourOctetAs(4_200_000_001),
                Capability::AddPath(vec![(AFI_IPV4, SAFI_UNICAST, 3)]),
            ],
        }));
        let mut a = ibgp_attrs("10.10.0.2");
        a.originator_id = Some("10.200.0.11".parse().unwrap());
        a.cluster_list = vec!["10.10.0.2".parse().unwrap(), "10.10.0.3".parse().unwrap()];
        a.communities = vec![65010 << 16 | 7];
        a.med = Some(5);
        a.as_path = vec![AsSegment::Sequence(vec![65001, 4_200_000_001])];
        roundtrip(&Message::Update(Update {
            withdrawn: vec![nlri("10.200.0.12/32"), nlri("2001:db8:1::/48")],
            announced: vec![nlri("10.200.0.11/32"), nlri("10.200.1.0/24")],
            attributes: Some(a.clone()),
            ..Default::default()
        }));
        a.next_hop = Some("2001:db8::2".parse().unwrap());
        roundtrip(&Message::Update(Update {
            announced: vec![nlri("2001:db8:200::/64"), nlri("::/0")],
            attributes: Some(a),
            ..Default::default()
        }));
        roundtrip(&Message::Update(Update::default()));
    }

    #[test]
    fn a_four_octet_as_is_sent_as_as_trans_in_the_open_header() {
        let bytes = encode(
            &Message::Open(Open {
                asn: 4_200_000_001,
                hold_time: 90,
                bgp_id: "1.2.3.4".parse().unwrap(),
                capabilities: vec![Capability::FourOctetAs(4_200_000_001)],
            }),
            CTX,
        );
        assert_eq!(&bytes[20..22], &AS_TRANS.to_be_bytes());
    }

    fn with_attr(raw: &[u8], nlri: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 0];
        body.extend_from_slice(&(raw.len() as u16).to_be_bytes());
        body.extend_from_slice(raw);
        body.extend_from_slice(nlri);
        frame(UPDATE, &body)
    }

    const GOOD: &[u8] = &[
        0x40, 1, 1, 0, 0x40, 2, 0, 0x40, 3, 4, 10, 10, 0, 2, 0x40, 5, 4, 0, 0, 0, 100,
    ];
    const NLRI: &[u8] = &[32, 10, 200, 0, 11];

    #[test]
    fn a_well_formed_update_is_accepted() {
        let Message::Update(u) = decode(&with_attr(GOOD, NLRI), CTX).unwrap() else {
            panic!()
        };
        assert!(!u.treat_as_withdraw, "{:?}", u.errors);
        assert_eq!(u.announced, vec![nlri("10.200.0.11/32")]);
    }

    #[test]
    fn header_errors_produce_the_rfc_notification() {
        let mut m = encode(&Message::Keepalive, CTX);
        m[3] = 0;
        assert_eq!(
            decode(&m, CTX).unwrap_err().notification,
            Notification::new(1, 1, vec![])
        );
        let mut m = encode(&Message::Keepalive, CTX);
        m[17] = 20;
        m.push(0);
        assert_eq!(
            decode(&m, CTX).unwrap_err().notification.subcode,
            2,
            "KEEPALIVE with a body"
        );
        let mut m = encode(&Message::Keepalive, CTX);
        m[18] = 9;
        assert_eq!(
            decode(&m, CTX).unwrap_err().notification,
            Notification::new(1, 3, vec![9])
        );
        let mut m = encode(&Message::Keepalive, CTX);
        m[16] = 0x20;
        assert_eq!(
            frame_len(&m).unwrap_err().notification.subcode,
            2,
            "length over 4096"
        );
    }

    #[test]
    fn open_errors_produce_the_rfc_notification() {
        let good = encode(
            &Message::Open(Open {
                asn: 65010,
                hold_time: 90,
                bgp_id: "1.2.3.4".parse().unwrap(),
                capabilities: vec![],
            }),
            CTX,
        );
        let mut v = good.clone();
        v[19] = 3;
        assert_eq!(decode(&v, CTX).unwrap_err().notification.code, 2);
        assert_eq!(decode(&v, CTX).unwrap_err().notification.subcode, 1);
        let mut h = good.clone();
        h[23] = 1;
        h[22] = 0;
        assert_eq!(
            decode(&h, CTX).unwrap_err().notification.subcode,
            6,
            "hold time 1"
        );
        let mut id = good;
        id[24..28].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            decode(&id, CTX).unwrap_err().notification.subcode,
            3,
            "BGP identifier 0.0.0.0"
        );
    }

    fn withdraws(raw: &[u8]) -> Update {
        let Message::Update(u) = decode(&with_attr(raw, NLRI), CTX).unwrap() else {
            panic!()
        };
        assert!(
            u.treat_as_withdraw,
            "expected treat-as-withdraw for {raw:02x?}"
        );
        assert_eq!(u.effective_withdrawn(), vec![nlri("10.200.0.11/32")]);
        u
    }

    #[test]
    fn malformed_well_known_attributes_are_treated_as_withdraw() {
        // ORIGIN with the optional bit set (flags error), ORIGIN value 7, NEXT_HOP length 3.
        let mut bad_flags = GOOD.to_vec();
        bad_flags[0] = 0xc0;
        withdraws(&bad_flags);
        let mut bad_origin = GOOD.to_vec();
        bad_origin[3] = 7;
        withdraws(&bad_origin);
        let bad_nh = [&GOOD[..7], &[0x40, 3, 3, 10, 10, 0], &GOOD[14..]].concat();
        withdraws(&bad_nh);
        // AS_PATH with segment type 9, and a segment that overruns.
        let bad_path = [
            &GOOD[..4],
            &[0x40, 2, 6, 9, 1, 0, 0, 0xfd, 0xf2],
            &GOOD[7..],
        ]
        .concat();
        let u = withdraws(&bad_path);
        assert!(u.errors[0].contains("AS_PATH"), "{:?}", u.errors);
        let overrun_path = [
            &GOOD[..4],
            &[0x40, 2, 6, 2, 5, 0, 0, 0xfd, 0xf2],
            &GOOD[7..],
        ]
        .concat();
        withdraws(&overrun_path);
        // Missing NEXT_HOP for IPv4 NLRI, and an attribute that overruns the list.
        let no_nh = [&GOOD[..7], &GOOD[14..]].concat();
        withdraws(&no_nh);
        let overrun = [GOOD, &[0x80, 4, 9, 0, 0]].concat();
        withdraws(&overrun);
        // A malformed CLUSTER_LIST (RFC 7606 §7.10).
        withdraws(&[GOOD, &[0x80, 10, 3, 1, 2, 3]].concat());
    }

    #[test]
    fn structural_update_errors_reset_the_session() {
        // Withdrawn length overruns the message.
        let m = frame(UPDATE, &[0, 50, 0, 0]);
        assert_eq!(
            decode(&m, CTX).unwrap_err().notification,
            Notification::new(3, 1, vec![])
        );
        // Total attribute length overruns the message.
        let m = frame(UPDATE, &[0, 0, 0, 40, 0x40, 1, 1, 0]);
        assert_eq!(decode(&m, CTX).unwrap_err().notification.subcode, 1);
        // Unrecognized well-known attribute.
        let m = with_attr(&[GOOD, &[0x40, 99, 1, 0]].concat(), NLRI);
        assert_eq!(decode(&m, CTX).unwrap_err().notification.subcode, 2);
        // Malformed MP_REACH_NLRI (next hop length 5) hides its NLRI.
        let m = with_attr(&[GOOD, &[0x80, 14, 6, 0, 2, 1, 5, 0, 0]].concat(), &[]);
        assert_eq!(decode(&m, CTX).unwrap_err().notification.subcode, 1);
        // An NLRI prefix longer than 32 bits.
        let m = with_attr(GOOD, &[33, 10, 200, 0, 11, 0]);
        assert_eq!(decode(&m, CTX).unwrap_err().notification.subcode, 10);
    }

    #[test]
    fn duplicate_and_unknown_optional_attributes_are_tolerated() {
        let dup = [GOOD, &[0x40, 5, 4, 0, 0, 0, 200]].concat();
        let Message::Update(u) = decode(&with_attr(&dup, NLRI), CTX).unwrap() else {
            panic!()
        };
        assert!(!u.treat_as_withdraw);
        assert_eq!(
            u.attributes.unwrap().local_pref,
            Some(100),
            "the first one counts"
        );
        let unknown = [GOOD, &[0xc0, 200, 2, 1, 2]].concat();
        let Message::Update(u) = decode(&with_attr(&unknown, NLRI), CTX).unwrap() else {
            panic!()
        };
        let a = u.attributes.unwrap();
        assert_eq!(
            a.unknown[0].flags,
            0xc0 | PARTIAL,
            "passed on with the Partial bit"
        );
    }

    #[test]
    fn decoding_never_panics_on_truncations_of_valid_messages() {
        let mut a = ibgp_attrs("10.10.0.2");
        a.cluster_list = vec!["1.1.1.1".parse().unwrap()];
        let m = encode(
            &Message::Update(Update {
                announced: vec![nlri("10.200.0.0/24"), nlri("2001:db8::/32")],
                withdrawn: vec![nlri("10.1.0.0/16")],
                attributes: Some(a),
                ..Default::default()
            }),
            CTX,
        );
        for cut in 0..m.len() {
            let mut t = m[..cut].to_vec();
            if t.len() >= 18 {
                t[16..18].copy_from_slice(&(cut as u16).to_be_bytes());
            }
            let _ = decode(&t, CTX);
        }
        for i in HEADER_LEN..m.len() {
            for bit in 0..8 {
                let mut t = m.clone();
                t[i] ^= 1 << bit;
                let _ = decode(&t, CTX);
            }
        }
    }
}
