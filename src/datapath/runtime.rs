//! Datapath I/O: per link one or more queues, each a tun queue, a UDP socket on the link's
//! port and two threads (tun → UDP and UDP → tun). The threads only move bytes; every decision
//! is [`crate::datapath::engine::Link`]'s, which they share (per-peer state is behind per-peer
//! locks, none global).
//!
//! The link value is swapped atomically on reload (`replace`): the threads pick up the new peer
//! table on their next packet, and peers that were kept keep their sessions.

use crate::datapath::engine::{DropReason, Inbound, Link, LinkStats, Outbound, MAX_PACKET};
use crate::datapath::flow;
use crate::datapath::liveness::Liveness;
use crate::datapath::offload::{GroStep, GroWatch, GsoCheck, Step, Verdict};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tun_rs::{DeviceBuilder, GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// How often blocked threads wake up to notice a stop request.
const WAKE: Duration = Duration::from_millis(200);
/// How long a full socket buffer may hold up the transmit thread before a batch is dropped.
const SEND_WAIT: Duration = Duration::from_millis(5);

pub struct LinkRuntime {
    pub dev: String,
    link: Arc<RwLock<Arc<Link>>>,
    /// The link's queues, each a tun queue and a socket; the sockets are all bound to the
    /// link's port (`SO_REUSEPORT`): the kernel hashes each peer's address onto one of them,
    /// so a peer's datagrams stay in order on one receive thread. Timers, keepalives and the
    /// GSO self-check's trains go out on the first.
    queues: Arc<Vec<TunQueue>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Set when the self-check found UDP GSO broken on this link: the transmit threads send
    /// datagram by datagram.
    gso_off: Arc<AtomicBool>,
    /// Set when the tun device refused a coalesced write: packets are written one by one.
    tun_gro_off: Arc<AtomicBool>,
    check: Mutex<Checked>,
}

/// The link's GSO self-check and who it last ran with.
struct Checked {
    check: GsoCheck,
    with: Option<String>,
}

/// What the GSO self-check says about a link, for status.
#[derive(Debug, Clone)]
pub struct GsoStatus {
    pub verdict: Verdict,
    /// The peer the last check ran with (its report decides).
    pub checked_with: Option<String>,
    pub checks: u64,
}

/// What one queue's threads moved: packets read from its tun queue, datagrams received on its
/// socket (status shows whether the kernel spreads the load over the queues).
#[derive(Debug, Default)]
pub struct QueueStats {
    pub tun_reads: AtomicU64,
    /// Of those, reads a receive thread made to send the replies its own writes caused.
    pub tun_replies: AtomicU64,
    pub tun_packets: AtomicU64,
    pub udp_datagrams: AtomicU64,
    /// The queue's receive thread found UDP GRO broken and turned it off on its socket (see
    /// [`GroWatch`]); how many times it did.
    pub udp_gro_off: AtomicBool,
    pub udp_gro_offs: AtomicU64,
}

/// How many tun queues (each with its transmit and receive thread and its UDP socket) each of
/// `links` link devices gets when the host may use `workers` cores: enough that the links
/// together have a worker per core, each link at least one and at most [`MAX_QUEUES`].
pub fn queues_per_link(workers: usize, links: usize) -> usize {
    workers.div_ceil(links.max(1)).clamp(1, MAX_QUEUES)
}

/// More queues than this per link buys nothing a host's core count could use.
pub const MAX_QUEUES: usize = 16;

impl LinkRuntime {
    /// Attach `queues` queues to the link's tun device, bind as many UDP sockets to its port,
    /// start a transmit and a receive thread per queue. `v6` binds for an IPv6 underlay.
    pub fn start(link: Link, v6: bool, queues: usize) -> io::Result<LinkRuntime> {
        let dev = link.spec_dev.clone();
        let name = std::ffi::CString::new(dev.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: if_nametoindex only reads `name`, a NUL-terminated string that outlives it.
        if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("tunnel device {dev} does not exist (the reconcile creates it)"),
            ));
        }
        let queues = queues.clamp(1, MAX_QUEUES);
        let first = attach_offload(&dev)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot attach to {dev}: {e}")))?;
        let mut tuns = Vec::with_capacity(queues);
        for q in 1..queues {
            // The device was created multi-queue: a clone attaches one more queue (the kernel
            // spreads flows over them by their hash).
            tuns.push(first.try_clone().map_err(|e| {
                io::Error::new(e.kind(), format!("cannot attach queue {q} to {dev}: {e}"))
            })?);
        }
        tuns.insert(0, first);
        let mut udp: Vec<UdpSocket> = Vec::with_capacity(queues);
        let mut port = link.listen_port.unwrap_or(0);
        for _ in 0..queues {
            let s = bind_udp(v6, port, queues > 1).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot bind UDP port {port} for {dev}: {e}"),
                )
            })?;
            // An ephemeral port: the other queues join the one the first socket got.
            port = s.local_addr()?.port();
            udp.push(s);
        }
        let link = Arc::new(RwLock::new(Arc::new(link)));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(2 * queues);
        let gso_off = Arc::new(AtomicBool::new(false));
        let tun_gro_off = Arc::new(AtomicBool::new(false));
        let faults = Faults::from_env();
        for t in &tuns {
            // Reads never block: a receive thread may try one (see `udp_to_tun`).
            t.set_nonblocking(true)?;
        }
        let mut queue_list = Vec::with_capacity(queues);
        for (dev, udp) in tuns.into_iter().zip(udp) {
            // UDP GSO on send, GRO on receive; quinn-udp also sets don't-fragment, which
            // WireGuard does not: `bind_udp` turns path-MTU discovery off after it.
            let state = UdpSocketState::new((&udp).into())?;
            pmtu_discovery_off(&udp, v6);
            queue_list.push(TunQueue {
                dev,
                udp,
                state,
                reader: Mutex::new(()),
                busy: AtomicBool::new(false),
                counts: QueueStats::default(),
            });
        }
        let all: Arc<Vec<TunQueue>> = Arc::new(queue_list);
        for q in 0..queues {
            let shared = Shared {
                link: link.clone(),
                q,
                all: all.clone(),
                stop: stop.clone(),
                gso_off: gso_off.clone(),
                tun_gro_off: tun_gro_off.clone(),
                faults,
            };
            let suffix = if queues > 1 {
                q.to_string()
            } else {
                String::new()
            };
            threads.push(shared.spawn(format!("{dev}-tx{suffix}"), tun_to_udp)?);
            threads.push(shared.spawn(format!("{dev}-rx{suffix}"), udp_to_tun)?);
        }
        Ok(LinkRuntime {
            dev,
            link,
            queues: all,
            stop,
            threads,
            gso_off,
            tun_gro_off,
            // Train ids start somewhere new each run: a peer may still hold a report on the
            // trains of a daemon that ran before.
            check: Mutex::new(Checked {
                check: GsoCheck::new(rand_core::RngCore::next_u32(&mut rand_core::OsRng) as u16),
                with: None,
            }),
        })
    }

    /// One step of the link's UDP GSO self-check (see [`crate::datapath::offload`]): call it
    /// with the daemon's tick.
    pub fn check_gso(&self, link: &Link, policy: Liveness, now: Instant) {
        let mut c = self.check.lock().expect("not poisoned");
        let peer = link.check_peer(policy, now);
        let report = peer.and_then(|p| link.check_report(p));
        match c.check.step(now, peer.is_some(), report) {
            Step::Nothing => {}
            Step::Send { plain, gso } => {
                let p = peer.expect("a check starts only with a peer");
                c.with = link.peers().get(p).map(|p| p.spec.name.clone());
                if let Some((to, datagrams)) = link.check_train(p, plain) {
                    self.send_all(&datagrams.into_iter().map(|d| (to, d)).collect::<Vec<_>>());
                }
                if let Some((to, datagrams)) = link.check_train(p, gso) {
                    // One GSO write, whatever the verdict so far: a path that heals gets GSO
                    // back at the next check.
                    let contents = datagrams.concat();
                    let transmit = Transmit {
                        destination: to,
                        ecn: None,
                        contents: &contents,
                        segment_size: Some(datagrams[0].len()),
                        src_ip: None,
                    };
                    let first = &self.queues[0];
                    if let Err(e) = first.state.try_send((&first.udp).into(), &transmit) {
                        tracing::debug!(dev = %self.dev, error = %e, "GSO check train not sent");
                    }
                }
            }
            Step::Verdict(v) => {
                let with = c.with.as_deref().unwrap_or("?");
                match v {
                    Verdict::Broken => {
                        tracing::warn!(dev = %self.dev, peer = with, "UDP GSO is broken on this path (a GSO train went missing, datagram by datagram arrived): sending datagram by datagram")
                    }
                    _ => tracing::info!(dev = %self.dev, peer = with, "UDP GSO checked: it works"),
                }
                self.gso_off.store(v == Verdict::Broken, Ordering::Relaxed);
            }
        }
    }

    /// Whether the link writes to its tun device packet by packet (coalesced writes refused).
    pub fn tun_gro_off(&self) -> bool {
        self.tun_gro_off.load(Ordering::Relaxed)
    }

    pub fn gso_status(&self) -> GsoStatus {
        let c = self.check.lock().expect("not poisoned");
        GsoStatus {
            verdict: c.check.verdict(),
            checked_with: c.with.clone(),
            checks: c.check.checks(),
        }
    }

    pub fn current(&self) -> Arc<Link> {
        self.link.read().expect("not poisoned").clone()
    }

    pub fn replace(&self, link: Link) {
        *self.link.write().expect("not poisoned") = Arc::new(link);
    }

    pub fn local_port(&self) -> Option<u16> {
        self.queues[0].udp.local_addr().ok().map(|a| a.port())
    }

    /// Each queue's counters, in queue order.
    pub fn queue_stats(&self) -> impl Iterator<Item = &QueueStats> {
        self.queues.iter().map(|q| &q.counts)
    }

    /// Send datagrams produced outside the packet threads (timers, keepalives).
    pub fn send_all(&self, datagrams: &[(SocketAddr, Vec<u8>)]) {
        for (to, d) in datagrams {
            if let Err(e) = self.queues[0].udp.send_to(d, to) {
                tracing::debug!(dev = %self.dev, %to, error = %e, "send failed");
            }
        }
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Socket buffers. The receive side holds what arrives while the receive thread is busy
/// decrypting a batch (GSO trains from a peer's several queues, ECMP bursts); the send side
/// what a transmit thread seals while the NIC drains. Neither holds the bandwidth-delay
/// product: that lives in the TCP endpoints' buffers, the tunnel only forwards.
const RECV_BUFFER: usize = 8 << 20;
const SEND_BUFFER: usize = 4 << 20;

/// A non-blocking UDP socket on `port` (0: any), sized by [`RECV_BUFFER`] and [`SEND_BUFFER`]
/// past `net.core.[rw]mem_max` (the daemon has CAP_NET_ADMIN; without it the kernel caps
/// them). `reuse` lets the link's other queues bind the same port: only sockets of the same
/// user can join, and the daemon holds the namespace's reconcile lock, so no second daemon
/// can.
fn bind_udp(v6: bool, port: u16, reuse: bool) -> io::Result<UdpSocket> {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket::socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    if reuse {
        socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    if socket::setsockopt(&fd, sockopt::RcvBufForce, &RECV_BUFFER).is_err() {
        let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &RECV_BUFFER);
    }
    if socket::setsockopt(&fd, sockopt::SndBufForce, &SEND_BUFFER).is_err() {
        let _ = socket::setsockopt(&fd, sockopt::SndBuf, &SEND_BUFFER);
    }
    let bind: SocketAddr = if v6 {
        (Ipv6Addr::UNSPECIFIED, port).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, port).into()
    };
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(bind))?;
    Ok(UdpSocket::from(fd))
}

