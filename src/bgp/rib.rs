//! Adj-RIB-In, Loc-RIB with best path and multipath, route reflection (RFC 4456) and import
//! policy. Pure: updates in, changed prefixes out; [`Rib::export`] says what each peer should
//! be told about a prefix.
//!
//! Reflection rules (RFC 4456 §8): a route from a client goes to every other client and every
//! non-client; a route from a non-client goes to clients only; nothing goes back to the peer it
//! came from. A reflected route gets ORIGINATOR_ID (if absent) and our CLUSTER_ID prepended to
//! CLUSTER_LIST; a route that carries our router ID as ORIGINATOR_ID or our CLUSTER_ID in its
//! CLUSTER_LIST is a loop and is dropped on import.
//!
//! ADD-PATH (RFC 7911): a peer may announce several paths for one prefix, told apart by path
//! identifier; each is its own Adj-RIB-In entry. Each stored path also gets the identifier we
//! use when we send it on ([`Rib::export_paths`]), unique per prefix and stable while the path
//! lives.

use super::wire::{self, Attributes, Nlri, Update};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

pub type PeerId = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// A route-reflector client (a cloud node, seen from a gateway).
    Client,
    /// An ordinary iBGP peer (the site router, another gateway, a gateway seen from a node).
    NonClient,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Accept only prefixes inside one of these (empty: any).
    pub allow: Vec<IpNet>,
    /// Reject prefixes that overlap one of these.
    pub deny: Vec<IpNet>,
    /// Accepted prefixes beyond this stop the session (Cease 1).
    pub max_prefix: u32,
    /// Rewrite the next hop to this address when exporting (towards the site router, so it
    /// sees one path per gateway).
    pub next_hop_self: Option<IpAddr>,
    /// The same for IPv6 routes (a dual-stack site router needs an IPv6 next hop); None: use
    /// `next_hop_self`.
    pub next_hop_self_v6: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RibPeer {
    pub name: String,
    pub kind: PeerKind,
    pub policy: Policy,
    /// The peer's BGP identifier once the session is up.
    pub router_id: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// UPDATE messages applied.
    #[serde(default)]
    pub updates: u64,
    pub received: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub withdrawn: u64,
}

/// What applying an UPDATE did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Prefixes whose Loc-RIB entry may have changed.
    pub changed: Vec<IpNet>,
    /// Rejected announcements, with the reason.
    pub rejected: Vec<(IpNet, String)>,
    /// The peer now has more accepted prefixes than its max-prefix.
    pub max_prefix_exceeded: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// None for a locally originated route.
    pub from: Option<PeerId>,
    /// The path identifier the peer gave it (0 without ADD-PATH).
    pub rx_id: u32,
    /// The path identifier we give it towards ADD-PATH peers.
    pub tx_id: u32,
    pub attributes: Attributes,
}

/// One Adj-RIB-In entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    attributes: Attributes,
    tx_id: u32,
}

/// Locally originated routes go out as path 1; learned ones get 2, 3, … as they arrive.
const LOCAL_TX_ID: u32 = 1;

#[derive(Debug)]
pub struct Rib {
    pub local_id: Ipv4Addr,
    pub cluster_id: Ipv4Addr,
    pub peers: Vec<RibPeer>,
    pub counters: Vec<Counters>,
    adj_in: Vec<BTreeMap<Nlri, Stored>>,
    /// Per peer: routes kept after a graceful-restart drop, not yet re-announced (RFC 4724).
    stale: Vec<std::collections::BTreeSet<Nlri>>,
    /// prefix → (peer, path identifier) of the paths announced for it, so path selection does
    /// not scan every peer.
    index: BTreeMap<IpNet, std::collections::BTreeSet<(PeerId, u32)>>,
    /// The next path identifier to hand out (wraps after 2^32 paths, skipping 0 and 1).
    next_tx_id: u32,
    local: BTreeMap<IpNet, Attributes>,
    /// Reflect client routes to other clients (RFC 4456 default). Gateways turn it off: nodes
    /// reach the whole cloud block through the gateways and need no per-node routes, and with
    /// a thousand nodes reflection would be a million UPDATEs.
    pub client_to_client: bool,
}

const DEFAULT_LOCAL_PREF: u32 = 100;

