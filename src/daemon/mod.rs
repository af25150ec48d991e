//! `appliance run`: reconcile the host, run the datapath of every link, and keep both in step.
//!
//! ```text
//!  tick (25 ms) ── engine.tick(now), verdicts(now) ─┐
//!  speaker ──watch<Learned>─────────────────────────┼─▶ Core (pure) ─▶ Reaction ─▶ edges:
//!  drift (10 s) ── observe: underlay networks ──────┘     routes: one netlink request per change
//!  SIGHUP / control socket ── reload                      tables: rt.replace(link.rebuild(spec))
//!                                                         reachable: speaker.set_reachable
//! ```
//!
//! One tokio task (current-thread runtime) owns everything that changes state: the [`Core`]
//! (config, liveness, learned routes, installed kernel state), the link runtimes and the
//! netlink handle. It holds the namespace's reconcile lock for its whole life. Packet threads
//! never block it.
//!
//! A liveness or learned-route change applies exactly the kernel changes between the installed
//! state and the new intent (a link flip: one route replace per prefix over that link), with
//! no dump and no verify; if one fails, a full reconcile follows. The full reconcile (observe,
//! plan, apply, verify) runs at start, on reload and every 10 s to repair drift, and observes
//! the underlay networks the node import policy reads. Each transition is logged once.

pub mod control;
pub mod core;
pub mod http;
pub mod metrics;
pub mod rotate;
pub mod status;

use crate::bgp::router::Learned;
use crate::datapath::engine::Link;
use crate::datapath::runtime::{queues_per_link, LinkRuntime};
use crate::host::keyfile::load_private_key;
use crate::host::netlink::Netlink;
use crate::host::reconcile::{self, Lock};
use crate::intent::links::LinkSpec;
use crate::intent::plan::{diff, Plan};
use crate::intent::state::HostState;
use crate::model::config::{self, Config};
use crate::model::key::{PrivateKey, PublicKey};
use control::Request;
use core::{verdicts, Core, Reaction};
use status::{BgpStatus, KernelStatus, LearnedRoute, Reply, Status};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const TICK: Duration = Duration::from_millis(25);
/// A tick this late is logged: a third of the shortest liveness deadline (100 ms x 2).
const STALL: Duration = Duration::from_millis(100);
const RATE_LIMIT_RESET: Duration = Duration::from_secs(1);
const DRIFT_CHECK: Duration = Duration::from_secs(10);

pub struct Options {
    pub config: PathBuf,
    pub host: String,
    pub key_file: PathBuf,
    /// Where to serve `/metrics`, over the site file's `metrics-port` on the host's address.
    pub metrics: Option<std::net::SocketAddr>,
    /// Cores the datapath may use: the links' queues together get a worker pair per core
    /// ([`crate::datapath::runtime::queues_per_link`]). None: the cores this process may run
    /// on.
    pub workers: Option<std::num::NonZeroUsize>,
}

struct Daemon {
    opts: Options,
    core: Core,
    bgp: Option<crate::bgp::speaker::Speaker>,
    /// None on a relay (no links).
    keys: Option<Keys>,
    rotation: rotate::Rotation,
    /// The link being moved to the target key, and the key it had.
    before_move: Option<(String, PrivateKey)>,
    /// "Every link on the next key" was said (once per rotation).
    rotated_said: bool,
    /// Live peers whose site file does not list the next key yet (links to them wait).
    key_unready: std::collections::BTreeSet<String>,
    nl: Netlink,
    lock: Lock,
    links: BTreeMap<String, LinkRuntime>,
    started: Instant,
    kernel: KernelStatus,
    bfd: Option<crate::bfd::driver::SharedBfd>,
    /// When the last tick ran: a loop blocked past [`STALL`] delays every probe and keepalive.
    last_tick: Option<Instant>,
    /// Liveness transitions so far, per (peer, link index).
    flips: BTreeMap<(String, u32), u64>,
    /// Refused claims already reported, per (peer, link index).
    claims: BTreeMap<(String, u32), u64>,
    /// A node being drained (`appliance drain` on the node).
    node_drain: Option<NodeDrain>,
    /// The gateways whose probes ask this node to drain (`appliance drain NODE` there).
    drain_asked: std::collections::BTreeSet<String>,
}