/// WireGuard lets an oversized datagram be fragmented rather than dropped.
fn pmtu_discovery_off(udp: &UdpSocket, v6: bool) {
    let (level, opt) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER)
    };
    let dont: libc::c_int = libc::IP_PMTUDISC_DONT;
    // SAFETY: setsockopt with a c_int value of the right size.
    unsafe {
        libc::setsockopt(
            udp.as_raw_fd(),
            level,
            opt,
            &dont as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// One queue of a link: its tun queue (non-blocking) and its UDP socket; the lock whoever
/// reads the tun queue holds from the read until what it read is sent (the transmit thread,
/// or a receive thread sending a reply itself); whether the transmit thread is draining it;
/// the queue's counters. What is read from a tun queue always leaves by the queue's own
/// socket, whichever thread sends it, so a flow keeps one socket (and one NIC queue).
struct TunQueue {
    dev: SyncDevice,
    udp: UdpSocket,
    state: UdpSocketState,
    reader: Mutex<()>,
    busy: AtomicBool,
    counts: QueueStats,
}

/// What both packet threads of a queue hold.
#[derive(Clone)]
struct Shared {
    link: Arc<RwLock<Arc<Link>>>,
    /// This queue's index in `all`.
    q: usize,
    /// Every queue of the link, in order: decrypted packets go to their flow's queue.
    all: Arc<Vec<TunQueue>>,
    stop: Arc<AtomicBool>,
    gso_off: Arc<AtomicBool>,
    tun_gro_off: Arc<AtomicBool>,
    faults: Faults,
}

/// Offload failures to pretend, for the tests of the fallbacks where no kernel setting can
/// break the real thing (comma-separated in `APPLIANCE_TEST_FAULTS`, read once per link
/// start): `tun-gro-write` makes every coalesced tun write fail as the tun regression did
/// (EINVAL); `udp-gro-split` splits every UDP GRO read at a wrong segment size, as a kernel
/// reporting the wrong one would.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    tun_gro_write: bool,
    udp_gro_split: bool,
}

impl Faults {
    fn from_env() -> Faults {
        let v = std::env::var("APPLIANCE_TEST_FAULTS").unwrap_or_default();
        let has = |name: &str| v.split(',').any(|f| f.trim() == name);
        let f = Faults {
            tun_gro_write: has("tun-gro-write"),
            udp_gro_split: has("udp-gro-split"),
        };
        if f.tun_gro_write {
            tracing::warn!("APPLIANCE_TEST_FAULTS: coalesced tun writes fail on purpose");
        }
        if f.udp_gro_split {
            tracing::warn!("APPLIANCE_TEST_FAULTS: UDP GRO reads are split wrong on purpose");
        }
        f
    }
}

/// Turn UDP GRO on or off on a socket (quinn-udp turned it on where the kernel has it).
fn set_udp_gro(udp: &UdpSocket, on: bool) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    Ok(setsockopt(udp, sockopt::UdpGroSegment, &on)?)
}

