//! The WireGuard side of one link: peers, cryptokey routing, and the per-packet decisions.
//!
//! No I/O and no clock: [`Link::outbound`] turns a packet read from the tun device into a
//! datagram to send, [`Link::inbound`] turns a received datagram into a packet for the tun
//! device (and any datagrams to send back), [`Link::tick`] runs timers and probes. Every one
//! takes `now`; the I/O threads in `runtime.rs` read the clock once per batch and only move
//! bytes; tests wire two links back to back in memory and move time by hand. (boringtun's
//! `Tunn` keeps its own session timers — rekey, handshake retry — on its own clock.)
//!
//! boringtun's `Tunn` does the Noise state machine; it does not check allowed IPs, so the inner
//! source of every decrypted packet is checked here against the sending peer's prefixes (a
//! spoofed source is dropped and counted). One `RateLimiter` per link is shared by its peers
//! and reset every second by the caller ([`Link::reset_rate_limiter`]).

use crate::datapath::liveness::Liveness;
use crate::datapath::{mss, offload};
use crate::intent::links::{LinkSpec, PeerSpec};
use crate::model::key::{PrivateKey, PublicKey};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use serde::Serialize;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Handshake initiations accepted per second per link before cookies are required.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// SYNs up to this size are copied onto the stack to be clamped (larger ones, SYN data
/// beyond a 1500-byte packet, onto the heap).
const SYN_COPY: usize = 2048;
/// Largest datagram or packet handled (a 64 KiB tun read plus WireGuard overhead).
pub const MAX_PACKET: usize = 65536 + 64;

/// Counters of one peer on one link. Times are nanoseconds since the link's epoch (0 = never).
#[derive(Debug, Default)]
pub struct PeerStats {
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
    pub last_rx: AtomicU64,
    pub last_tx: AtomicU64,
    /// Handshake messages that completed a session (responses sent or received).
    pub handshakes: AtomicU64,
    /// Decrypted packets dropped because their inner source is not the peer's.
    pub spoofed: AtomicU64,
    /// When we last sent this peer a probe.
    pub last_probe_tx: AtomicU64,
    /// When the peer's last liveness probe arrived (0 = it never sent one: not an appliance).
    pub last_probe: AtomicU64,
    /// What that probe said: whether the peer hears us on this link.
    pub peer_hears_us: AtomicBool,
    /// The peer's last probe said it is a drained gateway.
    pub peer_draining: AtomicBool,
    /// The peer (a gateway) asks this node to drain: its site file drains the node.
    pub peer_drains_us: AtomicBool,
    /// The tag of the next key of ours the peer's last probe said its site file lists (bit 24
    /// set, the 3 bytes below it), 0 when none.
    pub peer_next_tag: AtomicU32,
    /// TCP SYNs to or from this peer whose MSS was lowered to fit the tunnel.
    pub mss_clamped: AtomicU64,
    /// When we last started a new handshake because the link had gone silent.
    pub last_rehandshake: AtomicU64,
    /// Handshakes refused because they came from elsewhere while the peer was live at its
    /// endpoint: a second instance claiming the same slot (key).
    pub claims_refused: AtomicU64,
    /// The GSO self-check trains this peer sent us (reported back in our next tick).
    pub check_heard: Mutex<offload::Heard>,
    /// The peer's last report on the trains we sent it.
    pub check_report: Mutex<Option<[(u16, u16); 2]>>,
}

/// How often the side that dials (a node) starts a new handshake on a link it no longer hears.
/// boringtun alone waits for KEEPALIVE + REKEY_TIMEOUT (15 s) of silence: a gateway that
/// restarted (its sessions gone) would drop every packet of the old session for that long.
pub const REHANDSHAKE_DEAD: Duration = Duration::from_secs(1);

/// A peer on a link: one Noise session per key the site file lists for it (its current key,
/// and its next one while it rotates). Sessions, the learned endpoint and the counters live
/// behind `Arc`s, so a reload that keeps a key keeps its session, and a link that moves to a
/// new key of its own ([`Link::rekeyed`]) keeps the endpoints and counters.
pub struct Peer {
    pub spec: PeerSpec,
    sessions: Vec<Arc<Session>>,
    /// The session packets go out on: the one the peer last proved live with (data, or a
    /// handshake it answered). A rotating peer moves from one key's session to the other.
    active: AtomicUsize,
    shared: Arc<PeerShared>,
}

/// One Noise state machine, for one of the peer's keys.
struct Session {
    key: PublicKey,
    /// Our session index (the top 24 bits of boringtun's receiver index).
    index: u32,
    tunn: Mutex<Tunn>,
}

/// What a rebuilt link takes over from a running peer.
struct Kept<'a> {
    shared: Arc<PeerShared>,
    sessions: &'a [Arc<Session>],
    /// The key of the session packets went out on.
    active: Option<PublicKey>,
    /// Sessions whose indices new sessions for the same key take over.
    reuse: &'a [Arc<Session>],
}

impl<'a> From<&'a Peer> for Kept<'a> {
    fn from(p: &'a Peer) -> Kept<'a> {
        Kept {
            shared: p.shared.clone(),
            sessions: &p.sessions,
            active: Some(p.active().key),
            reuse: &[],
        }
    }
}

/// What a peer's sessions share: where it is and what it did.
struct PeerShared {
    endpoint: RwLock<Option<SocketAddr>>,
    stats: PeerStats,
    /// Where the last refused claim came from (for the daemon's log and status).
    claimant: Mutex<Option<SocketAddr>>,
    /// Held by a transmit thread from sealing a batch for the peer until it is sent
    /// ([`Link::send_order`]).
    send_order: Mutex<()>,
}

impl Peer {
    pub fn stats(&self) -> &PeerStats {
        &self.shared.stats
    }

    fn active(&self) -> &Session {
        let i = self.active.load(Ordering::Relaxed);
        &self.sessions[i.min(self.sessions.len() - 1)]
    }
}

/// Per-link counters of what could not be attributed to a peer.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Datagrams that are not WireGuard, fail authentication, or name no known peer.
    pub invalid: AtomicU64,
    /// Packets from the tun device with no peer for their destination.
    pub no_route: AtomicU64,
    /// Cookie replies sent because handshakes arrived faster than the rate limit.
    pub cookies: AtomicU64,
    /// Data packets dropped as replays (a counter already seen, or behind the window);
    /// also counted in `invalid`.
    pub replayed: AtomicU64,
    /// New TCP connections (SYN without ACK) from the tunnel refused while the node drains.
    pub refused_syns: AtomicU64,
    /// UDP GSO writes the kernel refused (each batch then went datagram by datagram).
    pub gso_errors: AtomicU64,
    /// Sends that found the socket buffer full and waited; datagrams dropped when it stayed
    /// full.
    pub send_blocked: AtomicU64,
    pub send_dropped: AtomicU64,
    /// Batches of decrypted packets the tun device refused.
    pub tun_write_errors: AtomicU64,
}

pub struct Link {
    pub spec_dev: String,
    pub index: u32,
    clamp_mtu: Option<u32>,
    keepalive_ms: u32,
    draining: bool,
    /// A draining node refuses new TCP connections from the tunnel (shared by the link's
    /// rebuilds: it is runtime state, not config).
    refuse_new: Arc<AtomicBool>,
    pub listen_port: Option<u16>,
    private: x25519::StaticSecret,
    public: x25519::PublicKey,
    rate_limiter: Arc<RateLimiter>,
    /// What the peers' `Tunn`s check mac1 with: never under load, because every handshake
    /// message is counted (and answered with a cookie under load) once, by `rate_limiter`,
    /// before a session sees it.
    tunn_limiter: Arc<RateLimiter>,
    peers: Vec<Peer>,
    /// Peer key → (peer, session); a rotating peer has two.
    by_key: HashMap<PublicKey, (usize, usize)>,
    /// Our session index → (peer, session).
    by_index: HashMap<u32, (usize, usize)>,
    next_index: u32,
    lpm4: PrefixMap<Ipv4Net, usize>,
    lpm6: PrefixMap<Ipv6Net, usize>,
    epoch: Instant,
    pub stats: Arc<LinkStats>,
}

/// What to do with a packet read from the tun device.
#[derive(Debug, PartialEq, Eq)]
pub enum Outbound {
    /// Send `len` bytes of the output buffer to this address.
    Send(SocketAddr, usize),
    /// Nothing to send now (packet queued behind a handshake, or peer endpoint unknown).
    Queued,
    Drop(DropReason),
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum DropReason {
    NoRoute,
    NotIp,
    Spoofed,
    Invalid,
    /// A handshake for a live roaming peer from another address.
    Claimed,
    /// A new TCP connection to a draining node.
    Draining,
    /// A datagram for a live session of a known peer that fails on its tag (tampered,
    /// truncated, or a train the kernel split wrong: see `offload::GroWatch`); not a replay.
    Unauthentic,
}

/// What to do with a received datagram.
#[derive(Debug, Default)]
pub struct Inbound {
    /// Decrypted packet for the tun device: `len` bytes of the output buffer.
    pub to_tun: Option<usize>,
    /// Datagrams to send (handshake responses, cookies, queued packets released by a new
    /// session), each with its destination.
    pub to_net: Vec<(SocketAddr, Vec<u8>)>,
    /// The packet was dropped, and why.
    pub dropped: Option<DropReason>,
    /// The datagram proved its peer (decrypted, or a handshake answered): what the receive
    /// thread's UDP GRO watch counts as a good datagram of a read.
    pub authenticated: bool,
}

impl Link {
    /// A link from its spec, with a fresh session state for every peer.
    pub fn new(spec: &LinkSpec, private: &PrivateKey, now: Instant) -> Link {
        let mut link = Link::empty(spec, private, now, Arc::default(), Arc::default(), 1);
        for p in &spec.peers {
            link.add_peer(p.clone(), None);
        }
        link
    }

