//! Which tunnels a host runs, derived from the site config. Pure.
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

use crate::config::{gateway_link_name, node_link_name, Config, Role};
use crate::desired::HostError;
use crate::key::PublicKey;
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
    pub peers: Vec<PeerSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerSpec {
    /// Host name of the peer (node on a gateway, gateway on a node).
    pub name: String,
    pub public_key: PublicKey,
    /// Where to send; None until the peer's first handshake tells us (gateways).
    pub endpoint: Option<SocketAddr>,
    /// Inner source prefixes accepted from this peer.
    pub allowed: Vec<IpNet>,
    /// Inner destination prefixes sent to this peer on this device.
    pub routes: Vec<IpNet>,
}

/// The links host `name` runs, in device-name order, as the config alone sees them.
pub fn links(cfg: &Config, name: &str) -> Result<(Role, Vec<LinkSpec>), HostError> {
    links_with(cfg, name, &crate::desired::config_view(cfg, name))
}

/// The links with what iBGP taught: a gateway sends a node only its address and the assigned
/// prefixes the node announces ([`crate::desired::node_routes`]).
pub fn links_with(
    cfg: &Config,
    name: &str,
    learned: &crate::desired::Learned,
) -> Result<(Role, Vec<LinkSpec>), HostError> {
    let (role, _) = crate::desired::desired(cfg, name)?;
    let links = match role {
        Role::Gateway => {
            let me = cfg
                .gateways
                .iter()
                .find(|g| g.name == name)
                .expect("role_of found it");
            (0..cfg.site.links)
                .map(|i| LinkSpec {
                    dev: gateway_link_name(i),
                    index: i,
                    listen_port: Some(cfg.site.base_port + i as u16),
                    v6_underlay: me.endpoint.is_ipv6(),
                    peers: cfg
                        .nodes
                        .iter()
                        .map(|n| PeerSpec {
                            name: n.name.clone(),
                            public_key: n.public_key,
                            endpoint: None,
                            allowed: n.prefixes.clone(),
                            routes: crate::desired::node_routes(n, learned),
                        })
                        .collect(),
                })
                .collect()
        }
        Role::Node => {
            let mut v = Vec::new();
            for g in &cfg.gateways {
                let mut reach: Vec<IpNet> = vec![IpNet::from(g.site_address)];
                reach.extend(cfg.site.site_prefixes.iter().copied());
                reach.extend(cfg.site.cloud_blocks.iter().copied());
                for i in 0..cfg.site.links {
                    v.push(LinkSpec {
                        dev: node_link_name(&g.name, i),
                        index: i,
                        listen_port: None,
                        v6_underlay: g.endpoint.is_ipv6(),
                        peers: vec![PeerSpec {
                            name: g.name.clone(),
                            public_key: g.public_key,
                            endpoint: Some(SocketAddr::new(
                                g.endpoint,
                                cfg.site.base_port + i as u16,
                            )),
                            allowed: reach.clone(),
                            routes: reach.clone(),
                        }],
                    });
                }
            }
            v
        }
        Role::Relay => Vec::new(),
    };
    Ok((role, links))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        crate::config::parse(
            "t.kdl",
            include_str!("../tests/golden/two-gateways/config.kdl"),
        )
        .unwrap()
    }

    #[test]
    fn a_gateway_listens_on_one_port_per_link_and_knows_every_node() {
        let (_, links) = links(&cfg(), "gw1").unwrap();
        assert_eq!(links.len(), 4);
        assert_eq!(links[3].dev, "ap-l3");
        assert_eq!(links[3].listen_port, Some(51823));
        assert_eq!(links[0].peers.len(), 2);
        assert!(links[0].peers.iter().all(|p| p.endpoint.is_none()));
    }

    #[test]
    fn a_node_dials_each_gateway_on_each_link_port() {
        let (_, links) = links(&cfg(), "c1").unwrap();
        assert_eq!(links.len(), 8);
        let l = links.iter().find(|l| l.dev == "ap-gw2-1").unwrap();
        assert_eq!(
            l.peers[0].endpoint,
            Some("192.0.2.2:51821".parse().unwrap())
        );
        assert!(l.peers[0]
            .allowed
            .contains(&"10.10.0.0/16".parse().unwrap()));
    }
}