type PacketLoop = fn(&Shared);

impl Shared {
    fn spawn(&self, name: String, body: PacketLoop) -> io::Result<JoinHandle<()>> {
        let s = self.clone();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || body(&s))
    }
}

/// Wait until `fd` can be written, at most [`SEND_WAIT`].
fn wait_writable(fd: i32) -> bool {
    wait(fd, libc::POLLOUT, SEND_WAIT)
}

fn wait_readable(fd: i32) -> bool {
    wait(fd, libc::POLLIN, WAKE)
}

/// Wait at most `timeout` for `events` on `fd`.
fn wait(fd: i32, events: libc::c_short, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    n > 0 && pfd.revents & events != 0
}

/// Attach to the tun device with offload: reads return TCP super-packets (up to 64 KiB) that
/// tun-rs splits into MTU-sized segments, writes are coalesced back into super-packets (GRO),
/// so the kernel's TCP stack on each side handles a few large buffers instead of many small
/// ones. This is the change that took wireguard-go past 10 Gbit/s.
fn attach_offload(dev: &str) -> io::Result<SyncDevice> {
    DeviceBuilder::default()
        .name(dev)
        .multi_queue(true)
        .offload(true)
        .build_sync()
}

/// Room a sealed datagram needs beyond its packet (WireGuard header and tag, with margin; at
/// least a handshake message).
const SEAL_ROOM: usize = 148;

