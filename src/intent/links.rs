//! The datapath's view of a host's tunnels: one [`LinkSpec`] per tun device, built by
//! [`crate::intent::derive`] from the same per-peer prefixes as the kernel routes. Pure data.
//!
//! A link is one UDP 5-tuple and one tun device:
//! - gateway: link i is device `ap-l{i}` listening on `base-port + i`, shared by every node;
//!   its peers are all nodes, their endpoints learned from handshakes (nodes may sit behind
//!   NAT), and each node's prefixes route to it inside the device.
//! - node: link (g, i) is device `ap-{g}-{i}` on an ephemeral local port, with one peer: gateway
//!   g at `endpoint:base-port + i`. The node initiates.
//!
//! `allowed` is what a peer may send from (cryptokey routing: a packet whose inner source is
//! outside it is dropped and counted); `routes` is what is sent to it inside the device.

use crate::model::key::PublicKey;
use ipnet::IpNet;
use serde::Serialize;
use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkSpec {
    /// tun device name.
    pub dev: String,
    /// Link index (0..links).
    pub index: u32,
    /// UDP port to bind; None for an ephemeral port.
    pub listen_port: Option<u16>,
    /// The underlay is IPv6 (the gateway's endpoint is an IPv6 address).
    pub v6_underlay: bool,
    /// Clamp the MSS of TCP SYNs in both directions to what this tunnel MTU carries; None:
    /// clamping is off (`clamp-mss #false`).
    pub clamp_mtu: Option<u32>,
    /// The site's keepalive interval: a roaming peer heard within two of them holds its
    /// endpoint, and a handshake for it from elsewhere is refused (a second instance).
    pub keepalive_ms: u32,
    /// This host is a drained gateway: its probes say so (nodes then route around it).
    pub draining: bool,
    pub peers: Vec<PeerSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerSpec {
    /// Host name of the peer (node on a gateway, gateway on a node).
    pub name: String,
    pub public_key: PublicKey,
    /// The peer's next key while it rotates (`next-public-key`): handshakes signed with
    /// either are taken, each on its own session.
    pub next_key: Option<PublicKey>,
    /// Where to send; None until the peer's first handshake tells us (gateways).
    pub endpoint: Option<SocketAddr>,
    /// Inner source prefixes accepted from this peer.
    pub allowed: Vec<IpNet>,
    /// Inner destination prefixes sent to this peer on this device.
    pub routes: Vec<IpNet>,
    /// On a gateway: the site file drains this node; the probes ask it to drain.
    pub drain: bool,
}

impl PeerSpec {
    /// The keys this peer may handshake with: its current one, then its next one.
    pub fn keys(&self) -> impl Iterator<Item = PublicKey> + '_ {
        std::iter::once(self.public_key).chain(self.next_key)
    }
}