/// The length of the largest UPDATE that passing this path on could take: the reflector
/// adds ORIGINATOR_ID, a CLUSTER_LIST entry and LOCAL_PREF, and a peer may want a path
/// identifier, or 2-octet AS numbers with AS4_PATH beside them. One NLRI per UPDATE, as
/// [`super::adj_rib_out`] sends announcements.
pub fn reflected_len(prefix: &IpNet, a: &Attributes, cluster_id: Ipv4Addr) -> usize {
    let mut out = a.clone();
    out.originator_id = out.originator_id.or(Some(cluster_id));
    out.cluster_list.insert(0, cluster_id);
    out.local_pref = out.local_pref.or(Some(100));
    let widest = |four_octet_as| wire::Context {
        four_octet_as,
        add_path_rx: wire::Families::NONE,
        add_path_tx: wire::Families::BOTH,
    };
    let m = wire::Message::Update(Update {
        announced: vec![Nlri {
            prefix: *prefix,
            path_id: 1,
        }],
        attributes: Some(out),
        ..Default::default()
    });
    [true, false]
        .into_iter()
        .map(|f| wire::encode(&m, widest(f)).len())
        .max()
        .unwrap_or(0)
}

/// [`reflected_len`] when it exceeds 4096 bytes. Such a path is refused on arrival: re-sent
/// too long, it would make bird or FRR reset the session, and the route would come back on
/// every reconnect. Attributes that cannot reach 3000 bytes (counted roughly, from above) are
/// not encoded to find out; the fuzz target checks that bound.
pub fn too_long_to_pass_on(prefix: &IpNet, a: &Attributes, cluster_id: Ipv4Addr) -> Option<usize> {
    let hops: usize = a
        .as_path
        .iter()
        .map(|s| match s {
            wire::AsSegment::Set(v) | wire::AsSegment::Sequence(v) => v.len() + 1,
        })
        .sum();
    let rough = a.unknown.iter().map(|u| u.value.len() + 4).sum::<usize>()
        + 4 * (a.communities.len() + a.cluster_list.len())
        + 6 * hops;
    if rough < 3000 {
        return None;
    }
    let n = reflected_len(prefix, a, cluster_id);
    (n > wire::MAX_LEN).then_some(n)
}

impl Rib {
    pub fn new(local_id: Ipv4Addr) -> Rib {
        Rib {
            local_id,
            cluster_id: local_id,
            peers: Vec::new(),
            counters: Vec::new(),
            adj_in: Vec::new(),
            stale: Vec::new(),
            index: BTreeMap::new(),
            local: BTreeMap::new(),
            next_tx_id: LOCAL_TX_ID + 1,
            client_to_client: true,
        }
    }

    pub fn add_peer(&mut self, peer: RibPeer) -> PeerId {
        self.peers.push(peer);
        self.counters.push(Counters::default());
        self.adj_in.push(BTreeMap::new());
        self.stale.push(Default::default());
        self.peers.len() - 1
    }

    /// Originate a route of our own (a node's prefixes).
    pub fn originate(&mut self, prefix: IpNet, attributes: Attributes) -> Vec<IpNet> {
        self.local.insert(prefix, attributes);
        vec![prefix]
    }

    /// Accepted paths from `peer` (one per prefix, unless it uses ADD-PATH).
    pub fn accepted_count(&self, peer: PeerId) -> usize {
        self.adj_in[peer].len()
    }

    fn import_check(&self, peer: PeerId, prefix: &IpNet, a: &Attributes) -> Result<(), String> {
        if a.originator_id == Some(self.local_id) {
            return Err("ORIGINATOR_ID is our router ID (reflection loop)".into());
        }
        if a.cluster_list.contains(&self.cluster_id) {
            return Err("CLUSTER_LIST holds our cluster ID (reflection loop)".into());
        }
        let p = &self.peers[peer].policy;
        if let Some(d) = p
            .deny
            .iter()
            .find(|d| d.contains(prefix) || prefix.contains(*d))
        {
            return Err(format!("overlaps {d}, which this peer may not announce"));
        }
        if !p.allow.is_empty() && !p.allow.iter().any(|a| a.contains(prefix)) {
            return Err("outside the prefixes assigned to this peer".into());
        }
        if let Some(n) = too_long_to_pass_on(prefix, a, self.cluster_id) {
            return Err(format!(
                "attributes too long to pass on: {n} bytes once reflected (limit 4096)"
            ));
        }
        Ok(())
    }