/// The most one UDP GSO write may carry to `to`: what fits one IP datagram's length field.
/// A full tun super-packet (64 KiB) splits into ~48 segments whose ciphertexts together exceed
/// it, and the kernel refuses the whole write (EMSGSIZE) rather than sending part of it.
fn max_udp_payload(to: SocketAddr) -> usize {
    match to {
        SocketAddr::V4(_) => 65535 - 20 - 8,
        SocketAddr::V6(_) => 65535 - 40 - 8,
    }
}

/// Consecutive ciphertexts of one super-packet to one endpoint, sent as one UDP GSO write.
struct GsoBatch {
    buf: Vec<u8>,
    used: usize,
    to: Option<SocketAddr>,
    segment: usize,
    count: usize,
}

impl GsoBatch {
    fn flush(&mut self, state: &UdpSocketState, udp: &UdpSocket, stats: &LinkStats) {
        if let (Some(to), true) = (self.to, self.used > 0) {
            let transmit = Transmit {
                destination: to,
                ecn: None,
                contents: &self.buf[..self.used],
                segment_size: (self.count > 1).then_some(self.segment),
                src_ip: None,
            };
            let mut sent = state.try_send(udp.into(), &transmit);
            if sent
                .as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
            {
                // The socket buffer is full: wait for room (briefly) rather than drop a
                // whole batch.
                stats.send_blocked.fetch_add(1, Ordering::Relaxed);
                if wait_writable(udp.as_raw_fd()) {
                    sent = state.try_send(udp.into(), &transmit);
                }
            }
            match sent {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    stats
                        .send_dropped
                        .fetch_add(self.count as u64, Ordering::Relaxed);
                }
                Err(_) if self.count == 1 => {
                    // One datagram, no GSO: an ordinary send error (no route, say).
                    stats.send_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // GSO refused (quinn-udp lowers its segment limit): send one by one.
                    if stats.gso_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(error = %e, segments = self.count, bytes = self.used, "a UDP GSO write was refused: sending that batch datagram by datagram");
                    }
                    for chunk in self.buf[..self.used].chunks(self.segment) {
                        let _ = udp.send_to(chunk, to);
                    }
                }
            }
        }
        self.used = 0;
        self.count = 0;
        self.to = None;
    }
}

