//! A node's import policy: which prefixes learned from its gateways it routes into the tunnels.
//! Pure. The rule (README, "What a node accepts"):
//!
//! 1. nothing that overlaps the node's own prefixes (its traffic to itself stays local);
//! 2. nothing that covers a gateway endpoint or a relay address (the tunnels' own UDP would be
//!    routed into the tunnels);
//! 3. nothing that overlaps link-local (169.254.0.0/16, where the metadata service lives, and
//!    fe80::/10), loopback or multicast — a default route overlaps all of them;
//! 4. nothing inside (or equal to) one of the node's underlay networks, as observed on its own
//!    interfaces (DHCP or static): a more specific route would take the node's underlay
//!    traffic into the tunnels. A learned prefix that merely covers an underlay network is
//!    accepted: the connected route stays more specific.
//! 5. a prefix the config already routes (a site prefix, the cloud block, a gateway's site
//!    address) keeps its static route; that is not a refusal.
//!
//! Rules 1–3 need only the config ([`static_deny`]); the BGP speaker rejects those prefixes on
//! arrival, and [`refusal`] applies all four whenever the host intent is derived.

use crate::model::config::{Config, Node};
use ipnet::IpNet;

/// Ranges no learned route may overlap, with why.
const RESERVED: &[(&str, &str)] = &[
    (
        "169.254.0.0/16",
        "link-local (the cloud's metadata service lives there)",
    ),
    ("127.0.0.0/8", "loopback"),
    ("224.0.0.0/4", "multicast"),
    ("fe80::/10", "link-local"),
    ("::1/128", "loopback"),
    ("ff00::/8", "multicast"),
];

/// Rules 1–3: what the node's BGP sessions with its gateways must reject, with the reason.
pub fn denied(cfg: &Config, node: &Node) -> Vec<(IpNet, String)> {
    let mut v: Vec<(IpNet, String)> = Vec::new();
    for g in &cfg.gateways {
        v.push((
            IpNet::from(g.endpoint),
            format!("covers {}, the endpoint of gateway {}", g.endpoint, g.name),
        ));
    }
    v.extend(
        node.prefixes
            .iter()
            .map(|p| (*p, format!("overlaps {p}, a prefix of this node"))),
    );
    for r in &cfg.relays {
        for a in std::iter::once(r.public_address).chain(r.private_address) {
            v.push((
                IpNet::from(a),
                format!("covers {a}, an address of relay {}", r.name),
            ));
        }
    }
    for (net, what) in RESERVED {
        let net: IpNet = net.parse().expect("a valid constant");
        v.push((net, format!("overlaps {net}, {what}")));
    }
    v
}

/// The prefixes of [`denied`], for the speaker's policy (it rejects any overlap).
pub fn static_deny(cfg: &Config, node: &Node) -> Vec<IpNet> {
    denied(cfg, node).into_iter().map(|(p, _)| p).collect()
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// Why node `node` must not route learned `prefix` into the tunnels, or None to accept it.
pub fn refusal(cfg: &Config, node: &Node, underlay: &[IpNet], prefix: &IpNet) -> Option<String> {
    if let Some((_, why)) = denied(cfg, node)
        .into_iter()
        .find(|(d, _)| overlaps(d, prefix))
    {
        return Some(why);
    }
    underlay
        .iter()
        .find(|u| u.contains(prefix))
        .map(|u| format!("inside {u}, this node's underlay network"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        crate::model::config::parse(
            "t.kdl",
            include_str!("../../tests/golden/two-gateways/config.kdl"),
        )
        .unwrap()
    }

    fn why(prefix: &str, underlay: &[&str]) -> Option<String> {
        let cfg = cfg();
        let node = cfg.nodes.iter().find(|n| n.name == "c1").unwrap();
        let underlay: Vec<IpNet> = underlay.iter().map(|u| u.parse().unwrap()).collect();
        refusal(&cfg, node, &underlay, &prefix.parse().unwrap())
    }

    #[test]
    fn a_site_prefix_outside_everything_the_node_needs_locally_is_accepted() {
        assert_eq!(why("10.12.0.0/16", &["172.16.0.0/24"]), None);
        assert_eq!(why("2001:db8:12::/48", &[]), None);
    }

    #[test]
    fn a_default_route_is_refused_because_it_covers_the_gateway_endpoints() {
        let w = why("0.0.0.0/0", &[]).unwrap();
        assert!(w.contains("endpoint of gateway gw1"), "{w}");
        assert!(why("::/0", &[]).unwrap().contains("link-local"));
    }

    #[test]
    fn link_local_and_the_metadata_address_never_enter_the_tunnels() {
        for p in [
            "169.254.169.254/32",
            "169.254.0.0/16",
            "169.0.0.0/8",
            "fe80::/64",
        ] {
            let w = why(p, &[]).unwrap_or_else(|| panic!("{p} accepted"));
            assert!(w.contains("link-local"), "{p}: {w}");
        }
        assert!(why("224.0.0.0/24", &[]).unwrap().contains("multicast"));
        assert!(why("127.0.0.0/8", &[]).unwrap().contains("loopback"));
    }

    #[test]
    fn a_prefix_inside_the_underlay_network_is_refused_but_one_covering_it_is_not() {
        let w = why("172.16.0.128/25", &["172.16.0.0/24"]).unwrap();
        assert!(w.contains("underlay network"), "{w}");
        assert!(why("172.16.0.0/24", &["172.16.0.0/24"]).is_some());
        assert_eq!(why("172.16.0.0/16", &["172.16.0.0/24"]), None);
    }

    #[test]
    fn the_nodes_own_prefix_is_refused() {
        let w = why("10.200.0.11/32", &[]).unwrap();
        assert!(w.contains("a prefix of this node"), "{w}");
    }
}