/// A node drains in three steps: it refuses new TCP connections from the tunnels at once; it
/// waits until its tunnels carry less than [`QUIET_BYTES`] a second for [`QUIET_FOR`]; then it
/// withdraws its prefixes (the site stops routing to it) and says it can be evicted.
struct NodeDrain {
    started: Instant,
    last_bytes: u64,
    quiet_since: Option<Instant>,
    withdrawn: bool,
}

const QUIET_BYTES: u64 = 16 * 1024;
const QUIET_FOR: Duration = Duration::from_secs(5);

async fn next_bfd(
    rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<crate::bfd::driver::Change>>,
) -> Option<crate::bfd::driver::Change> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Read and validate a config file; the error is the rendered diagnostics.
fn load(path: &std::path::Path) -> Result<Config, String> {
    let text = std::fs::read(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))
        .and_then(|b| config::text_of(&path.display().to_string(), b))?;
    config::parse(&path.display().to_string(), &text).map_err(|r| r.render())
}

/// A host's private keys: the one the site file lists as its `public-key`, and the one it
/// lists as its `next-public-key` when the host holds it (the links move to that one).
#[derive(Clone)]
struct Keys {
    current: PrivateKey,
    next: Option<PrivateKey>,
    /// Why a next key the site file lists is not used, or a next key file is ignored.
    note: Option<String>,
}

impl Keys {
    /// The key the links run on once the rotation (if any) is done.
    fn target(&self) -> &PrivateKey {
        self.next.as_ref().unwrap_or(&self.current)
    }
}

/// Where a host keeps its next private key: beside the key file, `KEYFILE.next`
/// (`appliance rotate-key` writes it).
pub fn next_key_file(key_file: &std::path::Path) -> PathBuf {
    let mut p = key_file.as_os_str().to_owned();
    p.push(".next");
    PathBuf::from(p)
}