    /// A link with no peers yet, under `private`.
    fn empty(
        spec: &LinkSpec,
        private: &PrivateKey,
        epoch: Instant,
        stats: Arc<LinkStats>,
        refuse_new: Arc<AtomicBool>,
        next_index: u32,
    ) -> Link {
        let secret = x25519::StaticSecret::from(private.0);
        let public = x25519::PublicKey::from(&secret);
        Link {
            spec_dev: spec.dev.clone(),
            index: spec.index,
            clamp_mtu: spec.clamp_mtu,
            keepalive_ms: spec.keepalive_ms,
            draining: spec.draining,
            refuse_new,
            listen_port: spec.listen_port,
            private: secret,
            // mac1 and cookies are keyed on our public key: one limiter per key.
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            tunn_limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
            public,
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            next_index,
            lpm4: PrefixMap::new(),
            lpm6: PrefixMap::new(),
            epoch,
            stats,
        }
    }

    /// The same link with a new peer list (a config reload). A peer keeps the session of
    /// every key it still has, and its endpoint and counters: it does not handshake again. A
    /// key added beside it (a next key) gets a new session; a key dropped (a retired one)
    /// loses its session, so handshakes signed with it are refused from then on.
    pub fn rebuild(&self, spec: &LinkSpec) -> Link {
        let mut link = self.empty_like(spec);
        for p in &spec.peers {
            let old = p
                .keys()
                .find_map(|k| self.by_key.get(&k))
                .map(|(i, _)| &self.peers[*i]);
            if let Some(old) = old {
                if old.spec.endpoint != p.endpoint && p.endpoint.is_some() {
                    *old.shared.endpoint.write().expect("not poisoned") = p.endpoint;
                }
            }
            link.add_peer(p.clone(), old.map(Kept::from));
        }
        link
    }

    /// The same link under another private key of ours: a key rotation moving this link.
    /// Every session starts over (the peers must handshake with the new key; call
    /// [`Link::initiate`] at once), while the endpoints, counters and tables stay.
    pub fn rekeyed(&self, private: &PrivateKey) -> Link {
        let mut link = Link::empty(
            &self.spec_of(),
            private,
            self.epoch,
            self.stats.clone(),
            self.refuse_new.clone(),
            self.next_index,
        );
        for p in &self.peers {
            let kept = Kept {
                shared: p.shared.clone(),
                sessions: &[],
                active: None,
                // The new sessions take the old ones' indices: a link that moves back and
                // forth does not use up the 24-bit index space.
                reuse: &p.sessions,
            };
            link.add_peer(p.spec.clone(), Some(kept));
        }
        link
    }

    /// The settings of this link as a spec with no peers (for [`Link::empty`]).
    fn spec_of(&self) -> LinkSpec {
        LinkSpec {
            dev: self.spec_dev.clone(),
            index: self.index,
            listen_port: self.listen_port,
            v6_underlay: false,
            clamp_mtu: self.clamp_mtu,
            keepalive_ms: self.keepalive_ms,
            draining: self.draining,
            peers: Vec::new(),
        }
    }

    /// A link with `spec`'s settings and this one's key, epoch and counters, and no peers.
    fn empty_like(&self, spec: &LinkSpec) -> Link {
        Link {
            spec_dev: spec.dev.clone(),
            index: spec.index,
            clamp_mtu: spec.clamp_mtu,
            keepalive_ms: spec.keepalive_ms,
            draining: spec.draining,
            refuse_new: self.refuse_new.clone(),
            listen_port: spec.listen_port,
            private: self.private.clone(),
            public: self.public,
            rate_limiter: self.rate_limiter.clone(),
            tunn_limiter: self.tunn_limiter.clone(),
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            next_index: self.next_index,
            lpm4: PrefixMap::new(),
            lpm6: PrefixMap::new(),
            epoch: self.epoch,
            stats: self.stats.clone(),
        }
    }

    /// Add a peer. From a running peer it takes the endpoint, counters and the session of
    /// every key both list; other keys get a new session.
    fn add_peer(&mut self, spec: PeerSpec, old: Option<Kept<'_>>) {
        let idx = self.peers.len();
        let shared = old.as_ref().map(|o| o.shared.clone()).unwrap_or_else(|| {
            Arc::new(PeerShared {
                endpoint: RwLock::new(spec.endpoint),
                stats: PeerStats::default(),
                claimant: Mutex::new(None),
                send_order: Mutex::new(()),
            })
        });
        let mut sessions = Vec::new();
        for key in spec.keys() {
            let kept = old
                .as_ref()
                .and_then(|o| o.sessions.iter().find(|s| s.key == key));
            let reused = old
                .as_ref()
                .and_then(|o| o.reuse.iter().find(|s| s.key == key))
                .map(|s| s.index);
            let session = kept.cloned().unwrap_or_else(|| {
                let index = reused.unwrap_or_else(|| {
                    self.next_index += 1;
                    self.next_index - 1
                });
                Arc::new(Session {
                    key,
                    index,
                    tunn: Mutex::new(Tunn::new(
                        self.private.clone(),
                        x25519::PublicKey::from(key.0),
                        None,
                        None,
                        index,
                        Some(self.tunn_limiter.clone()),
                    )),
                })
            });
            self.by_key.insert(key, (idx, sessions.len()));
            self.by_index.insert(session.index, (idx, sessions.len()));
            sessions.push(session);
        }
        // Packets keep going out on the session they went out on.
        let active = old
            .and_then(|o| o.active)
            .and_then(|k| sessions.iter().position(|s| s.key == k))
            .unwrap_or(0);
        let peer = Peer {
            spec,
            sessions,
            active: AtomicUsize::new(active),
            shared,
        };
        for r in &peer.spec.routes {
            match r {
                IpNet::V4(n) => self.lpm4.insert(*n, idx),
                IpNet::V6(n) => self.lpm6.insert(*n, idx),
            };
        }
        self.peers.push(peer);
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.public.to_bytes())
    }