    /// Apply an UPDATE from `peer` to its Adj-RIB-In.
    pub fn apply(&mut self, peer: PeerId, u: &Update) -> Applied {
        let mut out = Applied::default();
        self.counters[peer].updates += 1;
        for n in u.effective_withdrawn() {
            self.counters[peer].withdrawn += 1;
            if self.remove(peer, &n) {
                out.changed.push(n.prefix);
            }
        }
        if u.treat_as_withdraw {
            return out;
        }
        let Some(a4) = &u.attributes else { return out };
        // IPv6 NLRI beside IPv4 NLRI in one UPDATE: theirs is the MP_REACH next hop.
        let a6 = u.mp_next_hop.map(|nh| Attributes {
            next_hop: Some(nh),
            ..a4.clone()
        });
        for n in &u.announced {
            let a = match (&a6, n.prefix) {
                (Some(a6), IpNet::V6(_)) => a6,
                _ => a4,
            };
            self.counters[peer].received += 1;
            match self.import_check(peer, &n.prefix, a) {
                Ok(()) => {
                    self.counters[peer].accepted += 1;
                    let tx_id = match self.adj_in[peer].get(n) {
                        // An implicit replace keeps the identifier peers know the path by.
                        Some(old) => old.tx_id,
                        None => self.allocate_tx_id(),
                    };
                    self.adj_in[peer].insert(
                        *n,
                        Stored {
                            attributes: a.clone(),
                            tx_id,
                        },
                    );
                    self.stale[peer].remove(n);
                    self.index
                        .entry(n.prefix)
                        .or_default()
                        .insert((peer, n.path_id));
                    out.changed.push(n.prefix);
                }
                Err(why) => {
                    self.counters[peer].rejected += 1;
                    // A rejected re-announcement replaces the earlier accepted one: withdraw it.
                    if self.remove(peer, n) {
                        out.changed.push(n.prefix);
                    }
                    out.rejected.push((n.prefix, why));
                }
            }
        }
        let max = self.peers[peer].policy.max_prefix as usize;
        out.max_prefix_exceeded = max > 0 && self.adj_in[peer].len() > max;
        out
    }

    fn allocate_tx_id(&mut self) -> u32 {
        let id = self.next_tx_id;
        self.next_tx_id = match self.next_tx_id.wrapping_add(1) {
            0 => LOCAL_TX_ID + 1,
            n => n,
        };
        id
    }

    fn remove(&mut self, peer: PeerId, n: &Nlri) -> bool {
        let had = self.adj_in[peer].remove(n).is_some();
        if let Some(set) = self.index.get_mut(&n.prefix) {
            set.remove(&(peer, n.path_id));
            if set.is_empty() {
                self.index.remove(&n.prefix);
            }
        }
        had
    }

    /// The peer restarts gracefully: keep what it announced, marked stale, until it announces
    /// it again or [`Rib::sweep_stale`] runs (End-of-RIB, or the restart time ran out).
    pub fn mark_stale(&mut self, peer: PeerId) {
        self.stale[peer] = self.adj_in[peer].keys().copied().collect();
    }

    /// Drop the routes still stale for `peer`; returns their prefixes.
    pub fn sweep_stale(&mut self, peer: PeerId) -> Vec<IpNet> {
        let gone: Vec<Nlri> = std::mem::take(&mut self.stale[peer]).into_iter().collect();
        for n in &gone {
            self.remove(peer, n);
        }
        prefixes_of(&gone)
    }

    pub fn stale_count(&self, peer: PeerId) -> usize {
        self.stale[peer].len()
    }

    /// The peer's session went down: everything it announced goes.
    pub fn peer_down(&mut self, peer: PeerId) -> Vec<IpNet> {
        self.stale[peer].clear();
        let gone: Vec<Nlri> = self.adj_in[peer].keys().copied().collect();
        for n in &gone {
            self.remove(peer, n);
        }
        prefixes_of(&gone)
    }