/// What a reader of a tun queue needs: the super-packet, its segments, and the GSO batch
/// the segments are sealed into. The transmit thread has one; a receive thread makes one the
/// first time it answers a reply itself (see `udp_to_tun`).
struct Sealer {
    original: Vec<u8>,
    segments: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    out: Vec<u8>,
    batch: GsoBatch,
}

/// What one read of a tun queue did.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// Packets were read (and sealed and sent, or dropped): there may be more.
    Moved,
    /// Nothing to read.
    Empty,
    /// The device is gone: the link stops.
    Failed,
}

impl Sealer {
    fn new() -> Sealer {
        Sealer {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65535],
            segments: vec![vec![0u8; 2048]; IDEAL_BATCH_SIZE],
            sizes: vec![0usize; IDEAL_BATCH_SIZE],
            out: vec![0u8; MAX_PACKET],
            batch: GsoBatch {
                buf: vec![0u8; IDEAL_BATCH_SIZE * 2048],
                used: 0,
                to: None,
                segment: 0,
                count: 0,
            },
        }
    }

    /// One read of `tq` (non-blocking), every segment sealed and sent. The caller holds the
    /// queue's reader lock, so packets leave in the order they were read.
    fn once(&mut self, s: &Shared, tq: &TunQueue) -> Read {
        let Sealer {
            original,
            segments,
            sizes,
            out,
            batch,
        } = self;
        let n = match tq.dev.recv_multiple(original, segments, sizes, 0) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                return Read::Empty
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                tracing::debug!(error = %e, "tun super-packet dropped");
                return Read::Moved;
            }
            Err(e) => {
                tracing::warn!(error = %e, "tun read failed; link stops");
                return Read::Failed;
            }
        };
        tq.counts.tun_reads.fetch_add(1, Ordering::Relaxed);
        tq.counts.tun_packets.fetch_add(n as u64, Ordering::Relaxed);
        let link = s.link.read().expect("not poisoned").clone();
        // GSO found broken on this path: one datagram per send.
        let max_segments = if s.gso_off.load(Ordering::Relaxed) {
            1
        } else {
            tq.state.max_gso_segments().max(1)
        };
        // One clock read per batch: the engine takes time as an input.
        let now = Instant::now();
        // The peer whose send order this thread holds, while its batch is sealed and sent.
        let mut holding: Option<(usize, std::sync::MutexGuard<'_, ()>)> = None;
        for (seg, size) in segments.iter().zip(sizes.iter()).take(n) {
            let seg = &seg[..*size];
            let peer = link.peer_of(seg);
            if let Some(p) = peer {
                if holding.as_ref().map(|(h, _)| *h) != Some(p) {
                    // Another peer: the batch for the one held goes out first.
                    batch.flush(&tq.state, &tq.udp, &link.stats);
                    // Released before the next is taken: two threads never wait on each
                    // other's.
                    drop(holding.take());
                    holding = link.send_order(p).map(|g| (p, g));
                }
            }
            // Encrypted straight into the batch, behind the datagrams already there.
            if batch.buf.len() - batch.used < seg.len() + SEAL_ROOM {
                batch.flush(&tq.state, &tq.udp, &link.stats);
            }
            let used = batch.used;
            // A segment larger than the whole batch buffer (not seen from tun-rs) is sealed
            // aside.
            let aside = batch.buf.len() - used < seg.len() + SEAL_ROOM;
            let dst = if aside {
                &mut out[..]
            } else {
                &mut batch.buf[used..]
            };
            let sealed = match peer {
                Some(p) => link.outbound_to(p, seg, dst, now),
                // Counted and dropped (not IP, no peer for it).
                None => link.outbound(seg, dst, now),
            };
            let Outbound::Send(to, len) = sealed else {
                continue;
            };
            let fits = batch.to == Some(to)
                && len <= batch.segment
                && batch.count < max_segments
                && batch.used + len <= max_udp_payload(to);
            if !fits {
                // The new datagram starts the next batch: send the ones before it, then move
                // it to the front (once per batch, not per packet).
                batch.flush(&tq.state, &tq.udp, &link.stats);
                batch.to = Some(to);
                batch.segment = len;
                if !aside {
                    batch.buf.copy_within(used..used + len, 0);
                }
            }
            if aside {
                let at = batch.used;
                batch.buf[at..at + len].copy_from_slice(&out[..len]);
            }
            batch.used += len;
            batch.count += 1;
            // A shorter datagram can only end a GSO batch.
            if len < batch.segment {
                batch.flush(&tq.state, &tq.udp, &link.stats);
            }
        }
        batch.flush(&tq.state, &tq.udp, &link.stats);
        drop(holding);
        Read::Moved
    }
}