    /// Nanoseconds from this link's epoch to `now`; never 0.
    fn ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    /// When `peer` last sent us an authenticated packet.
    pub fn last_rx(&self, peer: &Peer) -> Option<Instant> {
        match peer.stats().last_rx.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.epoch + Duration::from_nanos(ns - 1)),
        }
    }

    pub fn endpoint(&self, peer: &Peer) -> Option<SocketAddr> {
        *peer.shared.endpoint.read().expect("not poisoned")
    }

    pub fn reset_rate_limiter(&self) {
        self.rate_limiter.reset_count();
    }

    fn peer_for(&self, dst: IpAddr) -> Option<usize> {
        match dst {
            IpAddr::V4(a) => self.lpm4.get_lpm(&Ipv4Net::from(a)).map(|(_, i)| *i),
            IpAddr::V6(a) => self.lpm6.get_lpm(&Ipv6Net::from(a)).map(|(_, i)| *i),
        }
    }

    /// The peer a packet from the tun device is for (what [`Link::outbound`] looks up).
    pub fn peer_of(&self, packet: &[u8]) -> Option<usize> {
        self.peer_for(Tunn::dst_address(packet)?)
    }

    /// Peer `idx`'s send order: a transmit thread holds it from sealing a batch for the peer
    /// until the batch is sent. Each sealed packet takes the session's next counter; with
    /// several transmit threads, a thread preempted between sealing and sending would let the
    /// others' later counters arrive first, and more than the receiver's replay window (1,024
    /// packets in boringtun) behind is dropped as a replay. Measured: 5,601 of 2.3 million
    /// packets over one link with two queues, before this lock.
    pub fn send_order(&self, idx: usize) -> Option<std::sync::MutexGuard<'_, ()>> {
        let p = self.peers.get(idx)?;
        Some(p.shared.send_order.lock().expect("not poisoned"))
    }

    /// A packet from the tun device. `out` must hold `packet.len() + 32` and at least 148
    /// bytes.
    pub fn outbound(&self, packet: &[u8], out: &mut [u8], now: Instant) -> Outbound {
        let Some(dst) = Tunn::dst_address(packet) else {
            return Outbound::Drop(DropReason::NotIp);
        };
        let Some(idx) = self.peer_for(dst) else {
            self.stats.no_route.fetch_add(1, Ordering::Relaxed);
            return Outbound::Drop(DropReason::NoRoute);
        };
        self.outbound_to(idx, packet, out, now)
    }

    /// [`Link::outbound`] for a packet whose peer the caller looked up already
    /// ([`Link::peer_of`]: the transmit thread needs it for the send order, and one lookup
    /// per packet is enough).
    pub fn outbound_to(&self, idx: usize, packet: &[u8], out: &mut [u8], now: Instant) -> Outbound {
        let Some(peer) = self.peers.get(idx) else {
            return Outbound::Drop(DropReason::NoRoute);
        };
        let Some(endpoint) = self.endpoint(peer) else {
            return Outbound::Queued;
        };
        // A SYN leaving into the tunnel announces an MSS that fits it. The tun segment is
        // shared, so the SYN is copied: onto the stack (a SYN flood allocates nothing).
        let mut stack: [u8; SYN_COPY];
        let mut heap: Vec<u8>;
        let packet: &[u8] = match self.clamp_mtu {
            Some(mtu) if mss::is_syn(packet) => {
                let copy: &mut [u8] = if packet.len() <= SYN_COPY {
                    stack = [0u8; SYN_COPY];
                    stack[..packet.len()].copy_from_slice(packet);
                    &mut stack[..packet.len()]
                } else {
                    heap = packet.to_vec();
                    &mut heap[..]
                };
                if mss::clamp(copy, mtu) {
                    peer.stats().mss_clamped.fetch_add(1, Ordering::Relaxed);
                }
                copy
            }
            _ => packet,
        };
        let res = peer
            .active()
            .tunn
            .lock()
            .expect("not poisoned")
            .encapsulate(packet, out);
        match res {
            TunnResult::WriteToNetwork(b) => {
                let n = b.len();
                peer.stats()
                    .tx_bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
                peer.stats().tx_packets.fetch_add(1, Ordering::Relaxed);
                peer.stats().last_tx.store(self.ns(now), Ordering::Relaxed);
                Outbound::Send(endpoint, n)
            }
            TunnResult::Done => Outbound::Queued,
            _ => Outbound::Drop(DropReason::Invalid),
        }
    }

    /// Which peer and session a datagram is for, without touching any session.
    fn classify(
        &self,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<(usize, usize), Option<Vec<u8>>> {
        let packet = Tunn::parse_incoming_packet(datagram).map_err(|_| None)?;
        if matches!(
            packet,
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
        ) {
            // Every handshake message is counted here, once: mac1 authenticated (and a cookie
            // demanded under load) before the DH work of identifying the sender, so a flood of
            // garbage handshakes costs a hash each.
            let mut cookie = [0u8; 64];
            match self
                .rate_limiter
                .verify_packet(Some(from.ip()), datagram, &mut cookie)
            {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(c)) => {
                    self.stats.cookies.fetch_add(1, Ordering::Relaxed);
                    return Err(Some(c.to_vec()));
                }
                Err(_) => return Err(None),
            }
        }
        let receiver = match &packet {
            Packet::HandshakeInit(init) => {
                let half =
                    parse_handshake_anon(&self.private, &self.public, init).map_err(|_| None)?;
                return self
                    .by_key
                    .get(&PublicKey(half.peer_static_public))
                    .copied()
                    .ok_or(None);
            }
            Packet::HandshakeResponse(p) => p.receiver_idx,
            Packet::PacketCookieReply(p) => p.receiver_idx,
            Packet::PacketData(p) => p.receiver_idx,
        };
        // Tunn::new(index) puts the index in the top 24 bits.
        self.by_index.get(&(receiver >> 8)).copied().ok_or(None)
    }

    /// A datagram from the network. `out` must hold `MAX_PACKET` bytes.
    pub fn inbound(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Inbound {
        let mut result = Inbound::default();
        let (idx, sx) = match self.classify(from, datagram) {
            Ok(i) => i,
            Err(cookie) => {
                if let Some(c) = cookie {
                    result.to_net.push((from, c));
                } else {
                    self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                    result.dropped = Some(DropReason::Invalid);
                }
                return result;
            }
        };
        let peer = &self.peers[idx];
        // A roaming peer (a node, seen from a gateway) heard within two keepalives holds its
        // endpoint: a handshake initiation for its key from anywhere else is a second instance
        // claiming the same slot, refused before its session could displace the live one.
        // Data from a new address still roams (NAT rebinding, a relay change), and once the
        // holder falls silent the claimant's next handshake is taken.
        if datagram.first() == Some(&1) && peer.spec.endpoint.is_none() {
            let held = *peer.shared.endpoint.read().expect("not poisoned");
            let heard = peer.stats().last_rx.load(Ordering::Relaxed);
            let fresh = heard != 0
                && self.ns(now).saturating_sub(heard) < 2 * self.keepalive_ms as u64 * 1_000_000;
            if held.is_some_and(|h| h != from) && fresh {
                peer.stats().claims_refused.fetch_add(1, Ordering::Relaxed);
                *peer.shared.claimant.lock().expect("not poisoned") = Some(from);
                result.dropped = Some(DropReason::Claimed);
                return result;
            }
        }
        let is_handshake = matches!(datagram.first(), Some(1) | Some(2));
        let mut tunn = peer.sessions[sx].tunn.lock().expect("not poisoned");
        let mut authenticated = false;
        let mut spoofed = false;
        match tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::WriteToNetwork(b) => {
                // A handshake answered (a response, or a keepalive after one) proves the peer;
                // a cookie reply (type 3), which boringtun sends under load before any
                // crypto, proves nothing: the datagram may be a replay from anywhere.
                authenticated = b.first() != Some(&3);
                result.to_net.push((from, b.to_vec()));
                // Packets queued behind the handshake go out now.
                let mut buf = vec![0u8; MAX_PACKET];
                while let TunnResult::WriteToNetwork(b) = tunn.decapsulate(None, &[], &mut buf) {
                    result.to_net.push((from, b.to_vec()));
                }
            }
            TunnResult::WriteToTunnelV4(p, _) if crate::datapath::probe::parse(p).is_some() => {
                authenticated = true;
                let probe = crate::datapath::probe::parse(p).expect("matched above");
                peer.stats()
                    .peer_hears_us
                    .store(probe.hears_you, Ordering::Relaxed);
                peer.stats()
                    .peer_draining
                    .store(probe.draining, Ordering::Relaxed);
                peer.stats()
                    .peer_drains_us
                    .store(probe.drain_you, Ordering::Relaxed);
                peer.stats()
                    .peer_next_tag
                    .store(tag_word(probe.next_tag), Ordering::Relaxed);
                peer.stats()
                    .last_probe
                    .store(self.ns(now), Ordering::Relaxed);
            }
            TunnResult::WriteToTunnelV4(p, _) if offload::parse(p).is_some() => {
                authenticated = true;
                match offload::parse(p).expect("matched above") {
                    offload::Check::Train { train, .. } => peer
                        .stats()
                        .check_heard
                        .lock()
                        .expect("not poisoned")
                        .count(train),
                    offload::Check::Report { heard } => {
                        *peer.stats().check_report.lock().expect("not poisoned") = Some(heard)
                    }
                }
            }
            TunnResult::WriteToTunnelV4(p, src) => {
                authenticated = true;
                spoofed = !allowed(&peer.spec.allowed, IpAddr::V4(src));
                result.to_tun = (!spoofed && !self.refused(p)).then_some(p.len());
            }
            TunnResult::WriteToTunnelV6(p, src) => {
                authenticated = true;
                spoofed = !allowed(&peer.spec.allowed, IpAddr::V6(src));
                result.to_tun = (!spoofed && !self.refused(p)).then_some(p.len());
            }
            // A keepalive (a data packet that decrypted) or a completed handshake: nothing to
            // deliver. A cookie reply is consumed the same way but proves nothing (anyone who
            // saw one can replay it).
            TunnResult::Done => authenticated = datagram.first() != Some(&3),
            // Replays, bad tags, stale handshakes: counted, never fatal.
            TunnResult::Err(e) => {
                if matches!(
                    e,
                    WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter
                ) {
                    self.stats.replayed.fetch_add(1, Ordering::Relaxed);
                }
                self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                result.dropped = Some(if matches!(e, WireGuardError::InvalidAeadTag) {
                    DropReason::Unauthentic
                } else {
                    DropReason::Invalid
                });
            }
        }
        drop(tunn);
        if authenticated {
            peer.stats().last_rx.store(self.ns(now), Ordering::Relaxed);
            // Roaming: the peer is wherever its last authenticated packet came from (a node
            // behind NAT is known only by its translated address).
            // Anything but an initiation it sent proves this session live at the peer: packets
            // go out on it from now on (a rotating peer has moved to this key).
            if datagram.first() != Some(&1) && peer.active.load(Ordering::Relaxed) != sx {
                peer.active.store(sx, Ordering::Relaxed);
            }
            // Read first: the write lock only when it moved (the transmit thread reads the
            // endpoint for every packet it sends).
            let moved = *peer.shared.endpoint.read().expect("not poisoned") != Some(from);
            if moved {
                *peer.shared.endpoint.write().expect("not poisoned") = Some(from);
            }
            if is_handshake {
                peer.stats().handshakes.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(n) = result.to_tun {
                peer.stats().rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                peer.stats().rx_packets.fetch_add(1, Ordering::Relaxed);
                // A SYN arriving from the tunnel too (the peer may not clamp).
                if let Some(mtu) = self.clamp_mtu {
                    if mss::clamp(&mut out[..n], mtu) {
                        peer.stats().mss_clamped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if spoofed {
                peer.stats().spoofed.fetch_add(1, Ordering::Relaxed);
                result.dropped = Some(DropReason::Spoofed);
            }
        }
        result.authenticated = authenticated;
        result
    }

    /// Timers and liveness probes: call every few tens of milliseconds. Every
    /// `policy.interval` each peer with a known endpoint gets a probe (an authenticated
    /// keepalive that says whether we hear it on this link); the first one also starts the
    /// handshake when there is no session yet.
    pub fn tick(&self, policy: Liveness, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 256];
        let now_ns = self.ns(now);
        for peer in &self.peers {
            let Some(ep) = self.endpoint(peer) else {
                continue;
            };
            // Every session's timers run (keys expire on time); only the active one's output
            // goes out: the other key's session is idle until the peer proves it live.
            let active = peer
                .active
                .load(Ordering::Relaxed)
                .min(peer.sessions.len() - 1);
            for (_, s) in peer
                .sessions
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != active)
            {
                let _ = s.tunn.lock().expect("not poisoned").update_timers(&mut buf);
            }
            let mut tunn = peer.active().tunn.lock().expect("not poisoned");
            if let TunnResult::WriteToNetwork(b) = tunn.update_timers(&mut buf) {
                out.push((ep, b.to_vec()));
            }
            // Check trains heard since the last tick: say how many, at once (the sender
            // waits for it).
            let mut heard = peer.stats().check_heard.lock().expect("not poisoned");
            if heard.changed {
                let report = offload::report_packet(heard.report());
                drop(heard);
                if let TunnResult::WriteToNetwork(b) = tunn.encapsulate(&report, &mut buf) {
                    out.push((ep, b.to_vec()));
                }
            }
            let last = peer.stats().last_probe_tx.load(Ordering::Relaxed);
            if last == 0 || Duration::from_nanos(now_ns.saturating_sub(last)) >= policy.interval {
                let hears = policy.is_alive(self.last_rx(peer), now);
                let last_re = peer.stats().last_rehandshake.load(Ordering::Relaxed);
                if tunn.stats().0.is_none() {
                    // No session yet: start the handshake rather than queue a probe whose
                    // "hears you" would be stale by the time it is sent.
                    drop(tunn);
                    out.extend(self.initiations(peer, ep, false));
                } else if !hears
                    && peer.spec.endpoint.is_some()
                    && (last_re == 0
                        || Duration::from_nanos(now_ns.saturating_sub(last_re)) >= REHANDSHAKE_DEAD)
                {
                    // The link went silent: the peer may have lost our session (a restart),
                    // or moved to its next key. The dialling side starts a new one, once a
                    // second while it stays silent.
                    peer.stats()
                        .last_rehandshake
                        .store(now_ns, Ordering::Relaxed);
                    drop(tunn);
                    out.extend(self.initiations(peer, ep, true));
                } else {
                    let probe = crate::datapath::probe::packet(crate::datapath::probe::Probe {
                        hears_you: hears,
                        draining: self.draining,
                        drain_you: peer.spec.drain,
                        next_tag: peer.spec.next_key.as_ref().map(crate::datapath::probe::tag),
                    });
                    if let TunnResult::WriteToNetwork(b) = tunn.encapsulate(&probe, &mut buf) {
                        out.push((ep, b.to_vec()));
                    }
                }
                peer.stats().last_probe_tx.store(now_ns, Ordering::Relaxed);
            }
        }
        out
    }

    /// Is the link to `peer` usable in both directions? We must have heard it within the
    /// deadline and, if it is an appliance (it sends probes), it must say that it hears us.
    /// A peer that never sent a probe (wireguard-go, say) is judged on what we receive.
    pub fn alive(&self, peer: &Peer, policy: Liveness, now: Instant) -> bool {
        if !policy.is_alive(self.last_rx(peer), now) {
            return false;
        }
        match peer.stats().last_probe.load(Ordering::Relaxed) {
            0 => true,
            ns => {
                let at = self.epoch + Duration::from_nanos(ns - 1);
                policy.is_alive(Some(at), now) && peer.stats().peer_hears_us.load(Ordering::Relaxed)
            }
        }
    }

    /// The peer a GSO self-check runs with: the first one live on this link that sends probes
    /// (an appliance, which answers checks).
    pub fn check_peer(&self, policy: Liveness, now: Instant) -> Option<usize> {
        self.peers.iter().position(|p| {
            p.stats().last_probe.load(Ordering::Relaxed) != 0 && self.alive(p, policy, now)
        })
    }

    /// Peer `idx`'s last report on our check trains.
    pub fn check_report(&self, idx: usize) -> Option<[(u16, u16); 2]> {
        *self
            .peers
            .get(idx)?
            .stats()
            .check_report
            .lock()
            .expect("not poisoned")
    }

    /// Check train `train` for peer `idx`, sealed: its endpoint and the datagrams (all the
    /// same size). Empty when the peer has no endpoint or session.
    pub fn check_train(&self, idx: usize, train: u16) -> Option<(SocketAddr, Vec<Vec<u8>>)> {
        let peer = self.peers.get(idx)?;
        let ep = self.endpoint(peer)?;
        let mut tunn = peer.active().tunn.lock().expect("not poisoned");
        let mut buf = vec![0u8; offload::TRAIN_PACKET + 64];
        let datagrams = (0..offload::TRAIN)
            .filter_map(|seq| {
                match tunn.encapsulate(&offload::train_packet(train, seq), &mut buf) {
                    TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
                    _ => None,
                }
            })
            .collect::<Vec<_>>();
        (datagrams.len() == usize::from(offload::TRAIN)).then_some((ep, datagrams))
    }

    /// A handshake initiation on each of `peer`'s sessions: the one whose key the peer holds
    /// now completes, the others are refused by it.
    fn initiations(&self, peer: &Peer, ep: SocketAddr, force: bool) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut buf = [0u8; 256];
        peer.sessions
            .iter()
            .filter_map(|s| {
                let mut tunn = s.tunn.lock().expect("not poisoned");
                match tunn.format_handshake_initiation(&mut buf, force) {
                    TunnResult::WriteToNetwork(b) => Some((ep, b.to_vec())),
                    _ => None,
                }
            })
            .collect()
    }

    /// Handshake initiations to every peer whose endpoint is known: a link that moved to a
    /// new key of ours ([`Link::rekeyed`]) says so at once rather than at its next probe.
    pub fn initiate(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.initiate_to(|_| true)
    }

    /// [`Link::initiate`], to the peers `to` names.
    pub fn initiate_to(&self, to: impl Fn(&str) -> bool) -> Vec<(SocketAddr, Vec<u8>)> {
        self.peers
            .iter()
            .filter(|p| to(&p.spec.name))
            .filter_map(|p| self.endpoint(p).map(|ep| (p, ep)))
            .flat_map(|(p, ep)| self.initiations(p, ep, true))
            .collect()
    }

    /// The peers holding a session with this link's key (a handshake completed since it was
    /// built or [`Link::rekeyed`]).
    pub fn established_peers(&self) -> std::collections::BTreeSet<String> {
        self.peers
            .iter()
            .filter(|p| {
                p.sessions
                    .iter()
                    .any(|s| s.tunn.lock().expect("not poisoned").stats().0.is_some())
            })
            .map(|p| p.spec.name.clone())
            .collect()
    }

    /// The peers a key rotation may move this link for: those whose probes say their site
    /// file lists our next key, and those that never probe (not appliances: nothing to wait
    /// for).
    pub fn ready_for_next_key(&self, next: &PublicKey) -> std::collections::BTreeSet<String> {
        let want = tag_word(Some(crate::datapath::probe::tag(next)));
        // A peer counts as one that never probes only once its session is older than three
        // keepalives (an appliance's first probe follows its handshake within one).
        let settled = Duration::from_millis(3 * self.keepalive_ms as u64);
        self.peers
            .iter()
            .filter(|p| match p.stats().last_probe.load(Ordering::Relaxed) {
                0 => self.handshake_age(p).is_some_and(|a| a > settled),
                _ => p.stats().peer_next_tag.load(Ordering::Relaxed) == want,
            })
            .map(|p| p.spec.name.clone())
            .collect()
    }

    /// This link's private key (a key rotation moving it back).
    pub fn private_key(&self) -> PrivateKey {
        PrivateKey(self.private.to_bytes())
    }

    /// Seconds since the last completed handshake with `peer`, as boringtun tracks it.
    pub fn handshake_age(&self, peer: &Peer) -> Option<Duration> {
        peer.active().tunn.lock().expect("not poisoned").stats().0
    }
}