    /// Every known prefix (for a full re-export after a session comes up or a route refresh).
    pub fn prefixes(&self) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self.local.keys().copied().collect();
        v.extend(self.index.keys().copied());
        v.sort();
        v.dedup();
        v
    }

    /// All paths for `prefix`, best first; the equal-cost ones (for multipath) are the prefix of
    /// the list that [`equal_cost`] accepts.
    pub fn paths(&self, prefix: &IpNet) -> Vec<Path> {
        let mut v: Vec<Path> = Vec::new();
        if let Some(a) = self.local.get(prefix) {
            v.push(Path {
                from: None,
                rx_id: 0,
                tx_id: LOCAL_TX_ID,
                attributes: a.clone(),
            });
        }
        for (i, rx_id) in self.index.get(prefix).into_iter().flatten() {
            let n = Nlri {
                prefix: *prefix,
                path_id: *rx_id,
            };
            if let Some(st) = self.adj_in[*i].get(&n) {
                v.push(Path {
                    from: Some(*i),
                    rx_id: *rx_id,
                    tx_id: st.tx_id,
                    attributes: st.attributes.clone(),
                });
            }
        }
        v.sort_by(|x, y| self.compare(x, y));
        v
    }

    /// The best path and the paths equal to it for multipath.
    pub fn multipath(&self, prefix: &IpNet) -> Vec<Path> {
        let paths = self.paths(prefix);
        let Some(best) = paths.first().cloned() else {
            return paths;
        };
        paths
            .into_iter()
            .filter(|p| equal_cost(&best.attributes, &p.attributes))
            .collect()
    }

    /// RFC 4271 §9.1.2.2 for iBGP, then RFC 4456 §9 tie-breaks. Ordering: better first.
    fn compare(&self, x: &Path, y: &Path) -> std::cmp::Ordering {
        let key = |p: &Path| {
            let a = &p.attributes;
            let router_id = a
                .originator_id
                .or_else(|| p.from.and_then(|i| self.peers[i].router_id))
                .unwrap_or(self.local_id);
            (
                std::cmp::Reverse(a.local_pref.unwrap_or(DEFAULT_LOCAL_PREF)),
                p.from.is_some(), // locally originated first
                as_path_len(a),
                a.origin,
                a.med.unwrap_or(0),
                a.cluster_list.len(),
                u32::from(router_id),
                p.from,
                p.rx_id,
            )
        };
        key(x).cmp(&key(y))
    }

    /// What to tell `to` about `prefix`: the attributes to announce, or None to withdraw.
    pub fn export(&self, to: PeerId, prefix: &IpNet) -> Option<Attributes> {
        let best = self.paths(prefix).into_iter().next()?;
        self.export_path(to, prefix, &best)
    }

    /// What to tell an ADD-PATH peer about `prefix`: every path it may have, each with our
    /// path identifier. A peer we rewrite the next hop for (the site router) gets only the
    /// best path: the others would differ in nothing it can use.
    pub fn export_paths(&self, to: PeerId, prefix: &IpNet) -> Vec<(u32, Attributes)> {
        let paths = self.paths(prefix);
        let take = if self.peers[to].policy.next_hop_self.is_some() {
            1
        } else {
            paths.len()
        };
        paths
            .iter()
            .take(take)
            .filter_map(|p| self.export_path(to, prefix, p).map(|a| (p.tx_id, a)))
            .collect()
    }

    /// One path as `to` should see it, or None if reflection rules keep it from `to`.
    fn export_path(&self, to: PeerId, prefix: &IpNet, best: &Path) -> Option<Attributes> {
        let to_kind = self.peers[to].kind;
        if let Some(from) = best.from {
            if from == to {
                return None;
            }
            let from_kind = self.peers[from].kind;
            if from_kind == PeerKind::NonClient && to_kind == PeerKind::NonClient {
                return None;
            }
            if from_kind == PeerKind::Client
                && to_kind == PeerKind::Client
                && !self.client_to_client
            {
                return None;
            }
            // Nor through another reflector: a route a non-client passes on with a
            // CLUSTER_LIST was reflected there (another gateway's client, seen through it),
            // and without client-to-client reflection it must not reach our clients either.
            if from_kind == PeerKind::NonClient
                && to_kind == PeerKind::Client
                && !self.client_to_client
                && !best.attributes.cluster_list.is_empty()
            {
                return None;
            }
        }
        let mut a = best.attributes.clone();
        a.local_pref.get_or_insert(DEFAULT_LOCAL_PREF);
        if let Some(from) = best.from {
            // Reflecting: mark where it came from and that it passed through our cluster.
            if a.originator_id.is_none() {
                a.originator_id = self.peers[from].router_id;
            }
            a.cluster_list.insert(0, self.cluster_id);
        }
        // A route never goes back to the router that originated it: it would drop it as a loop
        // (RFC 4456 §8). With ADD-PATH a client would otherwise get its own route back as
        // reflected by the other gateways.
        if a.originator_id.is_some() && a.originator_id == self.peers[to].router_id {
            return None;
        }
        let policy = &self.peers[to].policy;
        let nhs = match prefix {
            IpNet::V6(_) => policy.next_hop_self_v6.or(policy.next_hop_self),
            IpNet::V4(_) => policy.next_hop_self,
        };
        if let Some(nh) = nhs {
            a.next_hop = Some(nh);
        }
        Some(a)
    }
}

