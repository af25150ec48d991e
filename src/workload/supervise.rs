//! The workload under the image's PID 1: cgroups, pull, NFS mounts, start, restart with
//! backoff, output to the console (rate-limited) and the status file, and the ordered stop at
//! power off. Runs on a thread of its own so PID 1's loop (reaping, the daemon, the power
//! button) never waits on a registry, an NFS server or the workload's output.
//!
//! The status file (`/run/appliance/workload.json`, written atomically on every change) is the
//! one place the workload's state is kept for others: `appliance status` and the metrics read
//! it.

use super::pull::{self, Progress, Store};
use super::run::Spec;
use crate::image::say;
use crate::model::workload::{Workload, DAEMON_CPU_WEIGHT};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const STATUS_FILE: &str = "/run/appliance/workload.json";
/// The daemon's hand-over of a drain the gateways ask for: "on GATEWAYS" or "off".
pub const DRAIN_REQUEST: &str = "/run/appliance/drain-request";
const STORE: &str = "/state/workload";
const CGROUP: &str = "/sys/fs/cgroup";
const NFS_DIR: &str = "/run/appliance/nfs";
const SPEC: &str = "/run/appliance/workload-spec.json";
const DISK_AT: &str = "/run/appliance/workload-disk";
/// How long the power off waits for the NFS mounts to go.
const UNMOUNT_WAIT: Duration = Duration::from_secs(8);
/// How long a registry that does not answer is retried before the last good image runs.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(120);
/// Lines of the workload's output kept for status.
const TAIL: usize = 20;
/// Console lines per second the workload may print (bursts up to [`BURST`]); the rest are
/// counted and said once.
const LINES_PER_S: f64 = 20.0;
const BURST: f64 = 200.0;

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct MountStatus {
    pub path: String,
    pub device: String,
    pub options: String,
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Status {
    /// waiting, pulling, verifying, mounting, running, exited, restarting, refused, stopping,
    /// stopped
    pub state: String,
    pub image: String,
    /// The digest running (or last run).
    pub digest: Option<String>,
    pub pulled_bytes: u64,
    pub restarts: u32,
    pub last_exit: Option<i32>,
    pub last_error: Option<String>,
    pub mounts: Vec<MountStatus>,
    pub output_tail: Vec<String>,
    pub suppressed_lines: u64,
}

struct Shared {
    status: Mutex<Status>,
    tail: Mutex<VecDeque<String>>,
    /// The helper's pid while it runs.
    running: Mutex<Option<i32>>,
    /// Exit codes PID 1's reaper took for our children.
    exits: Mutex<HashMap<i32, i32>>,
    stopping: AtomicBool,
    workload: Workload,
    mounts: Mutex<Vec<PathBuf>>,
    /// Other children of ours PID 1 reaps for us (the drain command).
    others: Mutex<std::collections::HashSet<i32>>,
    /// The last drain request acted on (true: on).
    drain: Mutex<Option<bool>>,
    group: Mutex<Option<PathBuf>>,
}

static SHARED: Mutex<Option<Arc<Shared>>> = Mutex::new(None);

fn shared() -> Option<Arc<Shared>> {
    SHARED.lock().ok()?.clone()
}

impl Shared {
    fn set(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        s.output_tail = self
            .tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        if let Ok(j) = serde_json::to_vec_pretty(&*s) {
            let _ = crate::image::write_atomic(STATUS_FILE, &j, 0o644);
        }
    }
}

/// The workload's status as its thread last wrote it (for `appliance status` and the
/// metrics); None on a host without a workload. Bounded: a file over 256 KiB is not read.
pub fn read_status() -> Option<Status> {
    use std::io::Read as _;
    let mut b = Vec::new();
    std::fs::File::open(STATUS_FILE)
        .ok()?
        .take(256 << 10)
        .read_to_end(&mut b)
        .ok()?;
    serde_json::from_slice(&b).ok()
}

/// PID 1's reaper hands over the exit of a child it does not own; true when it was ours.
pub fn reaped(pid: i32, code: i32) -> bool {
    let Some(s) = shared() else { return false };
    let ours = *s.running.lock().unwrap_or_else(|e| e.into_inner()) == Some(pid)
        || s.others
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    if ours {
        s.exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, code);
    }
    ours
}