/// A probe's next-key tag as one word: bit 24 set when there is one.
fn tag_word(tag: Option<[u8; 3]>) -> u32 {
    tag.map_or(0, |t| 1 << 24 | u32::from_be_bytes([0, t[0], t[1], t[2]]))
}

fn allowed(prefixes: &[IpNet], src: IpAddr) -> bool {
    prefixes.iter().any(|p| p.contains(&src))
}

/// Status of one peer on one link, for `appliance status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct PeerStatus {
    pub link: String,
    pub link_index: u32,
    pub peer: String,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub handshake_age_ms: Option<u64>,
    pub last_rx_age_ms: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub handshakes: u64,
    pub spoofed: u64,
    pub alive: bool,
    /// The prefixes this link sends to the peer (its datapath table).
    pub routes: Vec<String>,
    /// TCP SYNs whose MSS was clamped to fit the tunnel (both directions).
    #[serde(default)]
    pub mss_clamped: u64,
    /// Times this (link, peer) went live or dead (filled in by the daemon, which tracks it).
    #[serde(default)]
    pub transitions: u64,
    /// Handshakes refused while the peer was live elsewhere, and the last claimant's address.
    #[serde(default)]
    pub claims_refused: u64,
    #[serde(default)]
    pub claimant: Option<String>,
    /// The peer says it is a drained gateway.
    #[serde(default)]
    pub draining: bool,
}