/// Read the key file and, if it exists, the next key file, and match them to the site
/// file's keys for `host`. Which file holds which key does not matter (`rotate-key
/// --finish` renames one over the other): one must hold the listed `public-key`.
fn load_keys(cfg: &Config, host: &str, key_file: &std::path::Path) -> Result<Keys, String> {
    let first = load_private_key(key_file).map_err(|e| e.to_string())?;
    let next_file = next_key_file(key_file);
    let second = if next_file.exists() {
        Some(load_private_key(&next_file).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let held: Vec<&PrivateKey> = std::iter::once(&first).chain(second.as_ref()).collect();
    let find = |k: PublicKey| held.iter().find(|p| p.public() == k).map(|p| (*p).clone());
    let current = match cfg.public_key_of(host) {
        None => first.clone(),
        Some(k) => find(k).ok_or_else(|| {
            format!(
                "the private key's public key is {}, but the config lists {k} for {host}: wrong key file or stale config",
                first.public()
            )
        })?,
    };
    let (next, note) = match cfg.next_public_key_of(host) {
        Some(k) => match find(k) {
            Some(p) => (Some(p), None),
            None => (
                None,
                Some(format!(
                    "the site file lists next key {k} for {host}, but neither {} nor {} holds it: the links stay on the current key",
                    key_file.display(),
                    next_file.display()
                )),
            ),
        },
        None => (
            None,
            second
                .as_ref()
                .filter(|s| s.public() != current.public())
                .map(|s| {
                    format!(
                        "{} holds {}, which the site file does not list as {host}'s next key: not used",
                        next_file.display(),
                        s.public()
                    )
                }),
        ),
    };
    Ok(Keys {
        current,
        next,
        note,
    })
}

/// The next value of the learned routes; never returns when there is no speaker (or it ended).
async fn next_learned(rx: &mut Option<watch::Receiver<Learned>>) -> Learned {
    if let Some(rx) = rx {
        if rx.changed().await.is_ok() {
            return rx.borrow_and_update().clone();
        }
    }
    std::future::pending().await
}

impl Daemon {
    /// Observe the host, plan against the current intent and apply (with verify); records the
    /// installed state. Also observes the underlay networks: when they changed, the intent is
    /// derived again before planning.
    async fn sync(&mut self) -> Result<Plan, String> {
        self.kernel.full_reconciles += 1;
        let mut intent = self.core.intent()?;
        let have = self
            .nl
            .observe(&intent.kernel)
            .await
            .map_err(|e| e.to_string())?;
        if self.core.set_underlay(have.underlay.iter().copied()) {
            let r = self.core.underlay_changed()?;
            self.replace_tables(&r.tables);
            intent = self.core.intent()?;
        }
        let want = intent.kernel;
        let plan =
            diff(&self.opts.host, self.core.role(), &want, &have).map_err(|e| e.to_string())?;
        if !plan.is_empty() {
            reconcile::apply_held(&self.nl, &self.lock, &want, &plan)
                .await
                .map_err(|e| e.to_string())?;
        }
        self.core.installed(want);
        Ok(plan)
    }

    /// Start link `spec`, one of the host's `links` link devices.
    fn start_link(&mut self, spec: &LinkSpec, links: usize) -> Result<(), String> {
        // A link starts on the current key; a rotation moves it to the next one.
        let key = &self.keys.as_ref().ok_or("no private key")?.current;
        let queues = queues_per_link(self.workers(), links);
        let rt = LinkRuntime::start(
            Link::new(spec, key, Instant::now()),
            spec.v6_underlay,
            queues,
        )
        .map_err(|e| format!("{}: {e}", spec.dev))?;
        if self.node_drain.is_some() {
            rt.current().refuse_new_connections(true);
        }
        tracing::info!(dev = %spec.dev, port = rt.local_port(), peers = spec.peers.len(), queues, "link started");
        self.links.insert(spec.dev.clone(), rt);
        Ok(())
    }

    /// The cores the datapath may use: the setting, or what this process may run on.
    fn workers(&self) -> usize {
        self.opts
            .workers
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, |n| n.get())
    }

    /// Give the running links new prefix → peer tables (sessions and endpoints are kept).
    fn replace_tables(&self, specs: &[LinkSpec]) {
        for spec in specs {
            if let Some(rt) = self.links.get(&spec.dev) {
                rt.replace(rt.current().rebuild(spec));
            }
        }
    }

    async fn tick(&mut self) {
        let policy = self.core.policy();
        let now = Instant::now();
        if let Some(late) = self.last_tick.map(|t| now - t).filter(|d| *d > STALL) {
            tracing::warn!(
                ms = late.as_millis() as u64,
                "the daemon loop was blocked: probes and keepalives went out late"
            );
        }
        self.last_tick = Some(now);
        let current: Vec<_> = self.links.values().map(|rt| rt.current()).collect();
        for (rt, link) in self.links.values().zip(&current) {
            rt.send_all(&link.tick(policy, now));
            rt.check_gso(link, policy, now);
        }
        let seen = verdicts(current.iter().map(|l| &**l), policy, now);
        let r = self.core.verdicts(seen);
        self.react(r, "routes follow link liveness").await;
        self.rotate(now);
        if self.core.role() == config::Role::Node {
            let draining: std::collections::BTreeSet<String> = current
                .iter()
                .flat_map(|l| l.draining_peers().map(String::from).collect::<Vec<_>>())
                .collect();
            if &draining != self.core.draining() {
                tracing::info!(
                    ?draining,
                    "gateways drained (routed around while another is live)"
                );
                let r = self.core.draining_changed(draining);
                self.react(r, "routes follow gateway drains").await;
            }
            let asked: std::collections::BTreeSet<String> = current
                .iter()
                .flat_map(|l| l.drain_asked_by().map(String::from).collect::<Vec<_>>())
                .collect();
            if asked != self.drain_asked {
                self.drain_asked_changed(asked);
            }
        }
    }

    /// The gateways started or stopped asking this node to drain. Under the image's init with
    /// a workload, init drains the workload first (its drain command, until it is idle) and
    /// then asks for the network drain over the control socket; elsewhere the network drain
    /// starts (or ends) here.
    fn drain_asked_changed(&mut self, asked: std::collections::BTreeSet<String>) {
        let (was, now) = (!self.drain_asked.is_empty(), !asked.is_empty());
        let by = asked.iter().cloned().collect::<Vec<_>>().join(", ");
        self.drain_asked = asked;
        if was == now {
            return;
        }
        let supervised = std::path::Path::new(crate::workload::supervise::STATUS_FILE).exists();
        if supervised {
            let line = if now {
                format!("on {by}\n")
            } else {
                "off\n".to_string()
            };
            match crate::image::write_atomic(
                crate::workload::supervise::DRAIN_REQUEST,
                line.as_bytes(),
                0o600,
            ) {
                Ok(()) if now => {
                    tracing::warn!(gateways = %by, "drain asked by the gateways: the workload drains first, then the network")
                }
                Ok(()) => tracing::info!("the gateways no longer ask for a drain: handed to init"),
                Err(e) => tracing::error!(error = %e, "cannot hand the drain request to init"),
            }
            return;
        }
        match self.set_node_drain(now) {
            Ok(m) => tracing::warn!(gateways = %by, "drain asked by the gateways: {m}"),
            Err(e) => tracing::error!(error = %e, "drain asked by the gateways"),
        }
    }

    async fn learned(&mut self, learned: Learned) {
        let r = self.core.learned_changed(&learned);
        if let Ok(r) = &r {
            if !r.is_empty() {
                tracing::info!(
                    prefixes = self.core.learned().len(),
                    "routes learned over iBGP changed"
                );
            }
        }
        self.react(r, "routes follow iBGP").await;
    }

    /// Perform a reaction: log transitions, replace tables, apply the kernel plan (a full
    /// reconcile when it fails or the installed state is unknown), then tell BGP which peers
    /// became (un)reachable: after the routes, so a session dialled at once finds its route.
    async fn react(&mut self, r: Result<Reaction, String>, why: &str) {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot derive the host intent");
                return;
            }
        };
        for ((peer, link), alive) in &r.transitions {
            *self.flips.entry((peer.clone(), *link)).or_default() += 1;
            if *alive {
                tracing::info!(%peer, link, "link up");
            } else {
                tracing::warn!(%peer, link, "link down: no packet for {:?}", self.core.policy().deadline());
            }
        }
        self.replace_tables(&r.tables);
        self.apply_kernel(r.kernel, r.full, why).await;
        if let Some(b) = &self.bgp {
            for (peer, reachable) in &r.reachable {
                b.set_reachable(peer, *reachable);
            }
        }
    }

    async fn apply_kernel(&mut self, kernel: Option<(Plan, HostState)>, full: bool, why: &str) {
        let t = Instant::now();
        if let Some((plan, want)) = kernel {
            match reconcile::apply_steps_only(&self.nl, &self.lock, &plan).await {
                Ok(()) => {
                    self.core.installed(want);
                    self.kernel.updates += 1;
                    self.kernel.last_update_changes = plan.changes.len();
                    self.kernel.last_update_us = Some(t.elapsed().as_micros() as u64);
                    tracing::info!(
                        changes = plan.changes.len(),
                        took_us = t.elapsed().as_micros() as u64,
                        "{why}"
                    );
                    return;
                }
                Err(e) => {
                    self.kernel.errors += 1;
                    tracing::warn!(error = %e, "route update failed; reconciling in full");
                    self.core.forget_installed();
                }
            }
        } else if !full {
            return;
        }
        match self.sync().await {
            Ok(plan) => tracing::info!(
                changes = plan.changes.len(),
                took_ms = t.elapsed().as_millis() as u64,
                "{why} (full reconcile)"
            ),
            Err(e) => {
                self.kernel.errors += 1;
                tracing::error!(error = %e, "route update failed")
            }
        }
    }

    fn reset_rate_limiters(&self) {
        for rt in self.links.values() {
            rt.current().reset_rate_limiter();
        }
    }

    fn tunnel_bytes(&self) -> u64 {
        let now = Instant::now();
        let always = |_: &str, _: u32| true;
        self.links
            .values()
            .flat_map(|rt| rt.current().status(&always, now))
            .map(|p| p.rx_bytes + p.tx_bytes)
            .sum()
    }

    /// Start or end a node's drain.
    fn set_node_drain(&mut self, on: bool) -> Result<String, String> {
        if self.core.role() != config::Role::Node {
            return Err("only a node drains this way; a gateway is drained in the site file (appliance drain GATEWAY -c FILE)".into());
        }
        for rt in self.links.values() {
            rt.current().refuse_new_connections(on);
        }
        match (on, self.node_drain.take()) {
            (true, Some(d)) => {
                self.node_drain = Some(d);
                Ok(format!("{} is already draining", self.opts.host))
            }
            (true, None) => {
                self.node_drain = Some(NodeDrain {
                    started: Instant::now(),
                    last_bytes: self.tunnel_bytes(),
                    quiet_since: None,
                    withdrawn: false,
                });
                tracing::warn!("draining: new connections from the tunnels refused; the prefixes are withdrawn once the tunnels are quiet");
                Ok(format!(
                    "{} draining: new connections refused; withdrawn once its tunnels carry under {} KiB/s for {}s",
                    self.opts.host,
                    QUIET_BYTES / 1024,
                    QUIET_FOR.as_secs()
                ))
            }
            (false, d) => {
                if d.is_some_and(|d| d.withdrawn) {
                    if let Some(b) = &self.bgp {
                        b.set_drained(false);
                    }
                }
                tracing::info!("back in service: prefixes announced, new connections taken");
                Ok(format!("{} back in service", self.opts.host))
            }
        }
    }

    /// Once a second while a node drains: is it quiet yet, and long enough to withdraw?
    fn node_drain_tick(&mut self) {
        if self.node_drain.is_none() {
            return;
        }
        let bytes = self.tunnel_bytes();
        let Some(d) = &mut self.node_drain else {
            return;
        };
        let now = Instant::now();
        let rate = bytes.saturating_sub(d.last_bytes);
        d.last_bytes = bytes;
        if rate >= QUIET_BYTES {
            d.quiet_since = None;
            return;
        }
        let since = *d.quiet_since.get_or_insert(now);
        if !d.withdrawn && now - since >= QUIET_FOR {
            d.withdrawn = true;
            tracing::warn!(
                quiet_s = (now - since).as_secs(),
                "drained: the tunnels are quiet; prefixes withdrawn, ready to evict"
            );
            if let Some(b) = &self.bgp {
                b.set_drained(true);
            }
        }
    }

    /// Say once a second, per (link, peer), that handshakes were refused because another
    /// instance claims a live peer's key (see `Link::inbound`).
    fn report_claims(&mut self) {
        let now = Instant::now();
        let always = |_: &str, _: u32| true;
        for rt in self.links.values() {
            let link = rt.current();
            if !link.any_claims() {
                continue;
            }
            for p in link.status(&always, now) {
                let seen = self
                    .claims
                    .entry((p.peer.clone(), p.link_index))
                    .or_default();
                if p.claims_refused > *seen {
                    tracing::warn!(
                        peer = %p.peer,
                        link = %p.link,
                        refused = p.claims_refused - *seen,
                        claimant = p.claimant.as_deref().unwrap_or("?"),
                        holder = p.endpoint.as_deref().unwrap_or("?"),
                        "a second instance claims this peer's key (slot) while it is live, or someone forges its handshakes: refused"
                    );
                    *seen = p.claims_refused;
                }
            }
        }
    }

    /// One step of a key rotation: while some link is not on the target key, move the next
    /// one (see [`rotate`]). Costs nothing when every link is on it.
    fn rotate(&mut self, now: Instant) {
        let Some(keys) = &self.keys else {
            return;
        };
        let target = keys.target().clone();
        let tp = target.public();
        let all_on = self
            .links
            .values()
            .all(|rt| rt.current().public_key() == tp);
        if all_on && self.rotation.moving().is_none() {
            self.key_unready.clear();
            if !self.rotated_said && keys.next.is_some() && self.rotation.moves > 0 {
                self.rotated_said = true;
                tracing::info!(
                    key = %tp,
                    moves = self.rotation.moves,
                    "key rotation: every link runs on the next key; retire the old one with `appliance rotate-key {} --finish`",
                    self.opts.host
                );
            }
            return;
        }
        self.rotated_said = false;
        let core = &self.core;
        let views: Vec<rotate::LinkView> = self
            .links
            .values()
            .map(|rt| {
                let l = rt.current();
                rotate::LinkView {
                    dev: l.spec_dev.clone(),
                    on_target: l.public_key() == tp,
                    live: l
                        .peers()
                        .iter()
                        .filter(|p| core.is_alive(&p.spec.name, l.index))
                        .map(|p| p.spec.name.clone())
                        .collect(),
                    established: l.established_peers(),
                    // Every peer takes the current key; the next one only where listed.
                    ready: if keys.next.is_some() {
                        l.ready_for_next_key(&tp)
                    } else {
                        l.peers().iter().map(|p| p.spec.name.clone()).collect()
                    },
                }
            })
            .collect();
        let waiting = self.rotation.waiting_for(&views);
        let unready = rotate::Rotation::unready(&views);
        if unready != self.key_unready {
            if !unready.is_empty() {
                tracing::info!(peers = ?unready, "key rotation: waiting for these peers to list the next key (deploy the site file to them and reload)");
            }
            self.key_unready = unready;
        }
        let moves = self.rotation.moves;
        let step = self.rotation.step(&views, now);
        if self.rotation.moves > moves {
            tracing::info!(
                done = self.rotation.moves,
                "key rotation: link moved (its peers hold the new key)"
            );
        }
        let (dev, key, back) = match step {
            rotate::Step::Wait => return,
            rotate::Step::Nudge(dev, late) => {
                if let Some(rt) = self.links.get(&dev) {
                    rt.send_all(&rt.current().initiate_to(|p| late.contains(p)));
                }
                return;
            }
            rotate::Step::Move(dev) => (dev, target, false),
            rotate::Step::Revert(dev) => {
                // Back to the key the link had, if the site file still lists it.
                let listed = |k: &PrivateKey| {
                    k.public() == keys.current.public()
                        || keys.next.as_ref().is_some_and(|n| n.public() == k.public())
                };
                let key = match self.before_move.take() {
                    Some((d, k)) if d == dev && listed(&k) => k,
                    _ => keys.current.clone(),
                };
                (dev, key, true)
            }
        };
        let Some(rt) = self.links.get(&dev) else {
            return;
        };
        let old = rt.current();
        if !back {
            self.before_move = Some((dev.clone(), old.private_key()));
        }
        let new = old.rekeyed(&key);
        // The first peers at once, the rest at the nudges (see `rotate::PACE`).
        let first: std::collections::BTreeSet<String> = views
            .iter()
            .find(|v| v.dev == dev)
            .map(|v| v.live.iter().take(rotate::PACE).cloned().collect())
            .unwrap_or_default();
        let hello = new.initiate_to(|p| first.contains(p));
        rt.replace(new);
        rt.send_all(&hello);
        if back {
            tracing::warn!(
                %dev,
                waiting_for = ?waiting,
                "key rotation: these peers did not take the new key within {}s (does their site file list it?): the link is back on its old key; retrying in {}s",
                rotate::move_timeout(waiting.len()).as_secs(),
                rotate::RETRY_AFTER.as_secs()
            );
        } else {
            tracing::info!(%dev, key = %key.public(), peers = hello.len(), "key rotation: moving a link to the new key");
        }
    }

    /// Re-read the config; on any error keep running on the last good one.
    async fn reload(&mut self, path: Option<PathBuf>) -> Result<String, String> {
        let path = path.unwrap_or_else(|| self.opts.config.clone());
        let cfg = load(&path)?;
        let keys = match &self.keys {
            Some(_) => Some(load_keys(&cfg, &self.opts.host, &self.opts.key_file)?),
            None => None,
        };
        let specs = self.core.reload(cfg)?.links;
        if let Some(k) = keys {
            if let Some(n) = &k.note {
                tracing::warn!("{n}");
            }
            self.keys = Some(k);
        }
        let drained = self.drained();
        if let Some(b) = &self.bgp {
            b.set_drained(drained);
        }
        let wanted: BTreeMap<&str, &LinkSpec> = specs.iter().map(|s| (s.dev.as_str(), s)).collect();
        let gone: Vec<String> = self
            .links
            .keys()
            .filter(|d| !wanted.contains_key(d.as_str()))
            .cloned()
            .collect();
        for dev in &gone {
            if let Some(rt) = self.links.remove(dev) {
                rt.stop();
            }
        }
        self.opts.config = path;
        let plan = self.sync().await?;
        let mut started = 0;
        let mut kept = 0;
        for spec in &specs {
            match self.links.get(&spec.dev) {
                Some(rt) => {
                    rt.replace(rt.current().rebuild(spec));
                    kept += 1;
                }
                None => {
                    self.start_link(spec, specs.len())?;
                    started += 1;
                }
            }
        }
        let msg = format!(
            "config reloaded: {kept} link(s) kept, {started} started, {} stopped; host plan: {} change(s)",
            gone.len(),
            plan.changes.len()
        );
        tracing::info!("{msg}");
        Ok(msg)
    }

    /// This host is a gateway the site file drains.
    fn drained(&self) -> bool {
        self.core
            .cfg()
            .gateways
            .iter()
            .any(|g| g.name == self.opts.host && g.drain)
    }

    fn status(&self) -> Status {
        let now = Instant::now();
        let core = &self.core;
        let alive = |peer: &str, link: u32| core.is_alive(peer, link);
        let cfg = core.cfg();
        Status {
            host: self.opts.host.clone(),
            role: core.role(),
            config: self.opts.config.display().to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            keepalive_ms: cfg.site.keepalive_ms,
            dead_after: cfg.site.dead_after,
            version: env!("CARGO_PKG_VERSION").to_string(),
            drained: self.drained(),
            workload: crate::workload::supervise::read_status(),
            node_drain: self.node_drain.as_ref().map(|d| status::NodeDrainStatus {
                since_s: d.started.elapsed().as_secs(),
                quiet_s: d.quiet_since.map(|q| q.elapsed().as_secs()),
                withdrawn: d.withdrawn,
            }),
            key: self.keys.as_ref().map(|k| {
                let target = k.target().public();
                status::KeyStatus {
                    public_key: k.current.public().to_string(),
                    next_public_key: k.next.as_ref().map(|n| n.public().to_string()),
                    links_on_target: self
                        .links
                        .values()
                        .filter(|rt| rt.current().public_key() == target)
                        .count(),
                    links: self.links.len(),
                    moving: self.rotation.moving().map(String::from),
                    moves: self.rotation.moves,
                    reverts: self.rotation.reverts,
                    unready: self.key_unready.iter().cloned().collect(),
                    note: k.note.clone(),
                }
            }),
            links: self
                .links
                .values()
                .flat_map(|rt| rt.current().status(&alive, now))
                .map(|mut p| {
                    p.transitions = self
                        .flips
                        .get(&(p.peer.clone(), p.link_index))
                        .copied()
                        .unwrap_or(0);
                    p
                })
                .collect(),
            devices: self
                .links
                .values()
                .map(|rt| {
                    let mut d = rt.current().device_status();
                    d.queues = rt
                        .queue_stats()
                        .map(|q| crate::datapath::engine::QueueStatus {
                            tun_packets: q.tun_packets.load(Ordering::Relaxed),
                            udp_datagrams: q.udp_datagrams.load(Ordering::Relaxed),
                            tun_reads: q.tun_reads.load(Ordering::Relaxed),
                            tun_replies: q.tun_replies.load(Ordering::Relaxed),
                            udp_gro_off: q.udp_gro_off.load(Ordering::Relaxed),
                            udp_gro_offs: q.udp_gro_offs.load(Ordering::Relaxed),
                        })
                        .collect();
                    let gso = rt.gso_status();
                    d.udp_gso = gso.verdict;
                    d.gso_checked_with = gso.checked_with;
                    d.gso_checks = gso.checks;
                    d.tun_gro_off = rt.tun_gro_off();
                    d
                })
                .collect(),
            bgp: self.bgp.as_ref().map(|b| {
                let s = b.status.lock().expect("not poisoned");
                BgpStatus {
                    sessions: s.sessions.clone(),
                    refused_connections: s.refused_connections,
                    bfd: self
                        .bfd
                        .as_ref()
                        .map(|f| f.lock().expect("not poisoned").clone())
                        .unwrap_or_default(),
                    routes: s
                        .routes
                        .iter()
                        .map(|(p, paths)| LearnedRoute {
                            prefix: *p,
                            paths: paths.clone(),
                        })
                        .collect(),
                }
            }),
            kernel: KernelStatus {
                netlink: self.nl.counters(),
                ..self.kernel.clone()
            },
        }
    }

    /// Answer a control request that arrived whole (the socket is served elsewhere).
    async fn answer(&mut self, a: control::Asked) {
        let reply = match (a.request, a.root) {
            (Request::Status, _) => Reply::status(self.status()),
            (Request::Reload { .. }, false) => Reply::error("reload needs root"),
            (Request::Drain { .. }, false) => Reply::error("drain needs root"),
            (Request::Drain { on }, true) => match self.set_node_drain(on) {
                Ok(m) => Reply::message(m),
                Err(e) => Reply::error(e),
            },
            (Request::Reload { config }, true) => {
                match self.reload(config.map(PathBuf::from)).await {
                    Ok(msg) => Reply::message(msg),
                    Err(e) => {
                        tracing::error!("reload refused, keeping the running config:\n{e}");
                        Reply::error(e)
                    }
                }
            }
        };
        let _ = a.reply.send(reply);
    }
}

