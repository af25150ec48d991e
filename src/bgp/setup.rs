//! Which sessions a speaker runs and under which policy: plain data, derived from the site
//! file by [`crate::intent::bgp`] and run by [`super::speaker`].

use super::rib::RibPeer;
use super::router::Learn;
use super::wire::Attributes;
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The BGP port (RFC 4271).
pub const PORT: u16 = 179;

#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    pub peer: RibPeer,
    pub address: IpAddr,
    /// We open the connection (nodes towards gateways, gateways towards the site router).
    pub active: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpeakerConfig {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// Source address for outgoing sessions.
    pub local_address: IpAddr,
    /// Where to accept sessions (None: active only).
    pub listen: Option<SocketAddr>,
    pub hold_time: u16,
    pub restart_time: u16,
    pub peers: Vec<PeerConfig>,
    /// Routes this speaker originates (a node's own prefixes).
    pub originate: Vec<(IpNet, Attributes)>,
    /// Reflect client routes to other clients (see `Rib::client_to_client`).
    pub client_to_client: bool,
    /// Whose paths the host routes by.
    pub learn: Learn,
    /// A drained gateway: it announces nothing (sessions stay up; see `Router::drain`).
    pub drained: bool,
}