/// A link device's own counters: what no peer is charged with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeviceStatus {
    pub link: String,
    /// This host's key on this link (a key rotation moves links one at a time).
    #[serde(default)]
    pub public_key: String,
    /// Datagrams dropped as not WireGuard, failing authentication or naming no peer.
    pub invalid: u64,
    /// Of those, data packets dropped as replays.
    pub replayed: u64,
    /// Packets from the tun device with no peer for their destination.
    pub no_route: u64,
    /// Handshakes answered with a cookie instead (rate-limited).
    pub cookies: u64,
    /// New TCP connections refused while the node drains.
    #[serde(default)]
    pub refused_syns: u64,
    /// UDP GSO writes refused by the kernel (sent datagram by datagram instead).
    #[serde(default)]
    pub gso_errors: u64,
    /// Datagrams dropped because the UDP socket buffer stayed full.
    #[serde(default)]
    pub send_dropped: u64,
    /// Per tun queue (worker pair) of the link: what each moved. Filled by the daemon, which
    /// runs the queues.
    #[serde(default)]
    pub queues: Vec<QueueStatus>,
    /// What the UDP GSO self-check found (broken: the link sends datagram by datagram), with
    /// the peer whose report decided and how many checks ran. Filled by the daemon.
    #[serde(default)]
    pub udp_gso: offload::Verdict,
    #[serde(default)]
    pub gso_checked_with: Option<String>,
    #[serde(default)]
    pub gso_checks: u64,
    /// The tun device refused a coalesced write: decrypted packets are written one by one.
    #[serde(default)]
    pub tun_gro_off: bool,
    /// Batches of decrypted packets the tun device refused (each lost; TCP resends).
    #[serde(default)]
    pub tun_write_errors: u64,
}

/// What one queue of a link device moved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct QueueStatus {
    /// Packets read from the tun queue (segments of super-packets counted one by one).
    pub tun_packets: u64,
    /// Datagrams received on the queue's UDP socket.
    pub udp_datagrams: u64,
    /// Reads from the tun queue: `tun_packets` per read above 1 means the kernel hands the
    /// link TCP super-packets (tun offload in effect; `ethtool -K DEV tso off` ends it).
    #[serde(default)]
    pub tun_reads: u64,
    /// Of those, reads a receive thread made itself to send the replies its writes caused
    /// (a ping's echo, a request's answer) without waking the transmit thread.
    #[serde(default)]
    pub tun_replies: u64,
    /// The queue's receive thread found UDP GRO broken and turned it off on its socket (it
    /// is tried again every 10 minutes), and how many times that happened.
    #[serde(default)]
    pub udp_gro_off: bool,
    #[serde(default)]
    pub udp_gro_offs: u64,
}

impl Link {
    pub fn status(&self, alive: &dyn Fn(&str, u32) -> bool, now: Instant) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|p| PeerStatus {
                link: self.spec_dev.clone(),
                link_index: self.index,
                peer: p.spec.name.clone(),
                public_key: p.spec.public_key.to_string(),
                endpoint: self.endpoint(p).map(|e| e.to_string()),
                handshake_age_ms: self.handshake_age(p).map(|d| d.as_millis() as u64),
                last_rx_age_ms: self
                    .last_rx(p)
                    .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                rx_bytes: p.stats().rx_bytes.load(Ordering::Relaxed),
                tx_bytes: p.stats().tx_bytes.load(Ordering::Relaxed),
                rx_packets: p.stats().rx_packets.load(Ordering::Relaxed),
                tx_packets: p.stats().tx_packets.load(Ordering::Relaxed),
                handshakes: p.stats().handshakes.load(Ordering::Relaxed),
                spoofed: p.stats().spoofed.load(Ordering::Relaxed),
                alive: alive(&p.spec.name, self.index),
                routes: p.spec.routes.iter().map(|r| r.to_string()).collect(),
                mss_clamped: p.stats().mss_clamped.load(Ordering::Relaxed),
                transitions: 0,
                claims_refused: p.stats().claims_refused.load(Ordering::Relaxed),
                claimant: p
                    .shared
                    .claimant
                    .lock()
                    .expect("not poisoned")
                    .map(|a| a.to_string()),
                draining: p.stats().peer_draining.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Whether any peer's handshakes were refused as claims (cheap: no status is built).
    pub fn any_claims(&self) -> bool {
        self.peers
            .iter()
            .any(|p| p.stats().claims_refused.load(Ordering::Relaxed) > 0)
    }

    /// While `on`, new TCP connections arriving through this link are dropped (a draining
    /// node takes no new work); running ones and the node's own new connections are not.
    pub fn refuse_new_connections(&self, on: bool) {
        self.refuse_new.store(on, Ordering::Relaxed);
    }

    /// A packet from the tunnel that a draining node refuses (counted).
    fn refused(&self, p: &[u8]) -> bool {
        let refuse = self.refuse_new.load(Ordering::Relaxed) && mss::is_new_connection(p);
        if refuse {
            self.stats.refused_syns.fetch_add(1, Ordering::Relaxed);
        }
        refuse
    }

    /// The peers (gateways) whose last probe on this link asked this node to drain.
    pub fn drain_asked_by(&self) -> impl Iterator<Item = &str> {
        self.peers
            .iter()
            .filter(|p| p.stats().peer_drains_us.load(Ordering::Relaxed))
            .map(|p| p.spec.name.as_str())
    }

    /// The peers whose last probe on this link said they are drained.
    pub fn draining_peers(&self) -> impl Iterator<Item = &str> {
        self.peers
            .iter()
            .filter(|p| p.stats().peer_draining.load(Ordering::Relaxed))
            .map(|p| p.spec.name.as_str())
    }

    pub fn device_status(&self) -> DeviceStatus {
        let s = &self.stats;
        DeviceStatus {
            link: self.spec_dev.clone(),
            public_key: self.public_key().to_string(),
            invalid: s.invalid.load(Ordering::Relaxed),
            replayed: s.replayed.load(Ordering::Relaxed),
            no_route: s.no_route.load(Ordering::Relaxed),
            cookies: s.cookies.load(Ordering::Relaxed),
            refused_syns: s.refused_syns.load(Ordering::Relaxed),
            gso_errors: s.gso_errors.load(Ordering::Relaxed),
            send_dropped: s.send_dropped.load(Ordering::Relaxed),
            tun_write_errors: s.tun_write_errors.load(Ordering::Relaxed),
            ..DeviceStatus::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::links::{LinkSpec, PeerSpec};

    const P: Liveness = Liveness {
        interval: Duration::from_millis(300),
        dead_after: 3,
    };
    const GW: &str = "192.0.2.1:51820";
    const NODE: &str = "203.0.113.7:40000";

    /// The tests' clock: one fixed instant, moved forward by hand.
    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    /// A gateway link and a node link, back to back, node 10.200.0.11/32, both clamping.
    fn pair() -> (Link, Link) {
        pair_with(Some(1420), Some(1420))
    }

    fn pair_with(gw_clamp: Option<u32>, node_clamp: Option<u32>) -> (Link, Link) {
        let (gk, nk) = (PrivateKey::generate(), PrivateKey::generate());
        links(&gk, &nk, gw_clamp, node_clamp)
    }

    /// A gateway link with key `gk` and a node link with key `nk`.
    fn links(
        gk: &PrivateKey,
        nk: &PrivateKey,
        gw_clamp: Option<u32>,
        node_clamp: Option<u32>,
    ) -> (Link, Link) {
        (
            Link::new(&gw_spec(nk.public(), None, gw_clamp), gk, t0()),
            Link::new(&node_spec(gk.public(), None, node_clamp), nk, t0()),
        )
    }

    /// The gateway's link 0, its one peer node c1 (10.200.0.11) holding `key` (and `next`).
    fn gw_spec(key: PublicKey, next: Option<PublicKey>, clamp: Option<u32>) -> LinkSpec {
        LinkSpec {
            dev: "ap-l0".into(),
            index: 0,
            listen_port: Some(51820),
            v6_underlay: false,
            clamp_mtu: clamp,
            keepalive_ms: 300,
            draining: false,
            peers: vec![PeerSpec {
                name: "c1".into(),
                public_key: key,
                next_key: next,
                endpoint: None,
                allowed: vec!["10.200.0.11/32".parse().unwrap()],
                routes: vec!["10.200.0.11/32".parse().unwrap()],
                drain: false,
            }],
        }
    }

    /// The node's link 0 to gateway gw1 holding `key` (and `next`).
    fn node_spec(key: PublicKey, next: Option<PublicKey>, clamp: Option<u32>) -> LinkSpec {
        LinkSpec {
            dev: "ap-gw1-0".into(),
            index: 0,
            listen_port: None,
            v6_underlay: false,
            clamp_mtu: clamp,
            keepalive_ms: 300,
            draining: false,
            peers: vec![PeerSpec {
                name: "gw1".into(),
                public_key: key,
                next_key: next,
                endpoint: Some(GW.parse().unwrap()),
                allowed: vec!["10.10.0.0/16".parse().unwrap()],
                routes: vec!["10.10.0.0/16".parse().unwrap()],
                drain: false,
            }],
        }
    }

    /// Deliver datagrams back and forth until nothing is left; returns packets that reached
    /// each side's tun device.
    fn pump(gw: &Link, node: &Link, to_gw: Vec<Vec<u8>>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        pump_both(gw, node, to_gw, Vec::new())
    }

    /// [`pump`], with datagrams for the node too.
    fn pump_both(
        gw: &Link,
        node: &Link,
        mut to_gw: Vec<Vec<u8>>,
        mut to_node: Vec<Vec<u8>>,
    ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut at_gw, mut at_node) = (Vec::new(), Vec::new());
        let mut out = vec![0u8; MAX_PACKET];
        for _ in 0..10 {
            for d in std::mem::take(&mut to_gw) {
                let r = gw.inbound(NODE.parse().unwrap(), &d, &mut out, t0());
                if let Some(n) = r.to_tun {
                    at_gw.push(out[..n].to_vec());
                }
                to_node.extend(r.to_net.into_iter().map(|(_, d)| d));
            }
            for d in std::mem::take(&mut to_node) {
                let r = node.inbound(GW.parse().unwrap(), &d, &mut out, t0());
                if let Some(n) = r.to_tun {
                    at_node.push(out[..n].to_vec());
                }
                to_gw.extend(r.to_net.into_iter().map(|(_, d)| d));
            }
        }
        (at_gw, at_node)
    }

    fn ipv4_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let len = 20 + payload.len();
        let mut p = vec![
            0x45,
            0,
            (len >> 8) as u8,
            len as u8,
            0,
            0,
            0,
            0,
            64,
            17,
            0,
            0,
        ];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(payload);
        p
    }

    /// `packet` encrypted by `from` for its peer, as the datagram on the wire.
    fn seal(from: &Link, packet: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; MAX_PACKET];
        let Outbound::Send(_, n) = from.outbound(packet, &mut out, t0()) else {
            panic!("no session to send on")
        };
        out[..n].to_vec()
    }

