//! The iBGP sessions a host runs, derived from the site file. Pure.
//!
//! - gateway: route reflector (router ID = cluster ID = its IPv4 site address); the site
//!   routers are non-clients with next-hop-self that may not announce the cloud block; the
//!   other gateways are non-clients (the lower router ID dials); every node is a client,
//!   accepted only from its cloud address and only inside its assignment.
//! - node: one session to every gateway's site address, dialled from the node address over
//!   the tunnels, announcing the node's prefixes; none when `bgp-speaker "external"`.
//! - relay: none.

use crate::bgp::rib::{Neighbor, PeerKind, Policy};
use crate::bgp::router::Learn;
use crate::bgp::setup::{PeerConfig, SpeakerConfig, PORT};
use crate::bgp::wire::Attributes;
use crate::intent::import;
use crate::model::config::{BgpSpeaker, Config, Gateway};

/// Graceful-restart time we announce (RFC 4724), seconds.
pub const RESTART_TIME: u16 = 120;

/// The iBGP sessions of this host, from the config: gateways reflect for the nodes and peer
/// with the site routers (next-hop-self, never accepting the cloud block) and with each other;
/// nodes peer with every gateway over the tunnels and announce their own prefixes.
pub fn sessions(cfg: &Config, host: &str) -> Result<Option<SpeakerConfig>, String> {
    let v4 = |a: std::net::IpAddr, what: &str| match a {
        std::net::IpAddr::V4(v) => Ok(v),
        _ => Err(format!("{what} {a} must be IPv4 to serve as BGP router ID")),
    };
    let policy =
        |allow: Vec<ipnet::IpNet>, deny: Vec<ipnet::IpNet>, nhs: Option<&Gateway>| Policy {
            allow,
            deny,
            max_prefix: cfg.bgp.max_prefix,
            next_hop_self: nhs.map(|g| g.site_address),
            next_hop_self_v6: nhs.and_then(|g| g.site_address_v6),
        };
    let peer = |name: &str, kind, policy, address, active| PeerConfig {
        peer: Neighbor {
            name: name.to_string(),
            kind,
            policy,
            router_id: None,
        },
        address,
        active,
    };
    if let Some(g) = cfg.gateways.iter().find(|g| g.name == host) {
        let id = v4(g.site_address, "gateway site address")?;
        let mut peers = Vec::new();
        for n in &cfg.bgp.neighbors {
            peers.push(peer(
                &n.name,
                PeerKind::NonClient,
                policy(vec![], cfg.site.cloud_blocks.clone(), Some(g)),
                n.address,
                true,
            ));
        }
        for o in cfg.gateways.iter().filter(|o| o.name != g.name) {
            let active = u32::from(id) < u32::from(v4(o.site_address, "gateway site address")?);
            peers.push(peer(
                &o.name,
                PeerKind::NonClient,
                policy(vec![], vec![], None),
                o.site_address,
                active,
            ));
        }
        for n in &cfg.nodes {
            peers.push(peer(
                &n.name,
                PeerKind::Client,
                policy(n.prefixes.clone(), vec![], None),
                n.address,
                false,
            ));
        }
        return Ok(Some(SpeakerConfig {
            local_as: cfg.site.asn,
            router_id: id,
            local_address: g.site_address,
            listen: Some(std::net::SocketAddr::new(
                std::net::Ipv4Addr::UNSPECIFIED.into(),
                PORT,
            )),
            hold_time: cfg.bgp.hold_time,
            restart_time: RESTART_TIME,
            peers,
            originate: Vec::new(),
            client_to_client: false,
            learn: Learn::FromClients,
        }));
    }
    if let Some(n) = cfg.nodes.iter().find(|n| n.name == host) {
        if n.bgp_speaker == BgpSpeaker::External {
            return Ok(None);
        }
        let id = v4(n.address, "node address")?;
        let peers = cfg
            .gateways
            .iter()
            .map(|g| {
                peer(
                    &g.name,
                    PeerKind::NonClient,
                    // The static half of the node's import policy (see `import`).
                    policy(vec![], import::static_deny(cfg, n), None),
                    g.site_address,
                    true,
                )
            })
            .collect();
        let own = Attributes {
            next_hop: Some(n.address),
            local_pref: Some(100),
            ..Default::default()
        };
        return Ok(Some(SpeakerConfig {
            local_as: cfg.site.asn,
            router_id: id,
            local_address: n.address,
            listen: None,
            hold_time: cfg.bgp.hold_time,
            restart_time: RESTART_TIME,
            peers,
            originate: n.prefixes.iter().map(|p| (*p, own.clone())).collect(),
            client_to_client: false,
            learn: Learn::FromAll,
        }));
    }
    Ok(None)
}