fn prefixes_of(nlri: &[Nlri]) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = nlri.iter().map(|n| n.prefix).collect();
    v.dedup();
    v
}

fn as_path_len(a: &Attributes) -> usize {
    a.as_path
        .iter()
        .map(|s| match s {
            super::wire::AsSegment::Sequence(v) => v.len(),
            super::wire::AsSegment::Set(_) => 1,
        })
        .sum()
}

/// Equal for multipath: same LOCAL_PREF, AS_PATH length, ORIGIN and MED.
pub fn equal_cost(a: &Attributes, b: &Attributes) -> bool {
    a.local_pref.unwrap_or(DEFAULT_LOCAL_PREF) == b.local_pref.unwrap_or(DEFAULT_LOCAL_PREF)
        && as_path_len(a) == as_path_len(b)
        && a.origin == b.origin
        && a.med.unwrap_or(0) == b.med.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn nlri(s: &str) -> Nlri {
        net(s).into()
    }

    fn policy() -> Policy {
        Policy {
            allow: vec![],
            deny: vec![],
            max_prefix: 100,
            next_hop_self: None,
            next_hop_self_v6: None,
        }
    }

    fn attrs(nh: &str) -> Attributes {
        Attributes {
            next_hop: Some(nh.parse().unwrap()),
            local_pref: Some(100),
            ..Default::default()
        }
    }

    fn announce(p: &str, a: Attributes) -> Update {
        Update {
            announced: vec![nlri(p)],
            attributes: Some(a),
            ..Default::default()
        }
    }

    /// A gateway (RR, id 10.10.0.2) with: site router (non-client, next-hop-self), node c1
    /// (client, owns 10.200.0.11/32), node c2 (client, owns 10.200.0.12/32).
    fn gateway() -> (Rib, PeerId, PeerId, PeerId) {
        let mut rib = Rib::new("10.10.0.2".parse().unwrap());
        let site = rib.add_peer(RibPeer {
            name: "site".into(),
            kind: PeerKind::NonClient,
            policy: Policy {
                deny: vec![net("10.200.0.0/16")],
                next_hop_self: Some("10.10.0.2".parse().unwrap()),
                ..policy()
            },
            router_id: Some("10.10.0.1".parse().unwrap()),
        });
        let c1 = rib.add_peer(RibPeer {
            name: "c1".into(),
            kind: PeerKind::Client,
            policy: Policy {
                allow: vec![net("10.200.0.11/32")],
                max_prefix: 2,
                ..policy()
            },
            router_id: Some("10.200.0.11".parse().unwrap()),
        });
        let c2 = rib.add_peer(RibPeer {
            name: "c2".into(),
            kind: PeerKind::Client,
            policy: Policy {
                allow: vec![net("10.200.0.12/32")],
                ..policy()
            },
            router_id: Some("10.200.0.12".parse().unwrap()),
        });
        (rib, site, c1, c2)
    }

    fn path(p: &str, path_id: u32) -> Nlri {
        Nlri {
            prefix: net(p),
            path_id,
        }
    }

    #[test]
    fn add_path_keeps_each_path_of_one_peer_apart_and_withdraws_them_one_by_one() {
        let (mut rib, site, c1, _) = gateway();
        let two = Update {
            announced: vec![path("10.12.0.0/16", 1), path("10.12.0.0/16", 2)],
            attributes: Some(attrs("10.10.0.1")),
            ..Default::default()
        };
        rib.apply(site, &two);
        assert_eq!(rib.paths(&net("10.12.0.0/16")).len(), 2);
        assert_eq!(rib.accepted_count(site), 2);
        let to_c1 = rib.export_paths(c1, &net("10.12.0.0/16"));
        assert_eq!(to_c1.len(), 2, "an ADD-PATH client gets both");
        assert_ne!(to_c1[0].0, to_c1[1].0, "with distinct path identifiers");
        let withdraw_one = Update {
            withdrawn: vec![path("10.12.0.0/16", 1)],
            ..Default::default()
        };
        rib.apply(site, &withdraw_one);
        let left = rib.export_paths(c1, &net("10.12.0.0/16"));
        assert_eq!(
            left,
            vec![to_c1[1].clone()],
            "path 2 stays, same identifier"
        );
    }

    #[test]
    fn an_implicit_replace_keeps_the_path_identifier_peers_know() {
        let (mut rib, site, c1, _) = gateway();
        rib.apply(site, &announce("10.12.0.0/16", attrs("10.10.0.1")));
        let before = rib.export_paths(c1, &net("10.12.0.0/16"));
        let mut a = attrs("10.10.0.1");
        a.med = Some(10);
        rib.apply(site, &announce("10.12.0.0/16", a));
        let after = rib.export_paths(c1, &net("10.12.0.0/16"));
        assert_eq!(before[0].0, after[0].0);
        assert_eq!(after[0].1.med, Some(10));
    }

    #[test]
    fn add_path_towards_a_next_hop_self_peer_sends_only_the_best_path() {
        let (mut rib, site, c1, _) = gateway();
        rib.apply(c1, &announce("10.200.0.11/32", attrs("10.200.0.11")));
        // No other client may announce c1's prefix: give it a second, local path instead.
        rib.originate(net("10.200.0.11/32"), attrs("10.10.0.2"));
        assert_eq!(rib.paths(&net("10.200.0.11/32")).len(), 2);
        let to_site = rib.export_paths(site, &net("10.200.0.11/32"));
        assert_eq!(to_site.len(), 1, "{to_site:?}");
        assert_eq!(to_site[0].1.next_hop, Some("10.10.0.2".parse().unwrap()));
    }

    #[test]
    fn a_client_never_gets_its_own_route_back_through_another_reflector() {
        let (mut rib, _, c1, _) = gateway();
        let gw2 = rib.add_peer(RibPeer {
            name: "gw2".into(),
            kind: PeerKind::NonClient,
            policy: policy(),
            router_id: Some("10.10.0.3".parse().unwrap()),
        });
        rib.apply(c1, &announce("10.200.0.11/32", attrs("10.200.0.11")));
        let mut via_gw2 = attrs("10.200.0.11");
        via_gw2.originator_id = Some("10.200.0.11".parse().unwrap());
        via_gw2.cluster_list = vec!["10.10.0.3".parse().unwrap()];
        rib.apply(gw2, &announce("10.200.0.11/32", via_gw2));
        assert_eq!(rib.paths(&net("10.200.0.11/32")).len(), 2);
        assert!(rib.export_paths(c1, &net("10.200.0.11/32")).is_empty());
    }

    #[test]
    fn with_two_reflectors_a_client_never_gets_another_clients_path_with_or_without_add_path() {
        let (mut rib, site, c1, c2) = gateway();
        rib.client_to_client = false; // as gateways run
        let gw2 = rib.add_peer(RibPeer {
            name: "gw2".into(),
            kind: PeerKind::NonClient,
            policy: policy(),
            router_id: Some("10.10.0.3".parse().unwrap()),
        });
        // c2's route, learned from c2 and as gw2 reflected it.
        rib.apply(c2, &announce("10.200.0.12/32", attrs("10.200.0.12")));
        let mut via_gw2 = attrs("10.200.0.12");
        via_gw2.originator_id = Some("10.200.0.12".parse().unwrap());
        via_gw2.cluster_list = vec!["10.10.0.3".parse().unwrap()];
        rib.apply(gw2, &announce("10.200.0.12/32", via_gw2.clone()));
        // A prefix only gw2 knows (its client c3, which is not ours).
        via_gw2.originator_id = Some("10.200.0.13".parse().unwrap());
        rib.apply(gw2, &announce("10.200.0.13/32", via_gw2));
        for p in ["10.200.0.12/32", "10.200.0.13/32"] {
            assert_eq!(rib.export(c1, &net(p)), None, "{p} reached c1");
            assert!(
                rib.export_paths(c1, &net(p)).is_empty(),
                "{p} reached c1 (ADD-PATH)"
            );
            assert!(rib.export(site, &net(p)).is_some() || p.ends_with(".13/32"));
        }
        // The site router's own routes still reach the clients.
        rib.apply(site, &announce("10.12.0.0/16", attrs("10.10.0.1")));
        assert!(rib.export(c1, &net("10.12.0.0/16")).is_some());
        assert_eq!(rib.export_paths(c1, &net("10.12.0.0/16")).len(), 1);
    }

    #[test]
    fn add_path_still_applies_reflection_rules_per_path() {
        let (mut rib, site, c1, _) = gateway();
        rib.apply(site, &announce("10.12.0.0/16", attrs("10.10.0.1")));
        rib.apply(c1, &announce("10.200.0.11/32", attrs("10.200.0.11")));
        assert!(
            rib.export_paths(c1, &net("10.200.0.11/32")).is_empty(),
            "nothing goes back to the peer it came from"
        );
        assert!(
            rib.export_paths(site, &net("10.12.0.0/16")).is_empty(),
            "a non-client's route never goes to a non-client"
        );
    }

    #[test]
    fn a_client_route_is_reflected_to_other_clients_and_non_clients_with_originator_and_cluster() {
        let (mut rib, site, c1, c2) = gateway();
        rib.apply(c1, &announce("10.200.0.11/32", attrs("10.200.0.11")));
        let to_c2 = rib.export(c2, &net("10.200.0.11/32")).unwrap();
        assert_eq!(to_c2.originator_id, Some("10.200.0.11".parse().unwrap()));
        assert_eq!(
            to_c2.cluster_list,
            vec!["10.10.0.2".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            to_c2.next_hop,
            Some("10.200.0.11".parse().unwrap()),
            "next hop kept for clients"
        );
        let to_site = rib.export(site, &net("10.200.0.11/32")).unwrap();
        assert_eq!(
            to_site.next_hop,
            Some("10.10.0.2".parse().unwrap()),
            "next-hop-self towards the site"
        );
        assert!(
            rib.export(c1, &net("10.200.0.11/32")).is_none(),
            "never back to its source"
        );
    }

    #[test]
    fn without_client_to_client_reflection_clients_hear_only_non_client_routes() {
        let (mut rib, site, c1, c2) = gateway();
        rib.client_to_client = false;
        rib.apply(c1, &announce("10.200.0.11/32", attrs("10.200.0.11")));
        rib.apply(site, &announce("10.10.0.0/16", attrs("10.10.0.1")));
        assert!(rib.export(c2, &net("10.200.0.11/32")).is_none());
        assert!(rib.export(site, &net("10.200.0.11/32")).is_some());
        assert!(rib.export(c2, &net("10.10.0.0/16")).is_some());
    }

    #[test]
    fn a_non_client_route_is_reflected_to_clients_only() {
        let mut rib = Rib::new("10.10.0.2".parse().unwrap());
        let pol = policy();
        let site = rib.add_peer(RibPeer {
            name: "site".into(),
            kind: PeerKind::NonClient,
            policy: pol.clone(),
            router_id: Some("10.10.0.1".parse().unwrap()),
        });
        let gw2 = rib.add_peer(RibPeer {
            name: "gw2".into(),
            kind: PeerKind::NonClient,
            policy: pol.clone(),
            router_id: Some("10.10.0.3".parse().unwrap()),
        });
        let c1 = rib.add_peer(RibPeer {
            name: "c1".into(),
            kind: PeerKind::Client,
            policy: pol,
            router_id: Some("10.200.0.11".parse().unwrap()),
        });
        rib.apply(site, &announce("10.10.0.0/16", attrs("10.10.0.1")));
        assert!(rib.export(c1, &net("10.10.0.0/16")).is_some());
        assert!(
            rib.export(gw2, &net("10.10.0.0/16")).is_none(),
            "non-client to non-client is not reflected"
        );
    }

    #[test]
    fn a_node_announcing_another_nodes_prefix_or_a_site_prefix_is_rejected_and_counted() {
        let (mut rib, _, c1, _) = gateway();
        let u = Update {
            announced: vec![
                nlri("10.200.0.12/32"),
                nlri("10.10.0.0/16"),
                nlri("0.0.0.0/0"),
            ],
            attributes: Some(attrs("10.200.0.11")),
            ..Default::default()
        };
        let r = rib.apply(c1, &u);
        assert_eq!(r.rejected.len(), 3);
        assert_eq!(rib.counters[c1].rejected, 3);
        assert_eq!(rib.accepted_count(c1), 0);
    }

    #[test]
    fn the_site_router_may_not_announce_any_part_of_the_cloud_block() {
        let (mut rib, site, _, _) = gateway();
        let r = rib.apply(site, &announce("10.200.5.0/24", attrs("10.10.0.1")));
        assert_eq!(r.rejected.len(), 1);
        let r = rib.apply(site, &announce("10.0.0.0/8", attrs("10.10.0.1")));
        assert_eq!(
            r.rejected.len(),
            1,
            "a covering prefix overlaps the cloud block too"
        );
        let r = rib.apply(site, &announce("10.10.0.0/16", attrs("10.10.0.1")));
        assert!(r.rejected.is_empty());
    }

    #[test]
    fn routes_carrying_our_id_or_cluster_are_dropped_as_loops() {
        let (mut rib, site, _, _) = gateway();
        let mut a = attrs("10.10.0.1");
        a.cluster_list = vec!["10.10.0.2".parse().unwrap()];
        assert_eq!(
            rib.apply(site, &announce("10.10.0.0/16", a)).rejected.len(),
            1
        );
        let mut a = attrs("10.10.0.1");
        a.originator_id = Some("10.10.0.2".parse().unwrap());
        assert_eq!(
            rib.apply(site, &announce("10.11.0.0/16", a)).rejected.len(),
            1
        );
    }

    #[test]
    fn exceeding_max_prefix_is_reported() {
        let (mut rib, _, c1, _) = gateway();
        rib.peers[c1].policy.allow = vec![net("10.200.0.0/28")];
        let u = Update {
            announced: vec![
                nlri("10.200.0.1/32"),
                nlri("10.200.0.2/32"),
                nlri("10.200.0.3/32"),
            ],
            attributes: Some(attrs("10.200.0.11")),
            ..Default::default()
        };
        assert!(rib.apply(c1, &u).max_prefix_exceeded);
    }

    #[test]
    fn treat_as_withdraw_removes_the_previous_announcement() {
        let (mut rib, _, c1, c2) = gateway();
        rib.apply(c1, &announce("10.200.0.11/32", attrs("10.200.0.11")));
        let mut u = announce("10.200.0.11/32", attrs("10.200.0.11"));
        u.treat_as_withdraw = true;
        assert_eq!(rib.apply(c1, &u).changed, vec![net("10.200.0.11/32")]);
        assert!(rib.export(c2, &net("10.200.0.11/32")).is_none());
    }

    #[test]
    fn equal_paths_from_two_gateways_form_a_multipath_set() {
        let mut rib = Rib::new("10.200.0.11".parse().unwrap());
        let g1 = rib.add_peer(RibPeer {
            name: "gw1".into(),
            kind: PeerKind::NonClient,
            policy: policy(),
            router_id: Some("10.10.0.2".parse().unwrap()),
        });
        let g2 = rib.add_peer(RibPeer {
            name: "gw2".into(),
            kind: PeerKind::NonClient,
            policy: policy(),
            router_id: Some("10.10.0.3".parse().unwrap()),
        });
        rib.apply(g1, &announce("10.10.0.0/16", attrs("10.10.0.2")));
        rib.apply(g2, &announce("10.10.0.0/16", attrs("10.10.0.3")));
        let mp = rib.multipath(&net("10.10.0.0/16"));
        assert_eq!(mp.len(), 2);
        assert_eq!(
            mp[0].from,
            Some(g1),
            "lowest router ID breaks the tie for best"
        );
        let mut worse = attrs("10.10.0.3");
        worse.local_pref = Some(50);
        rib.apply(g2, &announce("10.10.0.0/16", worse));
        assert_eq!(rib.multipath(&net("10.10.0.0/16")).len(), 1);
    }

    #[test]
    fn stale_routes_survive_a_graceful_restart_until_end_of_rib_sweeps_the_unconfirmed() {
        let (mut rib, site, c1, _) = gateway();
        rib.peers[c1].policy.allow = vec![net("10.200.0.0/28")];
        let u = Update {
            announced: vec![nlri("10.200.0.1/32"), nlri("10.200.0.2/32")],
            attributes: Some(attrs("10.200.0.11")),
            ..Default::default()
        };
        rib.apply(c1, &u);
        rib.mark_stale(c1);
        assert!(
            rib.export(site, &net("10.200.0.1/32")).is_some(),
            "still announced while the peer restarts"
        );
        rib.apply(c1, &announce("10.200.0.1/32", attrs("10.200.0.11")));
        assert_eq!(rib.stale_count(c1), 1);
        assert_eq!(rib.sweep_stale(c1), vec![net("10.200.0.2/32")]);
        assert!(rib.export(site, &net("10.200.0.2/32")).is_none());
        assert!(rib.export(site, &net("10.200.0.1/32")).is_some());
    }

    #[test]
    fn a_session_going_down_withdraws_what_it_announced() {
        let (mut rib, _, c1, c2) = gateway();
        rib.apply(c1, &announce("10.200.0.11/32", attrs("10.200.0.11")));
        assert_eq!(rib.peer_down(c1), vec![net("10.200.0.11/32")]);
        assert!(rib.export(c2, &net("10.200.0.11/32")).is_none());
    }
}