    fn connect(gw: &Link, node: &Link) {
        let hello = node.tick(P, t0());
        // On each of the gateway's keys (two while it rotates).
        let keys = node.peers()[0].spec.keys().count();
        assert_eq!(hello.len(), keys, "the node initiates");
        pump(gw, node, hello.into_iter().map(|(_, d)| d).collect());
        assert_eq!(gw.peers()[0].stats().handshakes.load(Ordering::Relaxed), 1);
    }

    /// Only a datagram that decrypted, or a handshake that completed, says where a peer is and
    /// that it lives. Under load (more initiations in a second than the link's limit),
    /// boringtun answers a handshake message with a cookie reply before any crypto: a replayed
    /// handshake response from a forged address once moved the peer's endpoint there and
    /// refreshed its liveness. Nor does a cookie reply, which anyone who saw one can replay.
    #[test]
    fn under_load_a_replayed_handshake_or_cookie_reply_moves_no_endpoint_and_proves_no_life() {
        let attacker: SocketAddr = "198.51.100.66:9999".parse().unwrap();
        let mut out = vec![0u8; MAX_PACKET];
        let (gw, node) = pair();
        let hello = node.tick(P, t0());
        let r = gw.inbound(NODE.parse().unwrap(), &hello[0].1, &mut out, t0());
        let response = r.to_net[0].1.clone();
        assert_eq!(response[0], 2, "a handshake response");
        node.inbound(GW.parse().unwrap(), &response, &mut out, t0());
        let seen = node.last_rx(&node.peers()[0]);
        assert!(seen.is_some());
        // The node's link under load: more valid handshake messages than its limit.
        for _ in 0..=HANDSHAKE_RATE_LIMIT {
            let mut c = [0u8; 64];
            let _ = node.rate_limiter.verify_packet(None, &response, &mut c);
        }
        let later = t0() + Duration::from_secs(5);
        let r = node.inbound(attacker, &response, &mut out, later);
        assert!(
            r.to_net.iter().all(|(_, d)| d[0] == 3),
            "at most a cookie reply goes back"
        );
        assert_eq!(node.endpoint(&node.peers()[0]), Some(GW.parse().unwrap()));
        assert_eq!(node.last_rx(&node.peers()[0]), seen, "no life proven");

        // A cookie reply from a gateway under load, then replayed from elsewhere.
        let (gw, node) = pair();
        let hello = node.tick(P, t0());
        for _ in 0..=HANDSHAKE_RATE_LIMIT {
            let mut c = [0u8; 64];
            let _ = gw.rate_limiter.verify_packet(None, &hello[0].1, &mut c);
        }
        let r = gw.inbound(NODE.parse().unwrap(), &hello[0].1, &mut out, t0());
        let cookie = r.to_net[0].1.clone();
        assert_eq!(cookie[0], 3, "a cookie reply");
        node.inbound(GW.parse().unwrap(), &cookie, &mut out, t0());
        node.inbound(attacker, &cookie, &mut out, later);
        assert_eq!(node.endpoint(&node.peers()[0]), Some(GW.parse().unwrap()));
        assert_eq!(
            node.last_rx(&node.peers()[0]),
            None,
            "a cookie proves no life"
        );
    }

    /// Each handshake message counts once against the link's limit: 60 initiations in a
    /// second (limit 100) leave the link out of load. They used to be counted twice (once
    /// before identifying the sender, once again inside boringtun), so 51 put it under load.
    #[test]
    fn a_handshake_initiation_counts_once_against_the_rate_limit() {
        let (gw, node) = pair();
        let hello = node.tick(P, t0());
        let mut out = vec![0u8; MAX_PACKET];
        for _ in 0..60 {
            gw.inbound(NODE.parse().unwrap(), &hello[0].1, &mut out, t0());
        }
        assert_eq!(gw.stats.cookies.load(Ordering::Relaxed), 0);
        let mut c = [0u8; 64];
        assert!(
            gw.rate_limiter
                .verify_packet(
                    Some(NODE.parse::<SocketAddr>().unwrap().ip()),
                    &hello[0].1,
                    &mut c
                )
                .is_ok(),
            "the 61st is not asked for a cookie"
        );
    }

    /// Two instances with one slot's key: the second one's handshakes are refused while the
    /// first is live (it would displace the live session), counted with the claimant's
    /// address; once the first has been silent for two keepalives, the second takes over.
    #[test]
    fn a_second_instance_with_a_live_slots_key_is_refused_until_the_slot_falls_silent() {
        let (gk, nk) = (PrivateKey::generate(), PrivateKey::generate());
        let (gw, node) = links(&gk, &nk, None, None);
        let (_, twin) = links(&gk, &nk, None, None);
        connect(&gw, &node);
        let claimant: SocketAddr = "203.0.113.99:40000".parse().unwrap();
        let mut out = vec![0u8; MAX_PACKET];
        let hello = twin.tick(P, t0());
        let soon = t0() + Duration::from_millis(100);
        let r = gw.inbound(claimant, &hello[0].1, &mut out, soon);
        assert!(matches!(r.dropped, Some(DropReason::Claimed)), "{r:?}");
        assert!(
            r.to_net.is_empty(),
            "no handshake response goes to the claimant"
        );
        let p = &gw.peers()[0];
        assert_eq!(p.stats().claims_refused.load(Ordering::Relaxed), 1);
        assert_eq!(
            gw.endpoint(p),
            Some(NODE.parse().unwrap()),
            "the holder keeps it"
        );
        let st = gw.status(&|_, _| true, soon);
        assert_eq!(st[0].claimant.as_deref(), Some("203.0.113.99:40000"));
        // The holder's traffic still flows.
        let (at_gw, _) = pump(
            &gw,
            &node,
            vec![seal(
                &node,
                &ipv4_packet([10, 200, 0, 11], [10, 10, 0, 1], b"x"),
            )],
        );
        assert_eq!(at_gw.len(), 1);
        // Silent for more than two keepalives (600 ms): the slot is free.
        let later = t0() + Duration::from_millis(700);
        let r = gw.inbound(claimant, &hello[0].1, &mut out, later);
        assert!(r.dropped.is_none(), "{r:?}");
        assert_eq!(r.to_net[0].1[0], 2, "answered with a handshake response");
        assert_eq!(gw.endpoint(p), Some(claimant));
    }

    fn handshakes(l: &Link) -> u64 {
        l.peers()[0].stats().handshakes.load(Ordering::Relaxed)
    }

    const UP: ([u8; 4], [u8; 4]) = ([10, 200, 0, 11], [10, 10, 0, 1]);
    const DOWN: ([u8; 4], [u8; 4]) = ([10, 10, 0, 1], [10, 200, 0, 11]);

    /// One packet each way; asserts both arrive.
    fn both_ways(gw: &Link, node: &Link, what: &str) {
        let up = ipv4_packet(UP.0, UP.1, what.as_bytes());
        let (at_gw, _) = pump(gw, node, vec![seal(node, &up)]);
        assert_eq!(at_gw, vec![up], "node → gateway: {what}");
        let down = ipv4_packet(DOWN.0, DOWN.1, what.as_bytes());
        let (_, at_node) = pump_both(gw, node, vec![], vec![seal(gw, &down)]);
        assert_eq!(at_node, vec![down], "gateway → node: {what}");
    }