fn tun_to_udp(s: &Shared) {
    let tq = &s.all[s.q];
    let mut sealer = Sealer::new();
    // Read again at once after a read that moved packets; wait only once the queue is empty.
    let mut more = false;
    while !s.stop.load(Ordering::Relaxed) {
        if !more && !wait_readable(tq.dev.as_raw_fd()) {
            continue;
        }
        // Draining: receive threads leave the queue to this thread (bulk stays on one core).
        tq.busy.store(true, Ordering::Relaxed);
        let read = {
            let _reader = tq.reader.lock().expect("not poisoned");
            sealer.once(s, tq)
        };
        match read {
            Read::Moved => more = true,
            Read::Empty => {
                more = false;
                tq.busy.store(false, Ordering::Relaxed);
            }
            Read::Failed => return,
        }
    }
}

/// Datagrams drained per wake-up before the decrypted packets are written (and coalesced).
const RX_BATCH: usize = 64;
/// Capacity of each tun write buffer: GRO appends whole segments to the first one of a flow.
const GRO_CAPACITY: usize = 2 * VIRTIO_NET_HDR_LEN + 65535 + 64;

/// Receive buffers per recvmmsg; each can hold a GRO-coalesced train of datagrams.
const RX_SLOTS: usize = 8;
/// Reads per wake-up at most: a flood of datagrams that decrypt to nothing cannot hold the
/// decrypted packets of the reads before it back, nor the GRO watch's timer.
const RX_READS: usize = 16;

