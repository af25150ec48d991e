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

mod notification;
mod open;
mod update;

pub use notification::*;
pub use open::*;
pub use update::*;

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
const EXTENDED_COMMUNITIES: u8 = 16;
const AS4_PATH: u8 = 17;
const LARGE_COMMUNITY: u8 = 32;

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

#[cfg(test)]
mod tests;