    /// A node rotates: the site file lists its next key beside the current one (the gateway
    /// keeps the running session and adds one), the node moves its link to the next key with
    /// one handshake, traffic flows on it both ways, and once the site file retires the old
    /// key a handshake signed with it is refused while the moved session runs on.
    #[test]
    fn a_node_moves_a_link_to_its_next_key_and_the_retired_key_is_refused() {
        let (gk, old, new) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let (gw, node) = links(&gk, &old, None, None);
        connect(&gw, &node);
        let gw = gw.rebuild(&gw_spec(old.public(), Some(new.public()), None));
        both_ways(&gw, &node, "next key announced");
        assert_eq!(
            handshakes(&gw),
            1,
            "announcing a next key costs no handshake"
        );

        let moved = node.rekeyed(&new);
        assert_eq!(moved.public_key(), new.public());
        let hello = moved.initiate();
        assert_eq!(hello.len(), 1, "the moved link says its new key at once");
        pump(&gw, &moved, hello.into_iter().map(|(_, d)| d).collect());
        assert_eq!(handshakes(&gw), 2, "one handshake moves the link");
        assert_eq!(handshakes(&moved), 2, "the counters survive the move");
        assert!(moved.established_peers().contains("gw1"));
        both_ways(&gw, &moved, "on the next key");

        let retired = gw.rebuild(&gw_spec(new.public(), None, None));
        both_ways(&retired, &moved, "old key retired");
        assert_eq!(handshakes(&retired), 2, "retiring costs no handshake");
        let (_, stale) = links(&gk, &old, None, None);
        let hello = stale.tick(P, t0());
        let mut out = vec![0u8; MAX_PACKET];
        let r = retired.inbound(NODE.parse().unwrap(), &hello[0].1, &mut out, t0());
        assert_eq!(r.dropped, Some(DropReason::Invalid), "{r:?}");
        assert!(r.to_net.is_empty(), "no answer to the retired key");
        assert_eq!(handshakes(&retired), 2);
        both_ways(&retired, &moved, "after the refusal");
    }

    /// A rotating gateway moves a link only for peers whose probes name its next key: a node
    /// whose site file lists another (stale) next key is not ready, nor is an appliance that
    /// has not probed yet.
    #[test]
    fn a_peer_is_ready_for_a_next_key_only_when_its_probe_names_that_key() {
        let (nk, gk, next, stale) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        for (listed, ready) in [
            (None, false),
            (Some(stale.public()), false),
            (Some(next.public()), true),
        ] {
            let gw = Link::new(&gw_spec(nk.public(), None, None), &gk, t0());
            let node = Link::new(&node_spec(gk.public(), listed, None), &nk, t0());
            connect(&gw, &node);
            assert!(
                !gw.ready_for_next_key(&next.public()).contains("c1"),
                "no probe yet, a fresh session: not ready"
            );
            let later = t0() + Duration::from_millis(400);
            let probes = node.tick(P, later);
            pump(&gw, &node, probes.into_iter().map(|(_, d)| d).collect());
            assert_eq!(
                gw.ready_for_next_key(&next.public()).contains("c1"),
                ready,
                "node lists {listed:?}"
            );
        }
    }

    /// A gateway rotates: it knows the node's endpoint, so the moved link's handshake goes
    /// out at once; the node, whose site file lists both keys, answers on the next key's
    /// session and sends on it from then on.
    #[test]
    fn a_gateway_moves_a_link_to_its_next_key_and_the_node_follows_at_once() {
        let (nk, old, new) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let gw = Link::new(&gw_spec(nk.public(), None, None), &old, t0());
        let node = Link::new(
            &node_spec(old.public(), Some(new.public()), None),
            &nk,
            t0(),
        );
        connect(&gw, &node);
        let moved = gw.rekeyed(&new);
        assert!(moved.established_peers().is_empty());
        let hello = moved.initiate();
        assert_eq!(hello.len(), 1);
        assert_eq!(
            hello[0].0,
            NODE.parse::<SocketAddr>().unwrap(),
            "to the learned endpoint"
        );
        pump_both(
            &moved,
            &node,
            vec![],
            hello.into_iter().map(|(_, d)| d).collect(),
        );
        assert_eq!(handshakes(&node), 2);
        assert!(moved.established_peers().contains("c1"));
        both_ways(&moved, &node, "gateway on its next key");
    }

    /// A node whose gateway moved to its next key while the handshake was lost: once the
    /// link is silent the node handshakes again on each of the gateway's keys, and the one
    /// the gateway holds completes.
    #[test]
    fn a_silent_gateway_is_handshaken_again_on_each_of_its_keys() {
        let (nk, old, new) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let gw = Link::new(&gw_spec(nk.public(), None, None), &old, t0());
        let node = Link::new(
            &node_spec(old.public(), Some(new.public()), None),
            &nk,
            t0(),
        );
        connect(&gw, &node);
        let moved = gw.rekeyed(&new);
        let silent = t0() + Duration::from_secs(1);
        let hello = node.tick(P, silent);
        assert_eq!(hello.len(), 2, "one initiation per key: {hello:?}");
        let mut out = vec![0u8; MAX_PACKET];
        let answers: Vec<Inbound> = hello
            .iter()
            .map(|(_, d)| moved.inbound(NODE.parse().unwrap(), d, &mut out, silent))
            .collect();
        assert_eq!(
            answers.iter().filter(|r| r.to_net.len() == 1).count(),
            1,
            "only the key it holds is answered"
        );
        let response = answers
            .into_iter()
            .flat_map(|r| r.to_net)
            .map(|(_, d)| d)
            .collect();
        pump_both(&moved, &node, vec![], response);
        both_ways(&moved, &node, "after the second handshake");
    }

    #[test]
    fn a_node_handshakes_and_the_gateway_learns_its_translated_endpoint() {
        let (gw, node) = pair();
        connect(&gw, &node);
        assert_eq!(gw.endpoint(&gw.peers()[0]), Some(NODE.parse().unwrap()));
        assert!(gw.last_rx(&gw.peers()[0]).is_some());
        assert!(node.last_rx(&node.peers()[0]).is_some());
    }

    #[test]
    fn packets_cross_in_both_directions() {
        let (gw, node) = pair();
        connect(&gw, &node);
        let mut out = vec![0u8; MAX_PACKET];
        let p = ipv4_packet([10, 200, 0, 11], [10, 10, 0, 5], b"hello site");
        let Outbound::Send(_, n) = node.outbound(&p, &mut out, t0()) else {
            panic!()
        };
        let (at_gw, _) = pump(&gw, &node, vec![out[..n].to_vec()]);
        assert_eq!(at_gw, vec![p]);
        let back = ipv4_packet([10, 10, 0, 5], [10, 200, 0, 11], b"hello node");
        let Outbound::Send(ep, n) = gw.outbound(&back, &mut out, t0()) else {
            panic!()
        };
        assert_eq!(ep, NODE.parse().unwrap());
        let d = out[..n].to_vec();
        let r = node.inbound(GW.parse().unwrap(), &d, &mut out, t0());
        assert_eq!(r.to_tun, Some(back.len()));
    }

