//! `appliance init`: the image's PID 1, in two stages, both this same static binary.
//!
//! **Stage 1** (the initramfs `/init`): mount /dev, /proc, /sys; load the kernel modules listed
//! in `/lib/modules/load.list` (`modprobe --show-depends` order); open the root slot's
//! dm-verity mapping with the root hash from the kernel command line and read it through once
//! (a corrupted or tampered block stops the boot here, not at some later read); mount it
//! read-only (erofs) and the `state` partition read-write; switch_root; exec stage 2.
//!
//! **Stage 2** (PID 1 of the real root): bring up the network (DHCP), find the config
//! ([`crate::image::userdata`] decides; [`sources`] fetches), apply it (cache, key, host name, static
//! addresses), then supervise `appliance run`: restart it with backoff when it dies, reap every
//! zombie, never exit. With no config anywhere it waits and retries; it never crash-loops.
//!
//! Everything it says goes to the console (ttyS0) prefixed `appliance-init:`.

#[allow(unsafe_code)] // system calls without a safe wrapper; SAFETY comments inside
pub mod ab;
#[allow(unsafe_code)] // system calls without a safe wrapper; SAFETY comments inside
pub mod dhcp;
#[allow(unsafe_code)] // system calls without a safe wrapper; SAFETY comments inside
pub mod dm;
#[allow(unsafe_code)] // system calls without a safe wrapper; SAFETY comments inside
pub mod gpt;
#[allow(unsafe_code)] // system calls without a safe wrapper; SAFETY comments inside
pub mod health;
pub mod net;
#[allow(unsafe_code)] // system calls without a safe wrapper; SAFETY comments inside
pub mod power;
pub mod sources;
#[allow(unsafe_code)] // system calls without a safe wrapper; SAFETY comments inside
pub mod sys;
pub mod userdata;

use crate::model::key::PrivateKey;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use userdata::{Accepted, CacheRecord, Cmdline, Decision, Found, Source};

pub const BIN: &str = "/usr/bin/appliance";
pub const STATE: &str = "/state";
const APP_DIR: &str = "/state/appliance";
const CACHE: &str = "/state/appliance/config.json";
const KEY: &str = "/state/appliance/private.key";
const RUN_DIR: &str = "/run/appliance";
const RUN_CONFIG: &str = "/run/appliance/config.kdl";
const MODULE_LIST: &str = "/lib/modules/load.list";
/// How long the live sources are polled before the cached config stands in.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_secs(1);

/// Console lines, stamped with the seconds since boot like the kernel's own.
pub fn say(msg: &str) {
    use std::io::Write as _;
    let up = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    let mut e = std::io::stderr().lock();
    for line in msg.lines() {
        let _ = writeln!(e, "[{up:>8}] appliance-init: {line}");
    }
}

pub(crate) fn cmdline() -> Cmdline {
    Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
}

/// True when this process is the kernel's `/init` in an initramfs.
pub fn is_stage1() -> bool {
    std::process::id() == 1
        && std::env::args()
            .next()
            .is_some_and(|a| a.rsplit('/').next() == Some("init"))
}

// ---------------------------------------------------------------------------------- stage 1

/// Set in stage 1 when this boot tries a freshly installed slot.
static TRIAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn stage1() -> ! {
    let err = match stage1_inner() {
        Ok(never) => match never {},
        Err(e) => e,
    };
    say(&format!("boot stopped: {err}"));
    if TRIAL.load(std::sync::atomic::Ordering::SeqCst) {
        say("this was a trial boot: rebooting into the previous slot in 5 s");
        std::thread::sleep(Duration::from_secs(5));
        ab::reboot();
    }
    sys::halt_forever()
}

/// Partitions by GPT name on the first disk (in name order: vda before vdb) that has all of
/// `want`: name → (device node, "major:minor"). Another disk built from the same image (an
/// update attached as a second disk) never lends its partitions to this boot.
fn partitions(want: &[String]) -> Option<std::collections::HashMap<String, (String, String)>> {
    let mut disks: Vec<String> = std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    disks.sort();
    disks.into_iter().find_map(|d| {
        let parts = ab::disk_partitions(&d);
        want.iter().all(|w| parts.contains_key(w)).then(|| {
            parts
                .into_iter()
                .map(|(k, (dev, mm, _))| (k, (dev, mm)))
                .collect()
        })
    })
}