/// cgroup v2: the daemon in a group with a high CPU weight, the workload in one with a low
/// weight, a memory limit and a pids limit. Returns the workload group's path.
pub fn cgroups(w: &Workload) -> Result<PathBuf, String> {
    let root = PathBuf::from(CGROUP);
    std::fs::create_dir_all(&root).map_err(|e| format!("{CGROUP}: {e}"))?;
    let mounted = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if !mounted
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(CGROUP))
    {
        crate::image::sys::mount(
            "cgroup2",
            CGROUP,
            "cgroup2",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "nsdelegate",
        )?;
    }
    let write =
        |p: PathBuf, v: &str| std::fs::write(&p, v).map_err(|e| format!("{}: {e}", p.display()));
    write(root.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
    let daemon = root.join("daemon");
    let wl = root.join("workload");
    for d in [&daemon, &wl] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    write(daemon.join("cpu.weight"), &DAEMON_CPU_WEIGHT.to_string())?;
    // The daemon's memory is protected from reclaim by the workload's pressure.
    write(daemon.join("memory.min"), &(64u64 << 20).to_string())?;
    write(wl.join("cpu.weight"), &w.cpu_weight.to_string())?;
    let mib = w
        .memory_max_mib
        .unwrap_or_else(|| default_memory_mib(mem_total_mib()));
    write(wl.join("memory.max"), &(mib << 20).to_string())?;
    write(wl.join("memory.oom.group"), "1")?;
    write(wl.join("pids.max"), &w.pids_max.to_string())?;
    Ok(wl)
}

fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|k| k.parse::<u64>().ok())
                })
        })
        .map(|kib| kib / 1024)
        .unwrap_or(1024)
}

/// The workload's memory when the site file sets none: all but what the daemon and the
/// kernel keep (a quarter, at least 256 MiB).
pub fn default_memory_mib(total: u64) -> u64 {
    let keep = (total / 4).max(256);
    total.saturating_sub(keep).max(64)
}

/// Put the daemon (by pid) in its group.
pub fn place_daemon(pid: i32) {
    let p = format!("{CGROUP}/daemon/cgroup.procs");
    if std::path::Path::new(&p).exists() {
        if let Err(e) = std::fs::write(&p, pid.to_string()) {
            say(&format!("cannot move appliance run into its cgroup: {e}"));
        }
    }
}

fn reachable(addr: IpAddr, port: u16) -> Result<(), String> {
    TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(3))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The node's own site address (the source its packets leave with): the clientaddr of NFSv4.
fn node_address(config: &crate::model::config::Config, host: &str) -> Option<IpAddr> {
    config
        .nodes
        .iter()
        .find(|n| n.name == host)
        .map(|n| n.address)
}

/// Start the workload thread. `links` is the site's link count (the default nconnect).
pub fn start(w: Workload, config: &crate::model::config::Config, host: &str) {
    let links = config.site.links;
    let client = node_address(config, host);
    let hostname = w.hostname.clone().unwrap_or_else(|| host.to_string());
    let s = Arc::new(Shared {
        status: Mutex::new(Status {
            state: "waiting".into(),
            image: w.image.to_string(),
            ..Default::default()
        }),
        tail: Mutex::new(VecDeque::new()),
        running: Mutex::new(None),
        exits: Mutex::new(HashMap::new()),
        stopping: AtomicBool::new(false),
        workload: w,
        mounts: Mutex::new(Vec::new()),
        others: Mutex::new(std::collections::HashSet::new()),
        drain: Mutex::new(None),
        group: Mutex::new(None),
    });
    *SHARED.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.clone());
    let spawned = std::thread::Builder::new()
        .name("workload".into())
        .spawn(move || run_forever(s, links, client, hostname));
    if let Err(e) = spawned {
        say(&format!("workload: cannot start its thread: {e}"));
    }
}

