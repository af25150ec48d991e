//! The BGP driver (edge): TCP sessions, timers and the task that owns the RIB. All decisions
//! are the pure modules': [`super::fsm::Session`] for each session, [`super::rib::Rib`] for
//! routes. Tasks and channels:
//!
//! ```text
//!  listener ──(accepted stream, by peer address)──▶ session task per peer ◀── connect loop
//!  session task ──Event::{Up, Update, Refresh, Down}──▶ RIB task ──Vec<Message>──▶ session task
//! ```
//! A connection from an address that is not a configured peer is closed at once and counted.

use super::fsm::{Action, Config as FsmConfig, Event as FsmEvent, Negotiated, Session};
use super::rib::{Applied, Counters, Peer, PeerId, PeerKind, Rib};
use super::setup::{PeerConfig, SpeakerConfig, PORT};
use super::wire::{self, Attributes, Context, Families, Message, Nlri, Notification, Update};
use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

const CONNECT_RETRY: Duration = Duration::from_secs(2);
/// Backlog for the listener: a thousand clients may connect at once after a gateway restart.
const BACKLOG: u32 = 4096;

/// What `appliance status` shows per session, like `birdc show protocols`.
#[derive(Debug, Clone, Serialize, Default)]
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
}

#[derive(Debug, Default)]
pub struct Status {
    pub sessions: Vec<SessionStatus>,
    pub refused_connections: u64,
    /// Learned prefixes with their equal-cost paths: which peer, which next hop.
    pub routes: BTreeMap<IpNet, Vec<LearnedPath>>,
    /// Counts the changes to `routes`, so a reader can tell cheaply whether to look again.
    pub routes_version: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
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
}

impl Speaker {
    /// Tell every established peer we are going away on purpose (Cease, administrative
    /// shutdown): they withdraw our routes at once. A crash or SIGKILL sends nothing, so peers
    /// keep our routes for the graceful-restart time instead (RFC 4724).
    /// The datapath says whether `peer` (a node) can be reached at all. When it cannot (every
    /// tunnel link dead), its session is reset and its routes withdrawn at once, instead of
    /// waiting out the hold timer: the site router stops sending traffic this way within a
    /// second. The node reconnects when its links come back.
    pub fn set_reachable(&self, peer: &str, reachable: bool) {
        if let Some(id) = self.names.iter().position(|n| n == peer) {
            let _ = self.tx.send(ToRib::Reachable(id, reachable));
        }
    }

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
    Up(PeerId, Negotiated, mpsc::UnboundedSender<Message>),
    Update(PeerId, Update),
    Refresh(PeerId),
    /// Session down; with a duration the peer restarts gracefully and its routes stay stale.
    Down(PeerId, Option<Duration>),
    /// The restart time given to a peer in `generation` of its sessions ran out.
    StaleExpired(PeerId, u64),
    /// The datapath can (or can no longer) reach this peer.
    Reachable(PeerId, bool),
}