fn stage1_inner() -> Result<std::convert::Infallible, String> {
    sys::mount_fresh("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755")?;
    sys::console();
    sys::mount_fresh(
        "proc",
        "/proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    sys::mount_fresh(
        "sysfs",
        "/sys",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    let started = Instant::now();
    let c = cmdline();
    let slot = c.slot.clone().unwrap_or_else(|| "A".into());
    if slot != "A" && slot != "B" {
        return Err(format!("appliance.slot={slot:?}: expected A or B"));
    }
    let root_hash = c.verity.clone().ok_or(
        "no appliance.verity=ROOTHASH on the kernel command line: refusing an unverified root",
    )?;
    dm::check_root_hash(&root_hash)?;
    say(&format!("stage 1: slot {slot}, loading modules"));
    let list = std::fs::read_to_string(MODULE_LIST).map_err(|e| format!("{MODULE_LIST}: {e}"))?;
    let mut absent = Vec::new();
    for m in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match sys::load_module(m) {
            Ok(()) => {}
            // Hardware-specific modules (crc32c-intel without SSE4.2, efivarfs on BIOS)
            // refuse with ENODEV by design: list them once.
            Err(e) if e.ends_with("No such device (os error 19)") => absent.push(
                m.rsplit('/')
                    .next()
                    .unwrap_or(m)
                    .trim_end_matches(".ko")
                    .to_string(),
            ),
            Err(e) => say(&format!("module {e}")),
        }
    }
    if !absent.is_empty() {
        say(&format!(
            "modules not for this machine: {}",
            absent.join(", ")
        ));
    }
    let want = [
        format!("root{slot}"),
        format!("verity{slot}"),
        "state".to_string(),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let parts = loop {
        if let Some(p) = partitions(&want) {
            break p;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no disk with partitions {} appeared within 60 s",
                want.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // State first: it says whether this boot is a trial, which decides what a failure does.
    let (state_dev, _) = &parts["state"];
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    let _ = std::fs::create_dir_all(STATE);
    let state_ok = match sys::mount(state_dev, STATE, "ext4", flags, "") {
        Ok(()) => {
            grow_state(state_dev, STATE);
            true
        }
        Err(e) => {
            // Keys and the config cache are lost at reboot, but the machine still works.
            say(&format!(
                "state partition unusable ({e}); using memory instead"
            ));
            false
        }
    };
    if state_ok && ab::is_trial(&slot) {
        say(&format!(
            "slot {slot} is on trial: a failure reboots into the previous slot"
        ));
        TRIAL.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let (data_dev, data_mm) = &parts[&want[0]];
    let (hash_dev, hash_mm) = &parts[&want[1]];
    let sb = sys::read_head(hash_dev, 512).map_err(|e| format!("{hash_dev}: {e}"))?;
    let sb = dm::parse_superblock(&sb).map_err(|e| format!("{hash_dev}: {e}"))?;
    let (sectors, table) = dm::verity_table(&sb, data_mm, hash_mm, &root_hash);
    let root = dm::create_verity("root", sectors, &table)?;
    verify_all(&root).map_err(|e| {
        format!("root slot {slot} ({data_dev}) fails dm-verity: {e}: the image is corrupted or was modified")
    })?;
    say(&format!(
        "root slot {slot} verified ({} MiB, root hash {}…)",
        sectors / 2048,
        &root_hash[..16]
    ));
    std::fs::create_dir_all("/newroot").map_err(|e| format!("/newroot: {e}"))?;
    sys::mount(
        &root,
        "/newroot",
        "erofs",
        libc::MS_RDONLY | libc::MS_NODEV,
        "",
    )?;
    let state_at = format!("/newroot{STATE}");
    if state_ok {
        sys::mount(STATE, &state_at, "", libc::MS_MOVE, "")?;
    } else {
        sys::mount(
            "tmpfs",
            &state_at,
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=0755",
        )?;
    }
    say(&format!(
        "stage 1 done in {:.1} s; switching root",
        started.elapsed().as_secs_f64()
    ));
    sys::switch_root("/newroot", &[BIN, "init"])
}

/// The disk holding a partition: /sys/class/block/vda6 links to …/block/vda/vda6.
fn disk_of(part_dev: &str) -> Option<String> {
    let name = part_dev.rsplit('/').next()?;
    let link = std::fs::read_link(format!("/sys/class/block/{name}")).ok()?;
    let parent = link.parent()?.file_name()?.to_string_lossy().into_owned();
    Some(format!("/dev/{parent}"))
}

/// First boot on a larger disk: stretch `state` to the end and move the backup GPT there.
/// A failure is reported and the boot goes on with the state as it is.
fn grow_state(state_dev: &str, mounted_at: &str) {
    let Some(disk) = disk_of(state_dev) else {
        say(&format!(
            "cannot tell which disk holds {state_dev}; state not grown"
        ));
        return;
    };
    match gpt::grow_disk(&disk, "state", mounted_at) {
        Ok(Some((old, new))) => say(&format!(
            "state grown from {} MiB to {} MiB; backup GPT moved to the end of {disk}",
            old >> 20,
            new >> 20
        )),
        Ok(None) => {}
        Err(e) => say(&format!("state not grown: {e}")),
    }
}

/// Read the whole verity device once: dm-verity checks every block against the root hash.
pub(crate) fn verify_all(dev: &str) -> Result<(), String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(dev).map_err(|e| format!("{dev}: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading {dev}: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------------- stage 2

pub fn stage2() -> ! {
    if std::process::id() != 1 {
        eprintln!(
            "error: `appliance init` is the image's PID 1; it does not run under another init"
        );
        std::process::exit(64);
    }
    sys::console();
    for (fs, at, data) in [
        ("proc", "/proc", ""),
        ("sysfs", "/sys", ""),
        ("devtmpfs", "/dev", "mode=0755"),
    ] {
        if let Err(e) = sys::mount_fresh(fs, at, libc::MS_NOSUID, data) {
            say(&e);
        }
    }
    for at in ["/run", "/tmp"] {
        if let Err(e) = sys::mount_fresh("tmpfs", at, libc::MS_NOSUID | libc::MS_NODEV, "mode=0755")
        {
            say(&e);
        }
    }
    let _ = std::fs::create_dir_all(RUN_DIR);
    let c = cmdline();
    say(&format!(
        "stage 2: PID 1 on slot {}, appliance {}",
        c.slot.as_deref().unwrap_or("?"),
        env!("CARGO_PKG_VERSION")
    ));
    power::start();
    let net = Arc::new(net::NetState::default());
    net::start(net.clone());
    let slot = c.slot.clone().unwrap_or_else(|| "A".into());
    ab::on_boot(&slot);
    let accepted = discover(&c, &net, ab::is_trial(&slot));
    let workload = accepted
        .config
        .nodes
        .iter()
        .find(|n| n.name == accepted.host)
        .and_then(|n| n.workload.clone());
    if let Some(w) = workload {
        say(&format!(
            "workload: {} (stop timeout {} s)",
            w.image, w.stop_timeout_s
        ));
        crate::workload::supervise::start(w, &accepted.config, &accepted.host);
    }
    supervise(&accepted, &slot)
}

fn load_cache(who: &userdata::Who) -> Option<(CacheRecord, Accepted)> {
    let bytes = match std::fs::read(CACHE) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            say(&format!("cached config {CACHE} unreadable: {e}"));
            return None;
        }
    };
    let rec = match CacheRecord::from_json(&bytes) {
        Ok(r) => r,
        Err(e) => {
            say(&format!("cached config {CACHE} refused: {e}"));
            return None;
        }
    };
    match userdata::validate("user-data (cache)", &rec.user_data, who) {
        Ok(a) => Some((rec, a)),
        Err(r) => {
            say(&format!("cached config refused:\n{}", r.render()));
            None
        }
    }
}

/// Poll the sources until one gives a valid config (or the wait ends and the cache stands in),
/// then apply it. Never returns without a config.
fn discover(c: &Cmdline, net: &net::NetState, trial: bool) -> Accepted {
    let wait = c.wait.map(Duration::from_secs).unwrap_or(DEFAULT_WAIT);
    let metadata_base = c
        .metadata
        .clone()
        .unwrap_or_else(|| "http://169.254.169.254".into());
    let host = c.host.as_deref();
    let start = Instant::now();
    let mut reported: HashSet<String> = HashSet::new();
    let mut last_note = Instant::now();
    let leased = net.lease_addresses();
    let mut cache = load_cache(&userdata::Who {
        host,
        addresses: &leased,
        slot: None,
    });
    loop {
        // A pool user-data's slot follows the private network's lease.
        let leased = net.lease_addresses();
        let who = userdata::Who {
            host,
            addresses: &leased,
            slot: None,
        };
        let round = vec![
            (Source::Cmdline, sources::cmdline(c.config.as_deref(), &who)),
            (Source::Cidata, sources::cidata(&who)),
            (
                Source::Metadata,
                sources::metadata(
                    &metadata_base,
                    net.up.load(std::sync::atomic::Ordering::SeqCst),
                    &who,
                ),
            ),
        ];
        for (source, found) in &round {
            if let Found::Refused { sha256, reason } = found {
                // Say it once per distinct content, not every second.
                let key = format!(
                    "{source}:{}",
                    sha256.clone().unwrap_or_else(|| reason.clone())
                );
                if reported.insert(key) {
                    let kept = match &cache {
                        Some((_, a)) => {
                            format!("the last good config (hash {}) stays in force", a.sha256)
                        }
                        None => "no good config yet; still waiting".into(),
                    };
                    say(&format!("config from {source} rejected, {kept}:\n{reason}"));
                }
            }
        }
        let notes: Vec<String> = round
            .iter()
            .filter_map(|(source, f)| match f {
                Found::Unavailable(why) => Some(format!("{source}: {why}")),
                _ => None,
            })
            .collect();
        let wait_over = start.elapsed() >= wait;
        match userdata::decide(round, wait_over, cache.is_some()) {
            Decision::Apply(source, a) => {
                apply(source, &a, None, net);
                return *a;
            }
            Decision::UseCache => {
                let (rec, a) = cache.take().expect("decide only picks an existing cache");
                apply(Source::Cache, &a, Some(rec.source), net);
                return a;
            }
            Decision::Wait => {}
        }
        if let Some((action, why)) = power::requested() {
            power::shutdown(action, why, None);
        }
        if trial && start.elapsed() > ab::TRIAL_TIMEOUT {
            say("no usable config on this trial slot: rebooting into the previous slot");
            ab::reboot();
        }
        if wait_over && last_note.elapsed() >= Duration::from_secs(30) {
            say(&format!(
                "no config yet (kernel command line, cidata/config-2 drive, metadata service, cache): waiting{}",
                if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) }
            ));
            last_note = Instant::now();
            cache = cache.or_else(|| load_cache(&who));
        }
        std::thread::sleep(POLL);
    }
}

/// Write a file atomically (temp file, fsync, rename, fsync the directory).
pub(crate) fn write_atomic(path: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let p = std::path::Path::new(path);
    let dir = p.parent().unwrap_or(std::path::Path::new("/"));
    let tmp = dir.join(format!(
        ".{}.tmp",
        p.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, p)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Make the accepted config the running one: cache it, install the key, name the host,
/// configure static addresses, write the site file `appliance run` reads.
fn apply(source: Source, a: &Accepted, first_from: Option<Source>, net: &net::NetState) {
    use std::os::unix::fs::DirBuilderExt as _;
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(APP_DIR);
    if source != Source::Cache {
        let rec = CacheRecord::new(source, &a.original);
        if let Err(e) = write_atomic(CACHE, rec.to_json().as_bytes(), 0o600) {
            say(&format!(
                "cannot cache the config in {CACHE}: {e} (it will not survive a reboot)"
            ));
        }
    }
    install_key(a);
    if let Err(e) = sys::sethostname(&a.host) {
        say(&e);
    }
    net::apply_static(net, &a.interfaces);
    net::protect(net, net::protected(&a.config));
    if let Err(e) = write_atomic(RUN_CONFIG, a.site_text.as_bytes(), 0o644) {
        say(&format!("cannot write {RUN_CONFIG}: {e}"));
    }
    let from = first_from
        .map(|s| format!(", first accepted from {s}"))
        .unwrap_or_default();
    say(&format!(
        "config applied from {source}, hash {} (host {}, role {}{from})",
        a.sha256, a.host, a.role
    ));
}

/// The private key: from the user-data when it carries one, else the one on state, else a new
/// one generated now. Its public key is printed for enrolment.
fn install_key(a: &Accepted) {
    let key = match &a.private_key {
        Some(k) => {
            let current = std::fs::read_to_string(KEY).ok();
            if current.as_deref().map(str::trim) != Some(k.to_base64().as_str()) {
                if let Err(e) = write_atomic(KEY, format!("{}\n", k.to_base64()).as_bytes(), 0o600)
                {
                    say(&format!("cannot write {KEY}: {e}"));
                }
            }
            k.clone()
        }
        None => match crate::host::keyfile::load_private_key(std::path::Path::new(KEY)) {
            Ok(k) => k,
            Err(_) if !std::path::Path::new(KEY).exists() => {
                let k = PrivateKey::generate();
                if let Err(e) = write_atomic(KEY, format!("{}\n", k.to_base64()).as_bytes(), 0o600)
                {
                    say(&format!("cannot write {KEY}: {e}"));
                }
                say(&format!("first boot: generated a private key in {KEY}"));
                k
            }
            Err(e) => {
                say(&format!("{e}"));
                return;
            }
        },
    };
    say(&format!("public key: {}", key.public()));
    let listed = a
        .config
        .gateways
        .iter()
        .find(|g| g.name == a.host)
        .map(|g| g.public_key)
        .or_else(|| {
            a.config
                .nodes
                .iter()
                .find(|n| n.name == a.host)
                .map(|n| n.public_key)
        });
    if let Some(l) = listed {
        if l != key.public() {
            say(&format!(
                "the site file lists public key {l} for {}; this machine's is {}: enrol it (or supply the private key in the appliance block)",
                a.host,
                key.public()
            ));
        }
    }
}

/// How long `appliance run` must stay up (and the health check answer, if any) before this
/// boot counts as healthy.
const HEALTHY_AFTER: Duration = Duration::from_secs(15);

/// The health check's state: pings every 2 s until answered, then every 30 s; transitions are
/// said once.
struct Health {
    target: Option<std::net::Ipv4Addr>,
    answered: bool,
    next: Instant,
    seq: u16,
    last_note: Instant,
    since: Instant,
}

impl Health {
    fn poll(&mut self) {
        let Some(target) = self.target else {
            return;
        };
        if Instant::now() < self.next {
            return;
        }
        self.seq = self.seq.wrapping_add(1);
        match health::ping(target, self.seq, Duration::from_secs(1)) {
            Ok(rtt) => {
                if !self.answered {
                    say(&format!(
                        "health check: {target} answered in {:.1} ms ({:.0} s after the daemon started)",
                        rtt.as_secs_f64() * 1000.0,
                        self.since.elapsed().as_secs_f64()
                    ));
                }
                self.answered = true;
                self.next = Instant::now() + Duration::from_secs(30);
            }
            Err(e) => {
                if self.answered {
                    say(&format!("health check: {target} stopped answering: {e}"));
                } else if self.last_note.elapsed() >= Duration::from_secs(30) {
                    say(&format!("health check: {target} does not answer yet: {e}"));
                    self.last_note = Instant::now();
                }
                self.answered = false;
                self.next = Instant::now() + Duration::from_secs(2);
            }
        }
    }
}

/// Run `appliance run` forever: restart it with backoff (1 s doubling to 60 s, back to 1 s
/// after a minute of uptime), reap every child the kernel hands PID 1, run the health check,
/// and say once when this boot is healthy.
fn supervise(a: &Accepted, slot: &str) -> ! {
    let host = a.host.as_str();
    let trial = ab::is_trial(slot);
    let booted = Instant::now();
    let mut child: Option<(i32, Instant)> = None;
    let mut backoff = Duration::from_secs(1);
    let mut restart_at = Instant::now();
    let mut healthy = false;
    let mut installing: Option<std::sync::mpsc::Receiver<(String, ab::Installed)>> = None;
    let mut health = Health {
        target: a.health_check,
        answered: false,
        next: Instant::now(),
        seq: 0,
        last_note: Instant::now(),
        since: Instant::now(),
    };
    loop {
        if child.is_none() && Instant::now() >= restart_at {
            match std::process::Command::new(BIN)
                .args(["run", "-c", RUN_CONFIG, "--node", host, "--key-file", KEY])
                // The serial console is a terminal, but its log is read as plain text.
                .env("NO_COLOR", "1")
                .spawn()
            {
                Ok(c) => {
                    say(&format!("started appliance run (pid {}) as {host}", c.id()));
                    crate::workload::supervise::place_daemon(c.id() as i32);
                    child = Some((c.id() as i32, Instant::now()));
                }
                Err(e) => {
                    say(&format!(
                        "cannot start {BIN} run: {e}; retrying in {} s",
                        backoff.as_secs()
                    ));
                    restart_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
        loop {
            use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
            let (pid, how) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    crate::workload::supervise::reaped(pid.as_raw(), code);
                    (pid.as_raw(), format!("exited with status {code}"))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    crate::workload::supervise::reaped(pid.as_raw(), 128 + sig as i32);
                    (pid.as_raw(), format!("was killed by signal {}", sig as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            };
            if let Some((cpid, since)) = child {
                if pid == cpid {
                    let ran = since.elapsed();
                    if ran > Duration::from_secs(60) {
                        backoff = Duration::from_secs(1);
                    }
                    say(&format!(
                        "appliance run (pid {pid}) {how} after {:.1} s; restarting in {} s",
                        ran.as_secs_f64(),
                        backoff.as_secs()
                    ));
                    child = None;
                    restart_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
        if child.is_some() {
            health.poll();
            crate::workload::supervise::poll_drain();
        }
        let up_long_enough = child.is_some_and(|(_, since)| since.elapsed() >= HEALTHY_AFTER);
        if !healthy && up_long_enough && (health.target.is_none() || health.answered) {
            healthy = true;
            say("healthy: the daemon is up and the health check (if any) answers");
            ab::on_healthy(slot);
            if let Some(image) = a.install_image.clone() {
                // On a thread of its own: a download that takes minutes must not stop this
                // loop reaping, restarting the daemon or hearing the power button.
                let pin = a.install_root_hash.clone();
                let (tx, rx) = std::sync::mpsc::channel();
                let spawned = std::thread::Builder::new()
                    .name("install".into())
                    .spawn(move || {
                        let r = ab::install(&image, pin.as_deref());
                        let _ = tx.send((image, r));
                    });
                match spawned {
                    Ok(_) => installing = Some(rx),
                    Err(e) => say(&format!("cannot start the install: {e}")),
                }
            }
        }
        if let Some(rx) = &installing {
            match rx.try_recv() {
                Ok((_, Ok(Some((target, hash))))) => {
                    say(&format!(
                        "slot {target} installed and verified (root hash {hash}); rebooting to try it once"
                    ));
                    power::shutdown(
                        power::Action::Reboot,
                        &format!("trying slot {target}"),
                        child.map(|c| c.0),
                    );
                }
                Ok((_, Ok(None))) => installing = None,
                Ok((image, Err(e))) => {
                    say(&format!("install-image {image}: {e}"));
                    installing = None;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    say("install-image: the install thread died");
                    installing = None;
                }
            }
        }
        if trial && !healthy && booted.elapsed() > ab::TRIAL_TIMEOUT {
            power::shutdown(
                power::Action::Reboot,
                &format!(
                    "slot {slot} is not healthy after {} s of its trial; back to the previous slot",
                    ab::TRIAL_TIMEOUT.as_secs()
                ),
                child.map(|c| c.0),
            );
        }
        if let Some((action, why)) = power::requested() {
            power::shutdown(action, why, child.map(|c| c.0));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
