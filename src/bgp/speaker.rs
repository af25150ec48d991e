//! The BGP driver (edge): TCP sessions, timers and the task that owns the RIB. All decisions
//! are the pure modules': [`super::fsm::Session`] for each session, [`super::rib::Rib`] for
//! routes. Tasks and channels:
//!
//! ```text
//!  listener ──(accepted stream, by peer address)──▶ session task per peer ◀── connect loop
//!  session task ──Event::{Up, Update, Refresh, Down}──▶ RIB task ──Message──▶ session task
//!                                                         │ (router::Router decides)
//!                                                         └──watch<Learned>──▶ daemon
//! ```
//! The learned routes travel on a `watch` channel: the daemon wakes when they change and reads
//! the latest value, so a burst of UPDATEs costs it one wake-up and the channel cannot grow.
//! A connection from an address that is not a configured peer is closed at once and counted.

use super::fsm::{Action, Event as FsmEvent, Negotiated, Session, SessionConfig};
use super::rib::{Counters, PeerId, PeerKind, Rib, RibPeer};
use super::router::{Input, Learn, Learned, Lost, Output, Router};
use super::setup::{PeerConfig, SpeakerConfig, PORT};
use super::wire::{self, Context, Families, Message, Notification, Update};
use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Notify};

const CONNECT_RETRY: Duration = Duration::from_secs(2);
/// Messages the sessions may have on their way to the RIB task. A session waits for room (and
/// stops reading its socket meanwhile, so TCP pushes back on the peer): a peer flooding
/// UPDATEs cannot grow the speaker's memory.
const RIB_QUEUE: usize = 256;
/// Messages the RIB may have queued for one session (at most 4 KiB each, typically under 100
/// bytes). A peer that lets more pile up does not read: the RIB takes it down at once, its
/// session is reset before its next write (Cease, out of resources), and it re-syncs when it
/// reconnects. A full export to one peer is one message per path: 16,384 covers thousands of
/// nodes.
const OUT_QUEUE_MAX: usize = 16_384;
/// A peer asking for ROUTE-REFRESH gets at most one re-export per interval.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Log lines per peer and kind (rejected prefixes, malformed attributes) per minute.
const LOG_LINES: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(60);
/// Backlog for the listener: a thousand clients may connect at once after a gateway restart.
const BACKLOG: u32 = 4096;

/// What `appliance status` shows per session, like `birdc show protocols`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default, PartialEq)]
pub struct SessionStatus {
    pub name: String,
    pub address: String,
    pub state: String,
    pub since_unix_s: u64,
    pub last_error: Option<String>,
    pub prefixes: Counters,
    pub accepted_now: usize,
    /// ADD-PATH (RFC 7911) as negotiated: families the peer sends us several paths in, and
    /// families we send it several paths in.
    pub add_path_rx: Families,
    pub add_path_tx: Families,
    /// Times the session left Established.
    #[serde(default)]
    pub flaps: u64,
}

#[derive(Debug, Default)]
pub struct Status {
    pub sessions: Vec<SessionStatus>,
    pub refused_connections: u64,
    /// Learned prefixes with their equal-cost paths: which peer, which next hop (display).
    pub routes: BTreeMap<IpNet, Vec<LearnedPath>>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LearnedPath {
    pub peer: String,
    /// The peer is a route-reflector client (a node, seen from a gateway).
    pub from_client: bool,
    pub next_hop: Option<IpAddr>,
}

pub type SharedStatus = Arc<Mutex<Status>>;

/// A running speaker: its status, and a way to stop it cleanly.
pub struct Speaker {
    pub status: SharedStatus,
    tx: mpsc::UnboundedSender<ToRib>,
    names: Vec<String>,
    /// Per peer: wakes its connect loop out of the retry wait.
    retry: Vec<Arc<Notify>>,
    learned: watch::Receiver<Learned>,
    /// Dropped with the speaker: its thread's runtime, and every task and socket on it, ends.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Speaker {
    /// What the host routes by, as it changes (see [`Router::learned`]).
    pub fn learned(&self) -> watch::Receiver<Learned> {
        self.learned.clone()
    }