    /// A TCP SYN from `src` to `dst` announcing MSS 1460.
    fn syn(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = ipv4_packet(src, dst, &[0u8; 24]);
        p[9] = 6;
        let tcp = &mut p[20..];
        tcp[12] = 6 << 4; // 24-byte header
        tcp[13] = 0x02; // SYN
        tcp[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
        p
    }

    /// A draining node drops new connections from the tunnel (a SYN without ACK) and counts
    /// them; a SYN-ACK (its own new connection) and data still pass.
    #[test]
    fn a_draining_node_refuses_new_connections_from_the_tunnel_only() {
        let (gw, node) = pair_with(None, None);
        connect(&gw, &node);
        node.refuse_new_connections(true);
        let mut out = vec![0u8; MAX_PACKET];
        let deliver = |p: &[u8], out: &mut [u8]| {
            node.inbound(GW.parse().unwrap(), &seal(&gw, p), out, t0())
                .to_tun
        };
        let new = syn([10, 10, 0, 1], [10, 200, 0, 11]);
        assert_eq!(deliver(&new, &mut out), None);
        assert_eq!(node.stats.refused_syns.load(Ordering::Relaxed), 1);
        let mut syn_ack = new.clone();
        syn_ack[20 + 13] = 0x12;
        assert!(deliver(&syn_ack, &mut out).is_some());
        assert!(deliver(
            &ipv4_packet([10, 10, 0, 1], [10, 200, 0, 11], b"data"),
            &mut out
        )
        .is_some());
        // Kept across a rebuild (a reload), lifted by undrain.
        let node = node.rebuild(&LinkSpec {
            dev: "ap-gw1-0".into(),
            index: 0,
            listen_port: None,
            v6_underlay: false,
            clamp_mtu: None,
            keepalive_ms: 300,
            draining: false,
            peers: node.peers().iter().map(|p| p.spec.clone()).collect(),
        });
        assert!(node.refuse_new.load(Ordering::Relaxed));
        node.refuse_new_connections(false);
        assert!(node
            .inbound(GW.parse().unwrap(), &seal(&gw, &new), &mut out, t0())
            .to_tun
            .is_some());
    }

    fn mss(p: &[u8]) -> u16 {
        u16::from_be_bytes([p[42], p[43]])
    }

    #[test]
    fn syns_are_clamped_to_the_tunnel_mtu_in_both_directions_and_counted() {
        let (gw, node) = pair();
        connect(&gw, &node);
        let d = seal(&node, &syn([10, 200, 0, 11], [10, 10, 0, 5]));
        let (at_gw, _) = pump(&gw, &node, vec![d]);
        assert_eq!(mss(&at_gw[0]), 1380, "clamped as it left the node");
        assert_eq!(
            node.peers()[0].stats().mss_clamped.load(Ordering::Relaxed),
            1
        );
        // A sender that does not clamp (wireguard-go, or clamping off): the receiver does.
        let (gw, node) = pair_with(None, Some(1420));
        connect(&gw, &node);
        let d = seal(&gw, &syn([10, 10, 0, 5], [10, 200, 0, 11]));
        let mut out = vec![0u8; MAX_PACKET];
        let r = node.inbound(GW.parse().unwrap(), &d, &mut out, t0());
        assert_eq!(mss(&out[..r.to_tun.unwrap()]), 1380);
        assert_eq!(gw.peers()[0].stats().mss_clamped.load(Ordering::Relaxed), 0);
        assert_eq!(
            node.peers()[0].stats().mss_clamped.load(Ordering::Relaxed),
            1
        );
        // Off on both sides: the SYN crosses as it was.
        let (gw, node) = pair_with(None, None);
        connect(&gw, &node);
        let d = seal(&gw, &syn([10, 10, 0, 5], [10, 200, 0, 11]));
        let r = node.inbound(GW.parse().unwrap(), &d, &mut out, t0());
        assert_eq!(mss(&out[..r.to_tun.unwrap()]), 1460);
    }

    #[test]
    fn a_spoofed_inner_source_is_dropped_and_counted() {
        let (gw, node) = pair();
        connect(&gw, &node);
        let mut out = vec![0u8; MAX_PACKET];
        // c1 owns 10.200.0.11 only; it claims to be another node.
        let p = ipv4_packet([10, 200, 0, 12], [10, 10, 0, 5], b"spoof");
        let d = seal(&node, &p);
        let r = gw.inbound(NODE.parse().unwrap(), &d, &mut out, t0());
        assert_eq!(r.to_tun, None);
        assert_eq!(r.dropped, Some(DropReason::Spoofed));
        assert_eq!(gw.peers()[0].stats().spoofed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn replayed_truncated_and_garbage_datagrams_are_dropped_without_panic() {
        let (gw, node) = pair();
        connect(&gw, &node);
        let mut out = vec![0u8; MAX_PACKET];
        let p = ipv4_packet([10, 200, 0, 11], [10, 10, 0, 5], b"once");
        let d = seal(&node, &p);
        let first = gw.inbound(NODE.parse().unwrap(), &d, &mut out, t0());
        assert!(first.to_tun.is_some() && first.authenticated);
        let replay = gw.inbound(NODE.parse().unwrap(), &d, &mut out, t0());
        assert_eq!(
            (replay.to_tun, replay.dropped, replay.authenticated),
            (None, Some(DropReason::Invalid), false)
        );
        for bad in [
            &d[..d.len() - 1],
            &d[..16],
            &[4u8, 0, 0, 0][..],
            &[1u8; 148][..],
            &[9u8; 1000][..],
            &[][..],
        ] {
            let r = gw.inbound(NODE.parse().unwrap(), bad, &mut out, t0());
            // What the UDP GRO watch counts as a failed datagram from this source.
            assert!(
                r.to_tun.is_none() && r.to_net.is_empty() && !r.authenticated,
                "{bad:?}"
            );
        }
        assert!(gw.stats.invalid.load(Ordering::Relaxed) >= 6);
        // A live session's datagram that fails on its tag (tampered, or cut short as a
        // wrongly split GRO train is) is told apart from garbage and replays: the UDP GRO
        // watch counts only reads that start with one.
        let fresh = seal(&node, &p);
        let mut tampered = fresh.clone();
        *tampered.last_mut().unwrap() ^= 1;
        for (what, bad, want) in [
            ("tampered", &tampered[..], DropReason::Unauthentic),
            (
                "cut short",
                &fresh[..fresh.len() - 1],
                DropReason::Unauthentic,
            ),
            ("replayed", &d[..], DropReason::Invalid),
            ("no such session", &[4u8; 64][..], DropReason::Invalid),
        ] {
            let r = gw.inbound(NODE.parse().unwrap(), bad, &mut out, t0());
            assert_eq!(r.dropped, Some(want), "{what}");
        }
        // and the session still works
        let d = seal(&node, &p);
        assert!(gw
            .inbound(NODE.parse().unwrap(), &d, &mut out, t0())
            .to_tun
            .is_some());
    }

    #[test]
    fn a_link_that_fails_in_one_direction_is_dead_on_both_sides() {
        let fast = Liveness {
            interval: Duration::from_millis(5),
            dead_after: 4,
        };
        let (gw, node) = pair();
        connect(&gw, &node);
        let mut out = vec![0u8; MAX_PACKET];
        let (g, n) = (&gw.peers()[0], &node.peers()[0]);
        // Every exchange happens 6 ms (of the tests' clock) after the one before.
        let mut now = t0();
        let mut exchange = |node_to_gw: bool, out: &mut Vec<u8>| {
            now += Duration::from_millis(6);
            for (_, d) in node.tick(fast, now) {
                if node_to_gw {
                    gw.inbound(NODE.parse().unwrap(), &d, out, now);
                }
            }
            for (_, d) in gw.tick(fast, now) {
                node.inbound(GW.parse().unwrap(), &d, out, now);
            }
            now
        };
        let mut at = t0();
        for _ in 0..3 {
            at = exchange(true, &mut out);
        }
        assert!(gw.alive(g, fast, at) && node.alive(n, fast, at));
        // The node's packets stop reaching the gateway; the gateway's still reach the node.
        for _ in 0..8 {
            at = exchange(false, &mut out);
        }
        assert!(!gw.alive(g, fast, at), "the gateway hears nothing");
        assert!(
            !node.alive(n, fast, at),
            "the node hears that the gateway does not hear it"
        );
        for _ in 0..3 {
            at = exchange(true, &mut out);
        }
        assert!(
            gw.alive(g, fast, at) && node.alive(n, fast, at),
            "back when packets return"
        );
    }

    #[test]
    fn a_node_that_stops_hearing_its_gateway_handshakes_again_once_a_second() {
        // A gateway that restarted has lost the session: it drops the node's packets, and
        // boringtun alone would only start over after 15 s of silence.
        let (gw, node) = pair();
        connect(&gw, &node);
        let initiations = |out: &[(SocketAddr, Vec<u8>)]| {
            out.iter()
                .filter(|(_, d)| d.len() == 148 && d[0] == 1)
                .count()
        };
        let mut sent = Vec::new();
        let mut at = t0();
        while at < t0() + P.deadline() + Duration::from_millis(2500) {
            at += P.interval;
            sent.push((at, initiations(&node.tick(P, at))));
        }
        let first = sent.iter().find(|s| s.1 > 0).map(|s| s.0);
        assert_eq!(
            first,
            sent.iter()
                .find(|s| s.0 >= t0() + P.deadline())
                .map(|s| s.0),
            "a new handshake at the first probe after the deadline: {sent:?}"
        );
        let total: usize = sent.iter().map(|s| s.1).sum();
        assert_eq!(total, 3, "then one a second: {sent:?}");
        // The gateway, which never dials, does not.
        let quiet: usize = (1..20)
            .map(|i| initiations(&gw.tick(P, t0() + P.interval * i)))
            .sum();
        assert_eq!(quiet, 0);
    }

    #[test]
    fn liveness_is_judged_on_the_callers_clock() {
        let (gw, node) = pair();
        connect(&gw, &node);
        let g = &gw.peers()[0];
        // The handshake arrived at t0: alive until the deadline, dead from it on.
        assert!(gw.alive(g, P, t0() + P.deadline() - Duration::from_millis(1)));
        assert!(!gw.alive(g, P, t0() + P.deadline()));
        let s = gw.status(&|_, _| true, t0() + Duration::from_millis(250));
        assert_eq!(s[0].last_rx_age_ms, Some(250));
    }

    #[test]
    fn a_gateway_does_not_send_to_a_node_it_has_not_heard_from() {
        let (gw, _node) = pair();
        let mut out = vec![0u8; MAX_PACKET];
        let p = ipv4_packet([10, 10, 0, 5], [10, 200, 0, 11], b"x");
        assert_eq!(gw.outbound(&p, &mut out, t0()), Outbound::Queued);
        let p = ipv4_packet([10, 10, 0, 5], [10, 200, 0, 99], b"x");
        assert_eq!(
            gw.outbound(&p, &mut out, t0()),
            Outbound::Drop(DropReason::NoRoute)
        );
        assert!(gw.tick(P, t0()).is_empty());
    }
}