/// Raise the open-file limit to its hard maximum: every BGP session, link socket and tun
/// queue is a descriptor, and the usual soft limit of 1024 runs out near 1000 node sessions.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "open-file limit raised"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// Run until SIGTERM or SIGINT. Errors before the loop starts are returned (exit 1).
pub async fn run(opts: Options) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    raise_open_file_limit();
    let cfg = load(&opts.config)?;
    // Nothing is learned yet: a gateway starts routing only the node addresses.
    let core = Core::new(cfg, &opts.host)?;
    let first = core.all_live()?;
    let (specs, bgp) = (first.links, first.bgp);
    let keys = if specs.is_empty() {
        None
    } else {
        let k = load_keys(core.cfg(), &opts.host, &opts.key_file)?;
        if let Some(n) = &k.note {
            tracing::warn!("{n}");
        }
        Some(k)
    };
    let listener = control::bind().map_err(|e| format!("control socket: {e}"))?;
    let (ask, mut asked) = control::channel();
    control::serve(listener, ask.clone());
    if let Some(addr) = opts
        .metrics
        .or_else(|| crate::intent::metrics_listen(core.cfg(), &opts.host))
    {
        http::serve(addr, ask);
    }
    let nl = Netlink::connect().map_err(|e| format!("netlink: {e}"))?;
    let lock = reconcile::lock().map_err(|e| e.to_string())?;
    let role = core.role();
    let mut d = Daemon {
        bgp: None,
        opts,
        core,
        keys,
        rotation: rotate::Rotation::default(),
        before_move: None,
        rotated_said: false,
        key_unready: Default::default(),
        nl,
        lock,
        links: BTreeMap::new(),
        started: Instant::now(),
        kernel: KernelStatus::default(),
        bfd: None,
        last_tick: None,
        flips: BTreeMap::new(),
        claims: BTreeMap::new(),
        node_drain: None,
        drain_asked: std::collections::BTreeSet::new(),
    };
    let plan = d.sync().await?;
    tracing::info!(host = %d.opts.host, %role, changes = plan.changes.len(), "host reconciled");
    for spec in &specs {
        d.start_link(spec, specs.len())?;
    }
    let mut learned = None;
    if let Some(sc) = bgp {
        let peers = sc.peers.len();
        let speaker = crate::bgp::speaker::start(sc)
            .await
            .map_err(|e| format!("BGP: {e}"))?;
        learned = Some(speaker.learned());
        d.bgp = Some(speaker);
        tracing::info!(peers, "BGP speaker started");
    }
    let mut bfd_changes = None;
    if let Some(want) = crate::intent::bgp::bfd_sessions(d.core.cfg(), &d.opts.host) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let n = want.peers.len();
        d.bfd = Some(crate::bfd::driver::start(want, tx).map_err(|e| format!("BFD: {e}"))?);
        bfd_changes = Some(rx);
        tracing::info!(sessions = n, "BFD started");
    }
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut limiter = tokio::time::interval(RATE_LIMIT_RESET);
    let mut drift = tokio::time::interval(DRIFT_CHECK);
    drift.tick().await;
    tracing::info!(links = d.links.len(), "running");
    loop {
        tokio::select! {
            _ = tick.tick() => d.tick().await,
            l = next_learned(&mut learned) => d.learned(l).await,
            Some(c) = next_bfd(&mut bfd_changes) => {
                // A BFD session down takes its BGP session down at once (the router resets
                // it and withdraws what it learned); back up, the session redials at once.
                if let Some(b) = &d.bgp {
                    b.set_bfd(&c.peer, c.up);
                }
            }
            _ = limiter.tick() => {
                d.reset_rate_limiters();
                d.report_claims();
                d.node_drain_tick();
            }
            _ = drift.tick() => match d.sync().await {
                Ok(p) if !p.is_empty() => {
                    d.kernel.drift_repaired += p.changes.len() as u64;
                    tracing::warn!(changes = p.changes.len(), "repaired drift:\n{}", p.render_text())
                }
                Ok(_) => {}
                Err(e) => {
                    d.kernel.errors += 1;
                    tracing::error!(error = %e, "drift repair failed")
                }
            },
            _ = hup.recv() => {
                if let Err(e) = d.reload(None).await {
                    tracing::error!("reload on SIGHUP refused, keeping the running config:\n{e}");
                }
            }
            Some(a) = asked.recv() => d.answer(a).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping; tunnel devices stay and lose carrier, so their routes fail closed");
    if let Some(b) = &d.bgp {
        b.shutdown().await;
    }
    for (_, rt) in std::mem::take(&mut d.links) {
        rt.stop();
    }
    Ok(())
}