    /// The datapath says whether `peer` (a node) can be reached at all. When it cannot (every
    /// tunnel link dead), its session is reset and its routes withdrawn at once, instead of
    /// waiting out the hold timer: the site router stops sending traffic this way within a
    /// second. When a peer we dial becomes reachable, a connect that failed or hangs while its
    /// links were dead is retried at once rather than after [`CONNECT_RETRY`]: a restarted node
    /// is back in BGP (and the site routes to it again) the moment its links are.
    pub fn set_reachable(&self, peer: &str, reachable: bool) {
        self.reach(peer, reachable, Lost::Tunnel);
    }

    /// Drain (or undrain) this gateway: every path it announces is withdrawn (or announced
    /// again); sessions stay up.
    pub fn set_drained(&self, on: bool) {
        let _ = self.tx.send(ToRib::Drain(on));
    }

    /// A BFD session with `peer` went down (or came back up): as [`Self::set_reachable`], with
    /// Cease 10 ("BFD Down", RFC 9384) in the NOTIFICATION.
    pub fn set_bfd(&self, peer: &str, up: bool) {
        self.reach(peer, up, Lost::Bfd);
    }

    fn reach(&self, peer: &str, reachable: bool, lost: Lost) {
        if let Some(id) = self.names.iter().position(|n| n == peer) {
            let _ = self.tx.send(ToRib::Reachable(id, reachable, lost));
            if reachable {
                self.retry[id].notify_one();
            }
        }
    }

