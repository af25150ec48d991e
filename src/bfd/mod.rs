//! Bidirectional Forwarding Detection (RFC 5880, single hop per RFC 5881), asynchronous mode,
//! without authentication: the Control packet codec ([`packet`]) and the per-session state
//! machine ([`session`]), both pure; and the socket edge ([`driver`]). A gateway runs a session with each site router and with
//! the other gateways; a session that goes down takes its BGP session down with it.

pub mod driver;
pub mod packet;
pub mod session;

/// UDP destination port of single-hop Control packets (RFC 5881 §4).
pub const PORT: u16 = 3784;
/// Single-hop packets are sent with TTL (hop limit) 255 and accepted only with 255 (§5).
pub const TTL: u8 = 255;
