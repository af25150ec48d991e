//! `appliance run`: reconcile the host, run the datapath of every link, and keep both in step.
//!
//! One tokio task (current-thread runtime) owns everything that changes state: the config, the
//! link runtimes, the liveness tracker and the netlink handle. It wakes on a short tick
//! (keepalives, timers, liveness), on SIGHUP and control-socket reloads, and every few seconds
//! for a full reconcile that repairs drift. Packet threads never block it.
//!
//! Liveness drives routes: a link whose peer fell silent for `dead-after` keepalive intervals
//! leaves every multipath route at once (re-plan with [`desired_live`] and apply); it comes back
//! when packets do. Each transition is logged once.

pub mod control;

use crate::datapath::engine::Link;
use crate::datapath::liveness::{Liveness, Tracker};
use crate::datapath::runtime::LinkRuntime;
use crate::host::keyfile::load_private_key;
use crate::host::netlink::Netlink;
use crate::host::reconcile;
use crate::intent::links::LinkSpec;
use crate::intent::plan::Plan;
use crate::intent::{self, Inputs, Learned};
use crate::model::config::{self, Config, Role};
use crate::model::key::PrivateKey;
use control::Request;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(25);
const RATE_LIMIT_RESET: Duration = Duration::from_secs(1);
const DRIFT_CHECK: Duration = Duration::from_secs(10);
/// Withdrawn prefixes whose blackholes a node keeps (bounded: a flapping peer cannot grow it).
const MAX_WITHDRAWN: usize = 4096;

pub struct Options {
    pub config: PathBuf,
    pub host: String,
    pub key_file: PathBuf,
}

type LinkKey = (String, u32);

struct Daemon {
    opts: Options,
    bgp: Option<crate::bgp::speaker::Speaker>,
    /// What this host learned over iBGP (see [`Daemon::learned_now`]), as last installed, and
    /// the speaker's `routes_version` it was read at.
    learned: Learned,
    learned_version: u64,
    cfg: Config,
    role: Role,
    key: Option<PrivateKey>,
    nl: Netlink,
    links: BTreeMap<String, LinkRuntime>,
    tracker: Tracker<LinkKey>,
    started: Instant,
}

/// Read and validate a config file; the error is the rendered diagnostics.
fn load(path: &std::path::Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    config::parse(&path.display().to_string(), &text).map_err(|r| r.render())
}

/// The host intent with every link counted alive: the datapath tables, which do not depend on
/// liveness, and the BGP sessions.
fn all_live(cfg: &Config, host: &str, learned: &Learned) -> Result<intent::HostIntent, String> {
    intent::derive(
        cfg,
        host,
        Inputs {
            live: &|_, _| true,
            learned,
            underlay: &[],
        },
    )
    .map_err(|e| e.to_string())
}

/// The key this host must hold, and a check that the key file matches it.
fn check_key(cfg: &Config, host: &str, key: &PrivateKey) -> Result<(), String> {
    match cfg.public_key_of(host) {
        Some(k) if k != key.public() => Err(format!(
            "the private key's public key is {}, but the config lists {k} for {host}: wrong key file or stale config",
            key.public()
        )),
        _ => Ok(()),
    }
}

impl Daemon {
    fn liveness(&self) -> Liveness {
        Liveness {
            interval: Duration::from_millis(self.cfg.site.keepalive_ms as u64),
            dead_after: self.cfg.site.dead_after,
        }
    }

    /// The host intent from the config, the live links and what iBGP taught.
    fn intent_with(&self, live: intent::Live<'_>) -> Result<intent::HostIntent, String> {
        intent::derive(
            &self.cfg,
            &self.opts.host,
            Inputs {
                live,
                learned: &self.learned,
                underlay: &[],
            },
        )
        .map_err(|e| e.to_string())
    }