    /// Tell every established peer we are going away on purpose (Cease, administrative
    /// shutdown): they withdraw our routes at once. A crash or SIGKILL sends nothing, so peers
    /// keep our routes for the graceful-restart time instead (RFC 4724).
    pub async fn shutdown(&self) {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        if self.tx.send(ToRib::Shutdown(done_tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), done_rx).await;
            // Let the session tasks write their NOTIFICATIONs.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

enum ToRib {
    Shutdown(tokio::sync::oneshot::Sender<()>),
    Up(PeerId, Negotiated, Outbox),
    Update(PeerId, Box<Update>),
    Refresh(PeerId),
    /// Session down; with a duration the peer restarts gracefully and its routes stay stale.
    Down(PeerId, Option<Duration>),
    /// The restart time given to a peer in `generation` of its sessions ran out.
    StaleExpired(PeerId, u64),
    /// The datapath can (or can no longer) reach this peer.
    Reachable(PeerId, bool, Lost),
    /// The gateway was drained or put back in service.
    Drain(bool),
}

/// The RIB's way to one session: what it sends, and how much of it the session has not taken
/// yet (the session counts down as it takes).
#[derive(Clone)]
struct Outbox {
    tx: mpsc::UnboundedSender<Message>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    /// Set by the RIB when the queue overflowed: the session resets before its next write.
    overflowed: Arc<std::sync::atomic::AtomicBool>,
}

impl Outbox {
    /// Queue `m` for the session; false when [`OUT_QUEUE_MAX`] messages already wait (the
    /// session does not read them: the caller drops the outbox, which ends the session).
    fn offer(&self, m: Message) -> bool {
        use std::sync::atomic::Ordering;
        if self.queued.fetch_add(1, Ordering::Relaxed) >= OUT_QUEUE_MAX {
            self.overflowed.store(true, Ordering::Relaxed);
            return false;
        }
        let _ = self.tx.send(m);
        true
    }
}

/// Write `bytes` whole within `deadline`, or say why not.
async fn write_within<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    deadline: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(deadline, w.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err(format!(
            "write: the peer has not read for {} s",
            deadline.as_secs()
        )),
    }
}

/// Start the speaker on a thread of its own ("bgp", with its own single-threaded runtime), so
/// routing work never delays the caller's loop: a burst of UPDATEs from hundreds of peers (a
/// gateway with 250 nodes losing its partner re-exports every prefix to every peer) once held
/// the daemon's loop, and with it every liveness probe and BFD packet, for half a second.
/// The thread ends when the returned [`Speaker`] is dropped.
pub async fn start(cfg: SpeakerConfig) -> std::io::Result<Speaker> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bgp".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
                match start_here(cfg, stop_tx) {
                    Ok(s) => {
                        if ready_tx.send(Ok(s)).is_ok() {
                            let _ = stop_rx.await;
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })?;
    ready_rx
        .await
        .map_err(|_| std::io::Error::other("the BGP thread ended while starting"))?
}

/// The speaker's tasks, on the current runtime.
fn start_here(
    cfg: SpeakerConfig,
    stop: tokio::sync::oneshot::Sender<()>,
) -> std::io::Result<Speaker> {
    let status: SharedStatus = Arc::new(Mutex::new(Status {
        sessions: cfg
            .peers
            .iter()
            .map(|p| SessionStatus {
                name: p.peer.name.clone(),
                address: p.address.to_string(),
                state: "Idle".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }));
    // Sessions reach the RIB by a bounded channel; the daemon and the RIB's own timers by an
    // unbounded one (their rate is the daemon's, not a peer's).
    let (rib_tx, rib_rx) = mpsc::channel(RIB_QUEUE);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let mut accept_txs = BTreeMap::new();
    let retry: Vec<Arc<Notify>> = cfg.peers.iter().map(|_| Arc::new(Notify::new())).collect();
    for (id, p) in cfg.peers.iter().enumerate() {
        // A connection or two may wait for its session; more from the same address are closed.
        let (tx, rx) = mpsc::channel::<TcpStream>(2);
        accept_txs.insert(p.address, tx);
        let fsm = SessionConfig {
            local_as: cfg.local_as,
            local_id: cfg.router_id,
            peer_as: cfg.local_as,
            hold_time: cfg.hold_time,
            restart_time: cfg.restart_time,
        };
        tokio::spawn(peer_task(
            id,
            p.clone(),
            Dial {
                local: cfg.local_address,
                retry: retry[id].clone(),
            },
            fsm,
            rx,
            rib_tx.clone(),
            status.clone(),
        ));
    }
    if let Some(addr) = cfg.listen {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(BACKLOG)?;
        tokio::spawn(accept_task(listener, accept_txs, status.clone()));
    }
    let mut rib = Rib::new(cfg.router_id);
    rib.client_to_client = cfg.client_to_client;
    for p in &cfg.peers {
        rib.add_peer(p.peer.clone());
    }
    for (prefix, a) in &cfg.originate {
        rib.originate(*prefix, a.clone());
    }
    let names = cfg.peers.iter().map(|p| p.peer.name.clone()).collect();
    let (learned_tx, learned) = watch::channel(Learned::new());
    drop(rib_tx);
    tokio::spawn(rib_task(
        Router::new(rib, cfg.learn).drained(cfg.drained),
        (rib_rx, control_rx),
        control_tx.clone(),
        status.clone(),
        learned_tx,
    ));
    Ok(Speaker {
        status,
        tx: control_tx,
        names,
        retry,
        learned,
        _stop: stop,
    })
}

async fn accept_task(
    listener: TcpListener,
    peers: BTreeMap<IpAddr, mpsc::Sender<TcpStream>>,
    status: SharedStatus,
) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, say: retrying at once would spin on the error.
                tracing::warn!(error = %e, "BGP listener: accept failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ip = match from.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        match peers.get(&ip) {
            Some(tx) => {
                if tx.try_send(stream).is_err() {
                    tracing::debug!(%from, "BGP connection while two from that peer wait: closed");
                }
            }
            None => {
                status.lock().expect("not poisoned").refused_connections += 1;
                tracing::warn!(%from, "BGP connection from an address that is not a configured peer: refused");
                drop(stream);
            }
        }
    }
}

fn set_state(status: &SharedStatus, id: PeerId, state: &str, error: Option<String>) {
    let mut s = status.lock().expect("not poisoned");
    let e = &mut s.sessions[id];
    if e.state != state {
        if e.state == "Established" {
            e.flaps += 1;
        }
        e.state = state.to_string();
        e.since_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
    }
    if error.is_some() {
        e.last_error = error;
    }
}

/// How long a connect attempt may take: short at first, because a peer that just became
/// reachable may drop our first SYN (its route back to us follows its own view of the links, a
/// moment later) and the kernel would only resend it after a second; then up to 5 s.
fn connect_timeout(attempt: u32) -> Duration {
    (Duration::from_millis(250) * 2u32.pow(attempt.min(5))).min(Duration::from_secs(5))
}

async fn connect(local: IpAddr, to: IpAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(local, 0))?;
    tokio::time::timeout(timeout, socket.connect(SocketAddr::new(to, PORT)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// How a peer task dials: from which address, and what wakes it out of a retry wait.
struct Dial {
    local: IpAddr,
    retry: Arc<Notify>,
}

async fn peer_task(
    id: PeerId,
    p: PeerConfig,
    dial: Dial,
    fsm: SessionConfig,
    mut accepted: mpsc::Receiver<TcpStream>,
    rib: mpsc::Sender<ToRib>,
    status: SharedStatus,
) {
    let Dial { local, retry } = dial;
    let mut attempt = 0;
    loop {
        let stream = if p.active {
            tokio::select! {
                s = connect(local, p.address, connect_timeout(attempt)) => match s {
                    Ok(s) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut && attempt < 4 => {
                        attempt += 1;
                        continue;
                    }
                    Err(e) => {
                        attempt = 0;
                        set_state(&status, id, "Active", Some(format!("connect: {e}")));
                        tokio::select! {
                            _ = tokio::time::sleep(CONNECT_RETRY) => {}
                            _ = retry.notified() => {}
                        }
                        continue;
                    }
                },
                // The peer just became reachable: a SYN sent while it was not is lost.
                _ = retry.notified() => {
                    attempt = 0;
                    continue;
                }
                Some(s) = accepted.recv() => s,
            }
        } else {
            set_state(&status, id, "Active", None);
            match accepted.recv().await {
                Some(s) => s,
                None => return,
            }
        };
        attempt = 0;
        let (reason, keep_stale) =
            run_session(id, &p, stream, fsm.clone(), &rib, &status, &mut accepted).await;
        tracing::info!(peer = %p.peer.name, %reason, ?keep_stale, "BGP session down");
        set_state(&status, id, "Active", Some(reason.clone()));
        let _ = rib.send(ToRib::Down(id, keep_stale)).await;
        tokio::select! {
            _ = tokio::time::sleep(CONNECT_RETRY) => {}
            _ = retry.notified() => {}
        }
    }
}

/// One TCP connection's life. Returns why it ended. A second connection from the same peer
/// while this one runs is refused with Cease 7 (connection collision resolution): with the
/// roles the config gives (nodes connect to gateways, the lower router ID among gateways
/// connects) only the site router ever dials in while we dial out, and it resolves the
/// collision on its side.
async fn run_session(
    id: PeerId,
    p: &PeerConfig,
    stream: TcpStream,
    fsm: SessionConfig,
    rib: &mpsc::Sender<ToRib>,
    status: &SharedStatus,
    accepted: &mut mpsc::Receiver<TcpStream>,
) -> (String, Option<Duration>) {
    use std::sync::atomic::Ordering;
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    // A write that the peer does not take within the hold time ends the session: a peer that
    // sends KEEPALIVEs but never reads would otherwise hold it (and its queue) for ever.
    let write_timeout = Duration::from_secs(u64::from(fsm.hold_time.max(3)));
    let mut s = Session::new(fsm);
    s.start();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let overflowed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Handed to the RIB once established; when the RIB drops it (this peer let too much pile
    // up) the channel closes and the session ends.
    let mut outbox = Some(Outbox {
        tx: out_tx,
        queued: queued.clone(),
        overflowed: overflowed.clone(),
    });
    let mut refresh = super::pace::Coalesce::new(REFRESH_EVERY);
    let mut malformed_log = super::pace::LogBudget::new(LOG_LINES, LOG_WINDOW);
    let far = Instant::now() + Duration::from_secs(86400 * 365);
    let mut hold_deadline = far;
    let mut keepalive_deadline = far;
    let mut keepalive_every = None::<Duration>;
    // Small until a peer sends a lot: a thousand idle sessions must stay cheap.
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut pending = s.handle(FsmEvent::Connected);
    set_state(status, id, "OpenSent", None);
    loop {
        // Perform what the FSM decided.
        for action in std::mem::take(&mut pending) {
            match action {
                Action::Send(m) => {
                    if overflowed.load(Ordering::Relaxed) {
                        // The RIB has taken this peer down: not one more of the queue.
                        let cease = Notification::cease(8);
                        let bytes = wire::encode(&Message::Notification(cease), s.context());
                        let _ = write_within(&mut wr, &bytes, Duration::from_secs(1)).await;
                        return (
                            format!("the peer does not read: more than {OUT_QUEUE_MAX} messages queued for it"),
                            None,
                        );
                    }
                    let bytes = wire::encode(&m, s.context());
                    if let Err(e) = write_within(&mut wr, &bytes, write_timeout).await {
                        return (e, None);
                    }
                    if let Some(k) = keepalive_every {
                        keepalive_deadline = Instant::now() + k;
                    }
                }
                Action::HoldTimer(d) => {
                    hold_deadline = d.map(|d| Instant::now() + d).unwrap_or(far);
                }
                Action::KeepaliveTimer(d) => {
                    keepalive_every = d;
                    keepalive_deadline = d.map(|d| Instant::now() + d).unwrap_or(far);
                }
                Action::Close => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
                }
                Action::Established(n) => {
                    tracing::info!(peer = %p.peer.name, id = %n.peer_id, hold = n.hold_time, "BGP session established");
                    set_state(status, id, "Established", None);
                    {
                        let mut s = status.lock().expect("not poisoned");
                        s.sessions[id].add_path_rx = n.add_path_rx;
                        s.sessions[id].add_path_tx = n.add_path_tx;
                    }
                    if let Some(o) = outbox.take() {
                        let _ = rib.send(ToRib::Up(id, n, o)).await;
                    }
                }
                Action::Down { reason, keep_stale } => return (reason, keep_stale),
                Action::Update(u) => {
                    if !u.errors.is_empty() {
                        let v = malformed_log.line(Instant::now());
                        if v.held_back > 0 {
                            tracing::warn!(peer = %p.peer.name, "{} more malformed UPDATEs in the last minute (not logged)", v.held_back);
                        }
                        if v.log {
                            tracing::warn!(peer = %p.peer.name, errors = ?u.errors, treat_as_withdraw = u.treat_as_withdraw, "malformed UPDATE attributes (RFC 7606)");
                        }
                    }
                    // Waits for room: meanwhile this session reads nothing more.
                    let _ = rib.send(ToRib::Update(id, Box::new(u))).await;
                }
                Action::RouteRefresh { .. } => {
                    if refresh.ask(Instant::now()) {
                        let _ = rib.send(ToRib::Refresh(id)).await;
                    }
                }
            }
        }
        if s.state == super::fsm::State::OpenConfirm {
            set_state(status, id, "OpenConfirm", None);
        }
        // Frame any whole messages already buffered.
        match wire::frame_len(&buf) {
            Err(e) => {
                pending = s.handle(FsmEvent::Malformed(e));
                continue;
            }
            Ok(Some(len)) if buf.len() >= len => {
                let msg: Vec<u8> = buf.drain(..len).collect();
                pending = match wire::decode(&msg, s.context()) {
                    Ok(m) => s.handle(FsmEvent::Received(m)),
                    Err(e) => s.handle(FsmEvent::Malformed(e)),
                };
                continue;
            }
            _ => {}
        }
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(4096);
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => if let Ok(0) | Err(_) = r {
                pending = s.handle(FsmEvent::Disconnected);
            },
            Some(mut extra) = accepted.recv() => {
                let cease = wire::encode(&Message::Notification(Notification::cease(7)), Context::default());
                let _ = tokio::time::timeout(Duration::from_secs(1), extra.write_all(&cease)).await;
                tracing::debug!(peer = %p.peer.name, "second connection refused (collision)");
            }
            m = out_rx.recv(), if outbox.is_none() => match m {
                Some(m) => {
                    queued.fetch_sub(1, Ordering::Relaxed);
                    if let Message::Notification(n) = &m {
                        pending = s.handle(FsmEvent::Stop { subcode: n.subcode });
                    } else {
                        pending = vec![Action::Send(m)];
                    }
                }
                None => {
                    // Cease 8, out of resources (RFC 4486).
                    pending = s.handle(FsmEvent::Stop { subcode: 8 });
                    pending.push(Action::Down {
                        reason: format!("the peer does not read: more than {OUT_QUEUE_MAX} messages queued for it"),
                        keep_stale: None,
                    });
                }
            },
            _ = tokio::time::sleep_until(refresh.due().unwrap_or(far).into()) => {
                refresh.fire(Instant::now());
                let _ = rib.send(ToRib::Refresh(id)).await;
            }
            _ = tokio::time::sleep_until(hold_deadline.into()) => {
                hold_deadline = far;
                pending = s.handle(FsmEvent::HoldTimerExpired);
            }
            _ = tokio::time::sleep_until(keepalive_deadline.into()) => {
                keepalive_deadline = far;
                pending = s.handle(FsmEvent::KeepaliveTimerExpired);
            }
        }
    }
}

/// The RIB task: feeds [`Router`] and performs what it decides (send, start timers), then
/// publishes the changed prefixes: to the status (display) and to the learned-routes channel
/// the daemon waits on.
async fn rib_task(
    mut router: Router,
    (mut peers, mut control): (mpsc::Receiver<ToRib>, mpsc::UnboundedReceiver<ToRib>),
    me: mpsc::UnboundedSender<ToRib>,
    status: SharedStatus,
    learned: watch::Sender<Learned>,
) {
    let mut sessions: BTreeMap<PeerId, Outbox> = BTreeMap::new();
    let mut logs = Logs::default();
    loop {
        let ev = tokio::select! {
            biased;
            Some(ev) = control.recv() => ev,
            Some(ev) = peers.recv() => ev,
            else => return,
        };
        let input = match ev {
            ToRib::Shutdown(done) => {
                let mut out = router_handle(&mut router, Input::Shutdown, &mut logs);
                let _ = perform(&router, &mut sessions, &me, &mut out);
                let _ = done.send(());
                continue;
            }
            ToRib::Up(id, n, tx) => {
                sessions.insert(id, tx);
                Input::Up(id, n)
            }
            ToRib::Update(id, u) => Input::Update(id, u),
            ToRib::Refresh(id) => {
                // The last re-export has not been taken yet: another adds nothing but queue.
                if sessions
                    .get(&id)
                    .is_some_and(|o| o.queued.load(std::sync::atomic::Ordering::Relaxed) > 0)
                {
                    tracing::debug!(peer = %router.rib.peers[id].name, "ROUTE-REFRESH while the last export is still queued: skipped");
                    continue;
                }
                Input::Refresh(id)
            }
            ToRib::Down(id, restart) => {
                sessions.remove(&id);
                Input::Down(id, restart)
            }
            ToRib::StaleExpired(id, g) => Input::StaleExpired(id, g),
            ToRib::Reachable(id, r, l) => Input::Reachable(id, r, l),
            ToRib::Drain(on) => Input::Drain(on),
        };
        let mut out = router_handle(&mut router, input, &mut logs);
        let mut gone = perform(&router, &mut sessions, &me, &mut out);
        publish(&router, &status, &learned, &out.changed);
        // A peer whose queue overflowed is down now, not when its session notices: what it
        // was sent is withdrawn from the others, and nothing more piles up for it.
        while let Some(id) = gone.pop() {
            let mut out = router_handle(&mut router, Input::Down(id, None), &mut logs);
            gone.extend(perform(&router, &mut sessions, &me, &mut out));
            publish(&router, &status, &learned, &out.changed);
        }
    }
}

/// Per-peer log budgets for what a peer can make us say per message.
#[derive(Default)]
struct Logs {
    rejected: BTreeMap<PeerId, super::pace::LogBudget>,
}

fn router_handle(router: &mut Router, input: Input, logs: &mut Logs) -> Output {
    let out = router.handle(input);
    let now = Instant::now();
    for (id, what) in &out.events {
        tracing::info!(peer = %router.rib.peers[*id].name, "{what}");
    }
    for (id, prefix, why) in &out.rejected {
        let v = logs
            .rejected
            .entry(*id)
            .or_insert_with(|| super::pace::LogBudget::new(LOG_LINES, LOG_WINDOW))
            .line(now);
        let peer = &router.rib.peers[*id].name;
        if v.held_back > 0 {
            tracing::info!(peer = %peer, "{} more prefixes rejected in the last minute (not logged; counted in status)", v.held_back);
        }
        if v.log {
            tracing::info!(peer = %peer, "prefix {prefix} rejected: {why}");
        }
    }
    out
}

/// Send what the router decided and start its timers.
/// Returns the peers whose queue overflowed (their outbox is dropped: they are down).
fn perform(
    router: &Router,
    sessions: &mut BTreeMap<PeerId, Outbox>,
    me: &mpsc::UnboundedSender<ToRib>,
    out: &mut Output,
) -> Vec<PeerId> {
    let mut gone = Vec::new();
    for (id, m) in out.send.drain(..) {
        if let Some(o) = sessions.get(&id) {
            if !o.offer(m) {
                // Dropping its sender closes the session's queue: it resets (Cease 8).
                tracing::warn!(peer = %router.rib.peers[id].name, "the peer does not read: more than {OUT_QUEUE_MAX} messages queued; resetting its session");
                sessions.remove(&id);
                gone.push(id);
            }
        } else {
            tracing::debug!(peer = %router.rib.peers[id].name, "message for a session that is gone");
        }
    }
    for t in out.timers.drain(..) {
        let me = me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(t.after).await;
            let _ = me.send(ToRib::StaleExpired(t.peer, t.generation));
        });
    }
    gone
}

/// Refresh the shared status (every peer's counters, the changed routes' paths) and the
/// learned routes the host routes by.
fn publish(
    router: &Router,
    status: &SharedStatus,
    learned: &watch::Sender<Learned>,
    changed: &[IpNet],
) {
    let rib = &router.rib;
    let mut s = status.lock().expect("not poisoned");
    for (i, c) in rib.counters.iter().enumerate() {
        s.sessions[i].prefixes = c.clone();
        s.sessions[i].accepted_now = rib.accepted_count(i);
    }
    for p in changed {
        let paths: Vec<LearnedPath> = rib
            .multipath(p)
            .iter()
            .filter_map(|x| {
                x.from.map(|i| LearnedPath {
                    peer: rib.peers[i].name.clone(),
                    from_client: rib.peers[i].kind == PeerKind::Client,
                    next_hop: x.attributes.next_hop,
                })
            })
            .collect();
        if paths.is_empty() {
            s.routes.remove(p);
        } else {
            s.routes.insert(*p, paths);
        }
    }
    drop(s);
    learned.send_if_modified(|l| {
        let mut modified = false;
        for p in changed {
            let by = router.learned(p);
            let before = if by.is_empty() {
                l.remove(p)
            } else {
                l.insert(*p, by.clone())
            };
            modified |= before.as_ref() != (!by.is_empty()).then_some(&by);
        }
        modified
    });
}

/// A stand-alone reflector for `bench/bgp` (the shared rr-bench harness's `custom` mode):
/// clients from `clients` (address, allowed block), one non-client listener, no
/// client-to-client reflection; writes the number of learned prefixes to `count_file` every
/// 100 ms.
pub async fn bench_reflector(
    listen: SocketAddr,
    asn: u32,
    clients: Vec<(IpAddr, IpNet)>,
    listener: IpAddr,
    count_file: std::path::PathBuf,
) -> std::io::Result<()> {
    use super::rib::{PeerKind, Policy};
    let IpAddr::V4(id) = listen.ip() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "IPv4 listen address needed",
        ));
    };
    let policy = |allow: Vec<IpNet>| Policy {
        allow,
        deny: vec![],
        max_prefix: 1000,
        next_hop_self: None,
        next_hop_self_v6: None,
    };
    let mut peers: Vec<PeerConfig> = clients
        .iter()
        .enumerate()
        .map(|(i, (ip, block))| PeerConfig {
            peer: RibPeer {
                name: format!("c{i}"),
                kind: PeerKind::Client,
                policy: policy(vec![*block]),
                router_id: None,
            },
            address: *ip,
            active: false,
        })
        .collect();
    peers.push(PeerConfig {
        peer: RibPeer {
            name: "listener".into(),
            kind: PeerKind::NonClient,
            policy: policy(vec![]),
            router_id: None,
        },
        address: listener,
        active: false,
    });
    let speaker = start(SpeakerConfig {
        local_as: asn,
        router_id: id,
        local_address: listen.ip(),
        listen: Some(listen),
        hold_time: 90,
        restart_time: 0,
        peers,
        originate: vec![],
        client_to_client: false,
        learn: Learn::FromClients,
        drained: false,
    })
    .await?;
    loop {
        let n = speaker.status.lock().expect("not poisoned").routes.len();
        let tmp = count_file.with_extension("tmp");
        std::fs::write(&tmp, format!("{n}\n"))?;
        std::fs::rename(&tmp, &count_file)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that never reads: the write gives up at the deadline (the session then ends)
    /// instead of blocking the session, and its hold timer, for ever.
    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_reads_gives_up_at_the_deadline() {
        let (mut ours, _theirs) = tokio::io::duplex(64);
        let t = tokio::time::Instant::now();
        let e = write_within(&mut ours, &[0u8; 4096], Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(e, "write: the peer has not read for 30 s");
        assert_eq!(t.elapsed(), Duration::from_secs(30));
        let (mut ours, mut theirs) = tokio::io::duplex(8192);
        write_within(&mut ours, &[1u8; 4096], Duration::from_secs(30))
            .await
            .unwrap();
        let mut got = vec![0u8; 4096];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(got, vec![1u8; 4096]);
    }

    /// The RIB's queue to one session is capped: past [`OUT_QUEUE_MAX`] waiting messages an
    /// offer is refused (the RIB then drops the outbox and the session resets); what the
    /// session takes makes room again.
    #[test]
    fn a_sessions_queue_is_capped() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let o = Outbox {
            tx,
            queued: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            overflowed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        for _ in 0..OUT_QUEUE_MAX {
            assert!(o.offer(Message::Keepalive));
        }
        assert!(!o.overflowed.load(std::sync::atomic::Ordering::Relaxed));
        assert!(!o.offer(Message::Keepalive), "one too many");
        assert!(
            o.overflowed.load(std::sync::atomic::Ordering::Relaxed),
            "the session is told"
        );
        assert!(rx.try_recv().is_ok());
        o.queued
            .store(OUT_QUEUE_MAX - 1, std::sync::atomic::Ordering::Relaxed);
        assert!(o.offer(Message::Keepalive));
    }
}