/// A receive thread's [`GroWatch`] found UDP GRO broken: off on its socket, logged (a warning
/// the first time), shown per queue.
fn gro_broken(udp: &UdpSocket, counts: &QueueStats, dev: &str, from: SocketAddr) {
    match set_udp_gro(udp, false) {
        Ok(()) => {
            counts.udp_gro_off.store(true, Ordering::Relaxed);
            if counts.udp_gro_offs.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(dev, %from, "UDP GRO is broken on this path (coalesced reads from a live peer fail authentication): receiving datagram by datagram");
            } else {
                tracing::info!(dev, %from, "UDP GRO broken again: off");
            }
        }
        Err(e) => {
            tracing::warn!(dev, error = %e, "UDP GRO looks broken but could not be turned off")
        }
    }
}

/// A receive round that wrote at most this many packets answers the replies they caused
/// itself (see `udp_to_tun`); bulk rounds leave that to the transmit threads.
const REPLY_ROUND: usize = 8;

fn udp_to_tun(q: &Shared) {
    let Shared {
        link,
        all,
        stop,
        tun_gro_off,
        faults,
        ..
    } = q;
    let TunQueue {
        udp, state, counts, ..
    } = &all[q.q];
    // Made the first time this thread answers a reply itself.
    let mut sealer: Option<Box<Sealer>> = None;
    let mut slots: [Vec<u8>; RX_SLOTS] = std::array::from_fn(|_| vec![0u8; 65535]);
    let mut meta = vec![RecvMeta::default(); RX_SLOTS];
    let mut gro = GROTable::default();
    let mut pool: Vec<Vec<u8>> = (0..RX_BATCH)
        .map(|_| Vec::with_capacity(GRO_CAPACITY))
        .collect();
    // One batch per tun queue: each packet goes to its flow's queue (see `flow`).
    let mut batches: Vec<Vec<Vec<u8>>> = all.iter().map(|_| Vec::with_capacity(RX_BATCH)).collect();
    let mut pending = 0;
    let mut watch = GroWatch::default();
    while !stop.load(Ordering::Relaxed) {
        let readable = wait_readable(udp.as_raw_fd());
        if watch.tick(Instant::now()) == GroStep::On {
            match set_udp_gro(udp, true) {
                Ok(()) => {
                    counts.udp_gro_off.store(false, Ordering::Relaxed);
                    tracing::info!(dev = %link.read().expect("not poisoned").spec_dev, "UDP GRO on again (rechecking a path where it was broken)");
                }
                Err(e) => tracing::debug!(error = %e, "UDP GRO not turned on again"),
            }
        }
        if !readable {
            continue;
        }
        let link = link.read().expect("not poisoned").clone();
        for _ in 0..RX_READS {
            let got = {
                // On the stack: no allocation per read.
                let mut iov = slots.each_mut().map(|b| IoSliceMut::new(b));
                state.recv(udp.into(), &mut iov, &mut meta)
            };
            let msgs = match got {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "udp receive failed");
                    break;
                }
            };
            let now = Instant::now();
            for (slot, m) in slots.iter().zip(&meta).take(msgs) {
                counts
                    .udp_datagrams
                    .fetch_add(m.len.div_ceil(m.stride.max(1)) as u64, Ordering::Relaxed);
                let coalesced = m.stride > 0 && m.stride < m.len;
                let stride = if coalesced && faults.udp_gro_split && m.stride > 1 {
                    m.stride - 1
                } else {
                    m.stride.max(1)
                };
                let (mut good, mut bad) = (0u32, 0u32);
                // The read's first datagram named a live session and failed on its tag.
                let mut suspect = false;
                for datagram in slot[..m.len].chunks(stride) {
                    let mut buf = pool
                        .pop()
                        .unwrap_or_else(|| Vec::with_capacity(GRO_CAPACITY));
                    // Sized without zeroing what decryption overwrites; the virtio header is
                    // cleared.
                    let need = VIRTIO_NET_HDR_LEN + datagram.len().max(148);
                    if buf.len() < need {
                        buf.resize(need, 0);
                    }
                    buf.truncate(need);
                    buf[..VIRTIO_NET_HDR_LEN].fill(0);
                    let Inbound {
                        to_tun,
                        to_net,
                        authenticated,
                        dropped,
                    } = link.inbound(m.addr, datagram, &mut buf[VIRTIO_NET_HDR_LEN..], now);
                    if good + bad == 0 {
                        suspect = dropped == Some(DropReason::Unauthentic);
                    }
                    if authenticated {
                        good += 1;
                    } else {
                        bad += 1;
                    }
                    for (to, d) in to_net {
                        let _ = udp.send_to(&d, to);
                    }
                    match to_tun {
                        Some(len) if len > 0 => {
                            buf.truncate(VIRTIO_NET_HDR_LEN + len);
                            let q = flow::queue_of(&buf[VIRTIO_NET_HDR_LEN..], all.len());
                            batches[q].push(buf);
                            pending += 1;
                        }
                        _ => pool.push(buf),
                    }
                }
                if watch.read(coalesced, suspect, good, bad, now) == GroStep::Off {
                    gro_broken(udp, counts, &link.spec_dev, m.addr);
                }
            }
            if pending >= RX_BATCH {
                break;
            }
        }
        if pending == 0 {
            continue;
        }
        let small = pending <= REPLY_ROUND;
        for (tq, batch) in all.iter().zip(&mut batches) {
            if batch.is_empty() {
                continue;
            }
            let tun = &tq.dev;
            let coalesce = !tun_gro_off.load(Ordering::Relaxed);
            let written = if !coalesce {
                // Coalescing writes were refused on this device: packet by packet, each
                // behind its zeroed virtio header (no offload asked for).
                batch.iter().try_for_each(|b| tun.send(b).map(|_| ()))
            } else if faults.tun_gro_write {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                tun.send_multiple(&mut gro, batch, VIRTIO_NET_HDR_LEN)
                    .map(|_| ())
            };
            if let Err(e) = written {
                link.stats.tun_write_errors.fetch_add(1, Ordering::Relaxed);
                let refused = matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EIO));
                if coalesce && refused && !tun_gro_off.swap(true, Ordering::Relaxed) {
                    // The kernel refuses offload writes (a tun regression made them fail with
                    // EINVAL). The buffers of this batch may be coalesced already: it is
                    // lost, TCP sends it again.
                    tracing::warn!(error = %e, "the tun device refused a coalesced (GRO) write: writing packet by packet from now on");
                } else {
                    tracing::debug!(error = %e, "tun write failed");
                }
            }
            pool.append(batch);
            // A few packets written (a ping, a request, an ACK): the kernel answered some of
            // them while we wrote (an echo reply, a local server's response), and the reply
            // waits in the queue. Sent from here it does not wait for the transmit thread to
            // wake up: one thread wake-up less per round trip. Only if that thread is not
            // draining the queue itself (and the reader lock keeps read order send order).
            if small && !tq.busy.load(Ordering::Relaxed) {
                if let Ok(_reader) = tq.reader.try_lock() {
                    let sealer = sealer.get_or_insert_with(|| Box::new(Sealer::new()));
                    if sealer.once(q, tq) == Read::Moved {
                        tq.counts.tun_replies.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        pending = 0;
    }
}