    /// Bring routes (and devices, sysctls) in line with the config and the live links.
    async fn sync(&mut self) -> Result<Plan, String> {
        let tracker = &self.tracker;
        let live = |peer: &str, link: u32| tracker.is_alive(&(peer.to_string(), link));
        let intent = self.intent_with(&live)?;
        let (role, want) = (intent.role, intent.kernel);
        let plan = reconcile::plan_state(&self.nl, &self.opts.host, role, &want)
            .await
            .map_err(|e| e.to_string())?;
        if !plan.is_empty() {
            reconcile::apply(&self.nl, &want, &plan)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(plan)
    }

    fn start_link(&mut self, spec: &LinkSpec) -> Result<(), String> {
        let key = self.key.as_ref().ok_or("no private key")?;
        let rt = LinkRuntime::start(Link::new(spec, key), spec.v6_underlay)
            .map_err(|e| format!("{}: {e}", spec.dev))?;
        tracing::info!(dev = %spec.dev, port = rt.local_port(), peers = spec.peers.len(), "link started");
        self.links.insert(spec.dev.clone(), rt);
        Ok(())
    }

    async fn tick(&mut self) {
        let policy = self.liveness();
        let now = Instant::now();
        let mut seen = Vec::new();
        for rt in self.links.values() {
            let link = rt.current();
            rt.send_all(&link.tick(policy));
            for p in link.peers() {
                seen.push((
                    (p.spec.name.clone(), link.index),
                    link.alive(p, policy, now),
                ));
            }
        }
        let changes = self.tracker.update(seen);
        let mut learned_changed = false;
        if let Some((version, learned)) = self.learned_now() {
            self.learned_version = version;
            if learned != self.learned {
                tracing::info!(prefixes = learned.len(), "routes learned over iBGP changed");
                self.learned = learned;
                self.update_link_routes();
                learned_changed = true;
            }
        }
        if changes.is_empty() && !learned_changed {
            return;
        }
        if let (Some(b), Role::Gateway) = (&self.bgp, self.role) {
            // A node with no live link at all is unreachable: tell BGP at once.
            let mut touched: Vec<&str> = changes.iter().map(|((p, _), _)| p.as_str()).collect();
            touched.dedup();
            for peer in touched {
                let any =
                    (0..self.cfg.site.links).any(|i| self.tracker.is_alive(&(peer.to_string(), i)));
                b.set_reachable(peer, any);
            }
        }
        for ((peer, link), alive) in &changes {
            if *alive {
                tracing::info!(%peer, link, "link up");
            } else {
                tracing::warn!(%peer, link, "link down: no packet for {:?}", self.liveness().deadline());
            }
        }
        let t = Instant::now();
        match self.sync().await {
            Ok(plan) => tracing::info!(
                changes = plan.changes.len(),
                took_ms = t.elapsed().as_millis() as u64,
                "routes follow link liveness"
            ),
            Err(e) => tracing::error!(error = %e, "route update failed"),
        }
    }

    /// What iBGP taught this host, if the speaker's routes changed since the last look: on a
    /// node, the prefixes its gateways advertise, each with the advertising gateways; on a
    /// gateway, the prefixes each node announces (accepted by the node's import policy), each
    /// with that node.
    fn learned_now(&self) -> Option<(u64, Learned)> {
        let b = self.bgp.as_ref()?;
        let status = b.status.lock().expect("not poisoned");
        if status.routes_version == self.learned_version {
            return None;
        }
        let from_nodes = self.role == Role::Gateway;
        let mut learned: Learned = status
            .routes
            .iter()
            .filter_map(|(p, paths)| {
                // With ADD-PATH one peer may advertise several paths: a set of peers.
                let by: std::collections::BTreeSet<String> = paths
                    .iter()
                    .filter(|x| !from_nodes || x.from_client)
                    .map(|x| x.peer.clone())
                    .collect();
                (!by.is_empty()).then_some((*p, by))
            })
            .collect();
        // A prefix learned before and withdrawn since keeps its fail-closed blackhole (an
        // empty set); at most MAX_WITHDRAWN are remembered.
        let mut kept = 0;
        for p in self.learned.keys() {
            if kept < MAX_WITHDRAWN && !learned.contains_key(p) {
                learned.insert(*p, Default::default());
                kept += 1;
            }
        }
        Some((status.routes_version, learned))
    }

    /// Give the running links the new prefix → peer tables from the intent (sessions and
    /// endpoints are kept).
    fn update_link_routes(&self) {
        match all_live(&self.cfg, &self.opts.host, &self.learned) {
            Ok(i) => {
                for spec in &i.links {
                    if let Some(rt) = self.links.get(&spec.dev) {
                        rt.replace(rt.current().rebuild(spec));
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot rebuild the link tables"),
        }
    }

    fn reset_rate_limiters(&self) {
        for rt in self.links.values() {
            rt.current().reset_rate_limiter();
        }
    }

    /// Re-read the config; on any error keep running on the last good one.
    async fn reload(&mut self, path: Option<PathBuf>) -> Result<String, String> {
        let path = path.unwrap_or_else(|| self.opts.config.clone());
        let cfg = load(&path)?;
        let i = all_live(&cfg, &self.opts.host, &self.learned)?;
        let (role, specs) = (i.role, i.links);
        if role != self.role {
            return Err(format!(
                "{} changes role from {} to {role}: restart the daemon for that",
                self.opts.host, self.role
            ));
        }
        if let Some(key) = &self.key {
            check_key(&cfg, &self.opts.host, key)?;
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
        self.cfg = cfg;
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
                    self.start_link(spec)?;
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

    fn status(&self) -> serde_json::Value {
        let tracker = &self.tracker;
        let alive = |peer: &str, link: u32| tracker.is_alive(&(peer.to_string(), link));
        let peers: Vec<_> = self
            .links
            .values()
            .flat_map(|rt| rt.current().status(&alive))
            .collect();
        serde_json::json!({
            "host": self.opts.host,
            "role": self.role,
            "config": self.opts.config.display().to_string(),
            "uptime_s": self.started.elapsed().as_secs(),
            "keepalive_ms": self.cfg.site.keepalive_ms,
            "dead_after": self.cfg.site.dead_after,
            "links": peers,
            "bgp": self.bgp.as_ref().map(|b| {
                let b = b.status.lock().expect("not poisoned");
                serde_json::json!({
                    "sessions": b.sessions,
                    "refused_connections": b.refused_connections,
                    "routes": b.routes.iter().map(|(p, h)| serde_json::json!({"prefix": p.to_string(), "paths": h})).collect::<Vec<_>>(),
                })
            }),
        })
    }

    async fn control(&mut self, mut stream: tokio::net::UnixStream) {
        let reply = match control::read_request(&mut stream).await {
            Err(e) => {
                tracing::debug!(error = %e, "control connection");
                return;
            }
            Ok((Err(e), _)) => serde_json::json!({ "ok": false, "error": e }),
            Ok((Ok(Request::Status), _)) => {
                let mut s = self.status();
                s["ok"] = true.into();
                s
            }
            Ok((Ok(Request::Reload { .. }), false)) => {
                serde_json::json!({ "ok": false, "error": "reload needs root" })
            }
            Ok((Ok(Request::Reload { config }), true)) => {
                match self.reload(config.map(PathBuf::from)).await {
                    Ok(msg) => serde_json::json!({ "ok": true, "message": msg }),
                    Err(e) => {
                        tracing::error!("reload refused, keeping the running config:\n{e}");
                        serde_json::json!({ "ok": false, "error": e })
                    }
                }
            }
        };
        let _ = control::reply(&mut stream, &reply).await;
    }
}

/// Run until SIGTERM or SIGINT. Errors before the loop starts are returned (exit 1).
pub async fn run(opts: Options) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let cfg = load(&opts.config)?;
    // Nothing is learned yet: a gateway starts routing only the node addresses.
    let first = all_live(&cfg, &opts.host, &Learned::new())?;
    let (role, specs, bgp) = (first.role, first.links, first.bgp);
    let key = if specs.is_empty() {
        None
    } else {
        let key = load_private_key(&opts.key_file).map_err(|e| e.to_string())?;
        check_key(&cfg, &opts.host, &key)?;
        Some(key)
    };
    let listener = control::bind().map_err(|e| format!("control socket: {e}"))?;
    let nl = Netlink::connect().map_err(|e| format!("netlink: {e}"))?;
    let mut d = Daemon {
        bgp: None,
        learned: Learned::new(),
        learned_version: 0,
        opts,
        cfg,
        role,
        key,
        nl,
        links: BTreeMap::new(),
        tracker: Tracker::default(),
        started: Instant::now(),
    };
    let plan = d.sync().await?;
    tracing::info!(host = %d.opts.host, %role, changes = plan.changes.len(), "host reconciled");
    for spec in &specs {
        d.start_link(spec)?;
    }
    if let Some(sc) = bgp {
        let peers = sc.peers.len();
        d.bgp = Some(
            crate::bgp::speaker::start(sc)
                .await
                .map_err(|e| format!("BGP: {e}"))?,
        );
        tracing::info!(peers, "BGP speaker started");
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
            _ = limiter.tick() => d.reset_rate_limiters(),
            _ = drift.tick() => match d.sync().await {
                Ok(p) if !p.is_empty() => tracing::warn!(changes = p.changes.len(), "repaired drift:\n{}", p.render_text()),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "drift repair failed"),
            },
            _ = hup.recv() => {
                if let Err(e) = d.reload(None).await {
                    tracing::error!("reload on SIGHUP refused, keeping the running config:\n{e}");
                }
            }
            Ok((stream, _)) = listener.accept() => d.control(stream).await,
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