/// Start the speaker; it runs until the runtime stops.
pub async fn start(cfg: SpeakerConfig) -> std::io::Result<Speaker> {
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
    let (rib_tx, rib_rx) = mpsc::unbounded_channel();
    let mut accept_txs = BTreeMap::new();
    for (id, p) in cfg.peers.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel::<TcpStream>();
        accept_txs.insert(p.address, tx);
        let fsm = FsmConfig {
            local_as: cfg.local_as,
            local_id: cfg.router_id,
            peer_as: cfg.local_as,
            hold_time: cfg.hold_time,
            restart_time: cfg.restart_time,
        };
        tokio::spawn(peer_task(
            id,
            p.clone(),
            cfg.local_address,
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
    tokio::spawn(rib_task(rib, rib_rx, rib_tx.clone(), status.clone()));
    Ok(Speaker {
        status,
        tx: rib_tx,
        names,
    })
}

async fn accept_task(
    listener: TcpListener,
    peers: BTreeMap<IpAddr, mpsc::UnboundedSender<TcpStream>>,
    status: SharedStatus,
) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
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
                let _ = tx.send(stream);
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

async fn connect(local: IpAddr, to: IpAddr) -> std::io::Result<TcpStream> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(local, 0))?;
    tokio::time::timeout(
        Duration::from_secs(5),
        socket.connect(SocketAddr::new(to, PORT)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

async fn peer_task(
    id: PeerId,
    p: PeerConfig,
    local: IpAddr,
    fsm: FsmConfig,
    mut accepted: mpsc::UnboundedReceiver<TcpStream>,
    rib: mpsc::UnboundedSender<ToRib>,
    status: SharedStatus,
) {
    loop {
        let stream = if p.active {
            tokio::select! {
                s = connect(local, p.address) => match s {
                    Ok(s) => s,
                    Err(e) => {
                        set_state(&status, id, "Active", Some(format!("connect: {e}")));
                        tokio::time::sleep(CONNECT_RETRY).await;
                        continue;
                    }
                },
                Some(s) = accepted.recv() => s,
            }
        } else {
            set_state(&status, id, "Active", None);
            match accepted.recv().await {
                Some(s) => s,
                None => return,
            }
        };
        let (reason, keep_stale) =
            run_session(id, &p, stream, fsm.clone(), &rib, &status, &mut accepted).await;
        tracing::info!(peer = %p.peer.name, %reason, ?keep_stale, "BGP session down");
        set_state(&status, id, "Active", Some(reason.clone()));
        let _ = rib.send(ToRib::Down(id, keep_stale));
        tokio::time::sleep(CONNECT_RETRY).await;
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
    fsm: FsmConfig,
    rib: &mpsc::UnboundedSender<ToRib>,
    status: &SharedStatus,
    accepted: &mut mpsc::UnboundedReceiver<TcpStream>,
) -> (String, Option<Duration>) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut s = Session::new(fsm);
    s.start();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
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
                    let bytes = wire::encode(&m, s.context());
                    if let Err(e) = wr.write_all(&bytes).await {
                        return (format!("write: {e}"), None);
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
                    let _ = wr.shutdown().await;
                }
                Action::Established(n) => {
                    tracing::info!(peer = %p.peer.name, id = %n.peer_id, hold = n.hold_time, "BGP session established");
                    set_state(status, id, "Established", None);
                    {
                        let mut s = status.lock().expect("not poisoned");
                        s.sessions[id].add_path_rx = n.add_path_rx;
                        s.sessions[id].add_path_tx = n.add_path_tx;
                    }
                    let _ = rib.send(ToRib::Up(id, n, out_tx.clone()));
                }
                Action::Down { reason, keep_stale } => return (reason, keep_stale),
                Action::Update(u) => {
                    if !u.errors.is_empty() {
                        tracing::warn!(peer = %p.peer.name, errors = ?u.errors, treat_as_withdraw = u.treat_as_withdraw, "malformed UPDATE attributes (RFC 7606)");
                    }
                    let _ = rib.send(ToRib::Update(id, u));
                }
                Action::RouteRefresh { .. } => {
                    let _ = rib.send(ToRib::Refresh(id));
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
                let _ = extra.write_all(&cease).await;
                tracing::debug!(peer = %p.peer.name, "second connection refused (collision)");
            }
            Some(m) = out_rx.recv() => {
                if let Message::Notification(n) = &m {
                    pending = s.handle(FsmEvent::Stop { subcode: n.subcode });
                } else {
                    pending = vec![Action::Send(m)];
                }
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

struct Established {
    tx: mpsc::UnboundedSender<Message>,
    ctx: Context,
    /// What we told this peer (Adj-RIB-Out), to send only differences. Path identifiers are
    /// ours (ADD-PATH) or 0.
    sent: BTreeMap<Nlri, Attributes>,
}

async fn rib_task(
    mut rib: Rib,
    mut rx: mpsc::UnboundedReceiver<ToRib>,
    me: mpsc::UnboundedSender<ToRib>,
    status: SharedStatus,
) {
    let mut up: BTreeMap<PeerId, Established> = BTreeMap::new();
    // Counts each peer's sessions, so a restart timer from an earlier one is ignored.
    let mut generation: Vec<u64> = vec![0; rib.peers.len()];
    while let Some(ev) = rx.recv().await {
        let changed: Vec<IpNet> = match ev {
            ToRib::Shutdown(done) => {
                for e in up.values() {
                    let _ = e.tx.send(Message::Notification(Notification::cease(2)));
                }
                let _ = done.send(());
                Vec::new()
            }
            ToRib::Up(id, n, tx) => {
                generation[id] += 1;
                rib.peers[id].router_id = Some(n.peer_id);
                up.insert(
                    id,
                    Established {
                        tx,
                        ctx: n.context(),
                        sent: BTreeMap::new(),
                    },
                );
                export_all(&rib, id, up.get_mut(&id).expect("inserted"));
                Vec::new()
            }
            ToRib::Refresh(id) => {
                if let Some(e) = up.get_mut(&id) {
                    e.sent.clear();
                    export_all(&rib, id, e);
                }
                Vec::new()
            }
            ToRib::Down(id, Some(restart)) => {
                up.remove(&id);
                rib.mark_stale(id);
                tracing::info!(peer = %rib.peers[id].name, stale = rib.stale_count(id), ?restart, "peer restarting gracefully: routes kept stale");
                let (me, g) = (me.clone(), generation[id]);
                tokio::spawn(async move {
                    tokio::time::sleep(restart).await;
                    let _ = me.send(ToRib::StaleExpired(id, g));
                });
                Vec::new()
            }
            ToRib::Down(id, None) => {
                up.remove(&id);
                rib.peer_down(id)
            }
            ToRib::StaleExpired(id, g) if g == generation[id] && !up.contains_key(&id) => {
                tracing::warn!(peer = %rib.peers[id].name, "restart time over: stale routes removed");
                rib.sweep_stale(id)
            }
            ToRib::StaleExpired(..) => Vec::new(),
            ToRib::Reachable(id, false) => {
                if let Some(e) = up.remove(&id) {
                    tracing::warn!(peer = %rib.peers[id].name, "no live tunnel to this peer: session reset, routes withdrawn");
                    // Cease 6/8 ("out of resources" is the closest) ends the session task.
                    let _ = e.tx.send(Message::Notification(Notification::cease(8)));
                }
                rib.sweep_stale(id);
                rib.peer_down(id)
            }
            ToRib::Reachable(_, true) => Vec::new(),
            ToRib::Update(id, u) => {
                let Applied {
                    mut changed,
                    rejected,
                    max_prefix_exceeded,
                } = rib.apply(id, &u);
                if u.is_end_of_rib() {
                    // RFC 4724: after End-of-RIB, what the peer did not re-announce is gone.
                    changed.extend(rib.sweep_stale(id));
                }
                for (prefix, why) in &rejected {
                    tracing::warn!(peer = %rib.peers[id].name, %prefix, %why, "prefix rejected");
                }
                if max_prefix_exceeded {
                    tracing::error!(peer = %rib.peers[id].name, max = rib.peers[id].policy.max_prefix, "max-prefix exceeded: stopping the session");
                    if let Some(e) = up.get(&id) {
                        let _ = e.tx.send(Message::Notification(Notification::cease(1)));
                    }
                }
                changed
            }
        };
        for prefix in &changed {
            for (id, e) in up.iter_mut() {
                export_one(&rib, *id, e, prefix);
            }
        }
        publish(&rib, &status, &changed);
    }
}

fn export_one(rib: &Rib, to: PeerId, e: &mut Established, prefix: &IpNet) {
    // (our path identifier, attributes); 0 for the one path of a session without ADD-PATH.
    let paths = if e.ctx.add_path_tx.has(matches!(prefix, IpNet::V6(_))) {
        rib.export_paths(to, prefix)
    } else {
        rib.export(to, prefix).map(|a| (0, a)).into_iter().collect()
    };
    let want: Vec<(Nlri, Attributes)> = paths
        .into_iter()
        .map(|(path_id, a)| {
            let prefix = *prefix;
            (Nlri { prefix, path_id }, a)
        })
        .collect();
    let had: Vec<Nlri> = e
        .sent
        .range(
            Nlri::from(*prefix)..=Nlri {
                prefix: *prefix,
                path_id: u32::MAX,
            },
        )
        .map(|(n, _)| *n)
        .collect();
    let gone: Vec<Nlri> = had
        .into_iter()
        .filter(|n| !want.iter().any(|(w, _)| w == n))
        .collect();
    let mut msgs = wire::updates(&gone, &[], None);
    for n in &gone {
        e.sent.remove(n);
    }
    for (n, a) in want {
        if e.sent.get(&n) != Some(&a) {
            msgs.extend(wire::updates(&[], &[n], Some(&a)));
            e.sent.insert(n, a);
        }
    }
    for u in msgs {
        let _ = e.tx.send(Message::Update(u));
    }
}

fn export_all(rib: &Rib, to: PeerId, e: &mut Established) {
    for prefix in rib.prefixes() {
        export_one(rib, to, e, &prefix);
    }
    // End-of-RIB (RFC 4724): an empty UPDATE.
    let _ = e.tx.send(Message::Update(Update::default()));
}

/// Refresh the shared status: every peer's counters, and the learned routes that changed.
fn publish(rib: &Rib, status: &SharedStatus, changed: &[IpNet]) {
    let mut s = status.lock().expect("not poisoned");
    for (i, c) in rib.counters.iter().enumerate() {
        s.sessions[i].prefixes = c.clone();
        s.sessions[i].accepted_now = rib.accepted_count(i);
    }
    if !changed.is_empty() {
        s.routes_version += 1;
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
            peer: Peer {
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
        peer: Peer {
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