fn run_forever(s: Arc<Shared>, links: u32, client: Option<IpAddr>, hostname: String) {
    let w = s.workload.clone();
    let group = match cgroups(&w) {
        Ok(g) => {
            *s.group.lock().unwrap_or_else(|e| e.into_inner()) = Some(g.clone());
            Some(g)
        }
        Err(e) => {
            say(&format!(
                "workload: cgroups unavailable ({e}); it runs without limits"
            ));
            None
        }
    };
    let store = match Store::new(STORE) {
        Ok(st) => st,
        Err(e) => {
            say(&format!("workload: {STORE}: {e}; not started"));
            s.set(|st| {
                st.state = "refused".into();
                st.last_error = Some(e.to_string());
            });
            return;
        }
    };
    // 1. The image: the declared one, or (refused) the last good one.
    let pulled = pull_with_retries(&s, &store, &w);
    let Some(pulled) = pulled else { return };
    // 2. The site's NFS, once its server answers through the tunnels.
    let mut binds = Vec::new();
    let mut statuses: Vec<MountStatus> = w
        .mounts
        .iter()
        .map(|m| MountStatus {
            path: m.path.clone(),
            device: m.device(),
            options: m.options(links, client),
            state: "waiting".into(),
        })
        .collect();
    s.set(|st| {
        st.state = "mounting".into();
        st.mounts = statuses.clone();
    });
    for (i, m) in w.mounts.iter().enumerate() {
        let at = PathBuf::from(format!("{NFS_DIR}/{i}"));
        let _ = std::fs::create_dir_all(&at);
        let opts = m.options(links, client);
        let fstype = if m.vers == crate::model::workload::NfsVersion::V3 {
            "nfs"
        } else {
            "nfs4"
        };
        let mut said = false;
        let t0 = Instant::now();
        loop {
            if s.stopping.load(Ordering::SeqCst) {
                return;
            }
            let r = reachable(m.server, 2049).and_then(|_| {
                let flags = if m.read_only { libc::MS_RDONLY } else { 0 }
                    | libc::MS_NOSUID
                    | libc::MS_NODEV;
                crate::image::sys::mount(&m.device(), &at.to_string_lossy(), fstype, flags, &opts)
            });
            match r {
                Ok(()) => {
                    say(&format!(
                        "workload: mounted {} at {} ({opts}) after {:.1} s",
                        m.device(),
                        m.path,
                        t0.elapsed().as_secs_f64()
                    ));
                    statuses[i].state = "mounted".into();
                    s.mounts
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(at.clone());
                    binds.push((at.clone(), m.path.clone(), m.read_only));
                    break;
                }
                Err(e) => {
                    if !said {
                        say(&format!(
                            "workload: {} not mounted yet: {e}; retrying",
                            m.device()
                        ));
                        said = true;
                    }
                    statuses[i].state = format!("waiting: {e}");
                    std::thread::sleep(Duration::from_secs(2));
                }
            }
        }
        let st = statuses.clone();
        s.set(|x| x.mounts = st);
    }
    // 3. Run, restart with backoff.
    let mut env: Vec<(String, String)> = pulled.config.env.clone();
    for (k, v) in &w.env {
        env.retain(|(x, _)| x != k);
        env.push((k.clone(), v.clone()));
    }
    let spec = Spec {
        rootfs: pulled.rootfs.clone(),
        scratch: PathBuf::from(STORE).join("run"),
        argv: w.argv(&pulled.config.entrypoint, &pulled.config.cmd),
        env,
        cwd: pulled.config.working_dir.clone(),
        user: pulled.config.user,
        hostname,
        binds,
    };
    if let Err(e) = serde_json::to_vec(&spec)
        .map_err(|e| e.to_string())
        .and_then(|b| crate::image::write_atomic(SPEC, &b, 0o600).map_err(|e| e.to_string()))
    {
        say(&format!("workload: cannot write {SPEC}: {e}"));
        return;
    }
    let mut backoff = Duration::from_secs(1);
    let mut first = true;
    while !s.stopping.load(Ordering::SeqCst) {
        let started = Instant::now();
        let code = match start_helper(&s, group.as_deref()) {
            Ok(pid) => {
                say(&format!(
                    "workload: started {} ({}) as pid {pid}: {}",
                    w.image,
                    pulled.manifest.short(),
                    spec.argv.join(" ")
                ));
                s.set(|st| {
                    st.state = "running".into();
                    st.digest = Some(pulled.manifest.to_string());
                });
                if first {
                    first = false;
                    if store.set_current(&pulled.manifest).is_ok() {
                        let n = store.collect(&[&pulled.manifest]);
                        if n > 0 {
                            say(&format!("workload: removed {n} older image(s) from state"));
                        }
                    }
                }
                wait_exit(&s, pid)
            }
            Err(e) => {
                say(&format!("workload: cannot start: {e}"));
                -1
            }
        };
        if s.stopping.load(Ordering::SeqCst) {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        say(&format!(
            "workload: exited with status {code} after {:.1} s; restarting in {} s",
            started.elapsed().as_secs_f64(),
            backoff.as_secs()
        ));
        s.set(|st| {
            st.state = "restarting".into();
            st.last_exit = Some(code);
            st.restarts += 1;
        });
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

fn pull_with_retries(s: &Shared, store: &Store, w: &Workload) -> Option<pull::Pulled> {
    let mut said: Option<String> = None;
    let mut wait = Duration::from_secs(2);
    let started = Instant::now();
    // The registry answers only once the tunnels carry the site prefix: wait for that first,
    // quietly (the pull's own errors are for what is wrong, not for what is early).
    if let crate::model::workload::Source::Registry { address, port, .. } = &w.image.source {
        while started.elapsed() < UNREACHABLE_GRACE && !s.stopping.load(Ordering::SeqCst) {
            if reachable(*address, *port).is_ok() {
                say(&format!(
                    "workload: the registry {address}:{port} answers through the tunnels ({:.1} s)",
                    started.elapsed().as_secs_f64()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    loop {
        if s.stopping.load(Ordering::SeqCst) {
            return None;
        }
        s.set(|st| st.state = "pulling".into());
        let r = pull::source_for(&w.image, std::path::Path::new(DISK_AT)).and_then(|src| {
            let mut last_said = Instant::now() - Duration::from_secs(60);
            store.pull(&w.image, src.as_ref(), &mut |p| {
                if let Progress::Layer {
                    index,
                    count,
                    done,
                    size,
                } = p
                {
                    s.set(|st| st.pulled_bytes = done);
                    if last_said.elapsed() >= Duration::from_secs(5) || done == size {
                        say(&format!(
                            "workload: layer {}/{count}: {done} of {size} bytes",
                            index + 1
                        ));
                        last_said = Instant::now();
                    }
                } else if let Progress::Unpacking { index, count } = p {
                    s.set(|st| st.state = "verifying".into());
                    say(&format!("workload: unpacking layer {}/{count}", index + 1));
                }
            })
        });
        match r {
            Ok(p) => {
                if p.fetched > 0 {
                    say(&format!(
                        "workload: pulled {} ({} bytes), digest verified",
                        w.image, p.fetched
                    ));
                }
                return Some(p);
            }
            Err(e) => {
                // An answer that will not change by waiting (wrong bytes, an unknown digest, a
                // layer climbing out of the root) is a refusal: the last good image runs at
                // once. A registry that does not answer gets [`UNREACHABLE_GRACE`] first (the
                // tunnels may still be coming up).
                let unreachable = e.contains(pull::UNREACHABLE);
                if said.as_deref() != Some(e.as_str()) {
                    say(&format!(
                        "workload: image {} {}: {e}",
                        w.image,
                        if unreachable {
                            "not pulled yet"
                        } else {
                            "refused"
                        }
                    ));
                    said = Some(e.clone());
                }
                s.set(|st| {
                    st.state = if unreachable {
                        "pulling".into()
                    } else {
                        "refused".into()
                    };
                    st.last_error = Some(e.clone());
                });
                if !unreachable || started.elapsed() > UNREACHABLE_GRACE {
                    if let Some(good) = store
                        .current()
                        .filter(|d| *d != w.image.digest)
                        .and_then(|d| store.ready(&d))
                    {
                        say(&format!(
                            "workload: running the last good image {} instead (the declared one is tried again at the next boot)",
                            good.manifest
                        ));
                        return Some(good);
                    }
                }
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
    }
}

fn start_helper(s: &Arc<Shared>, group: Option<&std::path::Path>) -> Result<i32, String> {
    let pid = spawn_in(s, group, &["workload-exec", SPEC])?;
    *s.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
    Ok(pid)
}

/// Start `appliance ARGS` in the workload's cgroup with its output read by [`output`].
fn spawn_in(
    s: &Arc<Shared>,
    group: Option<&std::path::Path>,
    args: &[&str],
) -> Result<i32, String> {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new(crate::image::BIN);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(g) = group {
        // The helper enters the workload's cgroup before it runs anything (so does every
        // process it starts).
        let procs = g.join("cgroup.procs");
        let path = std::ffi::CString::new(procs.to_string_lossy().as_bytes())
            .map_err(|e| e.to_string())?;
        // SAFETY: between fork and exec this only opens, writes and closes a file: no
        // allocation-dependent locks are taken (the path is prepared before).
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let r = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if r != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", crate::image::BIN))?;
    let pid = child.id() as i32;
    for stream in [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let s = s.clone();
        let _ = std::thread::Builder::new()
            .name("workload-out".into())
            .spawn(move || output(s, stream));
    }
    // PID 1's reaper collects it; the Child handle is only dropped.
    drop(child);
    Ok(pid)
}

/// The workload's output: every line into the tail, console lines at most [`LINES_PER_S`].
fn output(s: Arc<Shared>, r: Box<dyn std::io::Read + Send>) {
    use std::io::BufRead as _;
    let mut r = std::io::BufReader::new(r);
    let mut tokens = BURST;
    let mut last = Instant::now();
    let mut suppressed: u64 = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        // At most 4 KiB per line: a job printing no newline cannot grow this buffer.
        match std::io::Read::take(&mut r, 4096).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        tokens = (tokens + last.elapsed().as_secs_f64() * LINES_PER_S).min(BURST);
        last = Instant::now();
        if tokens >= 1.0 {
            tokens -= 1.0;
            if suppressed > 0 {
                say(&format!("workload: ({suppressed} lines not shown)"));
                suppressed = 0;
            }
            say(&format!("workload| {text}"));
        } else {
            suppressed += 1;
            s.status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .suppressed_lines += 1;
        }
        let mut t = s.tail.lock().unwrap_or_else(|e| e.into_inner());
        t.push_back(text);
        while t.len() > TAIL {
            t.pop_front();
        }
    }
    // Status carries the tail: refresh it at the end of the stream.
    s.set(|_| {});
}

fn wait_exit(s: &Shared, pid: i32) -> i32 {
    loop {
        if let Some(code) = s
            .exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid)
        {
            *s.running.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return code;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Power off: SIGTERM, the stop timeout, SIGKILL, then the NFS mounts (lazily only when their
/// server does not answer). Called by PID 1 before it stops the daemon; PID 1's reaper is not
/// running any more, so this waits for the helper itself.
pub fn stop_for_shutdown() {
    let Some(s) = shared() else { return };
    s.stopping.store(true, Ordering::SeqCst);
    let pid = *s.running.lock().unwrap_or_else(|e| e.into_inner());
    let timeout = Duration::from_secs(s.workload.stop_timeout_s as u64);
    if let Some(pid) = pid {
        say(&format!(
            "workload: SIGTERM, waiting up to {} s",
            timeout.as_secs()
        ));
        s.set(|st| st.state = "stopping".into());
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        let mut killed = false;
        loop {
            let mut status = 0;
            // SAFETY: reaping our own child with a valid status pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            let gone = r == pid
                || r < 0
                || s.exits
                    .lock()
                    .map(|e| e.contains_key(&pid))
                    .unwrap_or(false);
            if gone {
                say(&format!(
                    "workload: stopped{}",
                    if killed { " (killed)" } else { "" }
                ));
                break;
            }
            if !killed && Instant::now() > deadline {
                say("workload: did not stop within its stop timeout: SIGKILL");
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // The NFS mounts, each on a thread of its own: a server that does not answer must not
    // hold the power off (the kernel's session teardown of a hard mount can take minutes).
    let mounts = s.mounts.lock().map(|m| m.clone()).unwrap_or_default();
    let (tx, rx) = std::sync::mpsc::channel();
    for (at, m) in mounts.into_iter().zip(s.workload.mounts.iter().cloned()) {
        let tx = tx.clone();
        let _ = std::thread::Builder::new()
            .name("umount".into())
            .spawn(move || {
                let t = std::ffi::CString::new(at.to_string_lossy().as_bytes()).unwrap_or_default();
                let up = reachable(m.server, 2049).is_ok();
                let flags = if up {
                    0
                } else {
                    libc::MNT_FORCE | libc::MNT_DETACH
                };
                // SAFETY: a valid C string.
                let rc = unsafe { libc::umount2(t.as_ptr(), flags) };
                let msg = if rc == 0 && up {
                    format!("workload: {} unmounted", m.path)
                } else if rc == 0 {
                    format!("workload: {}: server unreachable: detached lazily", m.path)
                } else {
                    let e = std::io::Error::last_os_error();
                    // SAFETY: as above.
                    unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
                    format!("workload: {}: {e}; detached lazily", m.path)
                };
                let _ = tx.send(msg);
            });
    }
    drop(tx);
    let deadline = Instant::now() + UNMOUNT_WAIT;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(msg) => say(&msg),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                say(&format!(
                    "workload: NFS mounts still unmounting after {} s: left to the kernel",
                    UNMOUNT_WAIT.as_secs()
                ));
                break;
            }
        }
    }
    s.set(|st| st.state = "stopped".into());
}

/// Called by PID 1's loop: act on a changed drain request from the daemon (on a thread: the
/// drain command may run for hours).
pub fn poll_drain() {
    let Some(s) = shared() else { return };
    let Ok(text) = std::fs::read_to_string(DRAIN_REQUEST) else {
        return;
    };
    let on = text.starts_with("on");
    {
        let mut last = s.drain.lock().unwrap_or_else(|e| e.into_inner());
        if *last == Some(on) {
            return;
        }
        *last = Some(on);
    }
    let by = text.trim().strip_prefix("on ").unwrap_or("").to_string();
    let _ = std::thread::Builder::new()
        .name("drain".into())
        .spawn(move || drain(s, on, &by));
}

fn drain(s: Arc<Shared>, on: bool, by: &str) {
    if on {
        say(&format!("workload: drain asked by {by}"));
        if let Some(code) = drain_command(&s) {
            say(&format!("workload: idle ({code})"));
        }
    } else {
        say("workload: the gateways no longer ask for a drain");
    }
    match tell_daemon(on) {
        Ok(m) => say(&format!(
            "workload: network {}: {m}",
            if on { "drain" } else { "undrain" }
        )),
        Err(e) => say(&format!(
            "workload: cannot ask the daemon to {}: {e}",
            if on { "drain" } else { "undrain" }
        )),
    }
}

/// Run the drain command inside the workload and wait until it exits or the workload does.
/// None when there is nothing to wait for.
fn drain_command(s: &Arc<Shared>) -> Option<String> {
    let helper = (*s.running.lock().unwrap_or_else(|e| e.into_inner()))?;
    let Some(argv) = s.workload.drain_command.clone() else {
        return Some("no drain command: the network drain starts now".into());
    };
    let Some(ns_init) = super::run::ns_init_of(helper) else {
        return Some("the workload is not running".into());
    };
    let pid_s = ns_init.to_string();
    let mut args: Vec<&str> = vec!["workload-exec", SPEC, "--join", &pid_s, "--"];
    args.extend(argv.iter().map(String::as_str));
    let group = s.group.lock().unwrap_or_else(|e| e.into_inner()).clone();
    say(&format!(
        "workload: running the drain command: {}",
        argv.join(" ")
    ));
    let pid = match spawn_in(s, group.as_deref(), &args) {
        Ok(p) => p,
        Err(e) => return Some(format!("the drain command did not start: {e}")),
    };
    s.others
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(pid);
    loop {
        if let Some(code) = s
            .exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid)
        {
            return Some(format!("the drain command exited with status {code}"));
        }
        if s.running.lock().map(|r| *r != Some(helper)).unwrap_or(true) {
            return Some("the workload exited".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tell_daemon(on: bool) -> Result<String, String> {
    use crate::daemon::control::{request, Request};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let r = rt
        .block_on(request(&Request::Drain { on }))
        .map_err(|e| e.to_string())?;
    if r.ok {
        Ok(r.message.unwrap_or_default())
    } else {
        Err(r.error.unwrap_or_default())
    }
}
