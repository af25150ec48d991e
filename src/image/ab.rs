//! A/B updates: `appliance image install IMAGE` writes a new image's root into the inactive
//! slot, checks it against the image's root hash through dm-verity, installs the slot's boot
//! files, and arranges for the next boot, and only the next one, to try it: a one-shot entry
//! (systemd-boot's `LoaderEntryOneShot` EFI variable on UEFI, syslinux's ADV "boot once" record
//! on BIOS). The slot becomes the default only when init finds it healthy; a trial that panics,
//! stops in stage 1 or stays unhealthy reboots, and the one-shot being spent, the firmware
//! boots the old default again.
//!
//! The record of what is good and what is on trial lives on the state partition
//! (`/state/appliance/ab.json`). Pure helpers (syslinux config and ADV, loader.conf, the
//! record) are tested here; the I/O is thin.

use super::{dm, say, sys};
use serde::{Deserialize, Serialize};
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::time::Duration;

pub const RECORD: &str = "/state/appliance/ab.json";
const ESP_MOUNT: &str = "/run/appliance/esp";
const NEW_ESP_MOUNT: &str = "/run/appliance/new-esp";
/// How long a trial slot has to become healthy before init reboots into the old one.
pub const TRIAL_TIMEOUT: Duration = Duration::from_secs(180);
const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// What is good and what is on trial.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The slot that boots by default.
    pub good: String,
    /// A slot installed and booted once, not yet found healthy.
    pub trial: Option<String>,
    pub trial_hash: Option<String>,
    /// Root hashes that were tried and failed: not installed again.
    #[serde(default)]
    pub failed: Vec<String>,
    /// The trial's one-shot boot was armed. A trial found not armed at boot was an install
    /// interrupted between recording it and arming it: it never booted, so it did not fail.
    /// (Records from before this field armed first and recorded after: armed.)
    #[serde(default = "armed_by_default")]
    pub armed: bool,
}

fn armed_by_default() -> bool {
    true
}

impl Record {
    /// The record after booting `slot`, and what to say about it.
    pub fn after_boot(&self, slot: &str) -> (Record, Option<String>) {
        let mut r = self.clone();
        match r.trial.clone() {
            Some(trial) if trial != slot => {
                let hash = r.trial_hash.take();
                r.trial = None;
                if r.armed {
                    r.failed.extend(hash);
                    (r, Some(format!("slot {trial} did not come up healthy: back on slot {slot}; it will not be tried again")))
                } else {
                    (r, Some(format!("the install into slot {trial} was interrupted before its one-shot boot was armed: it will be installed again")))
                }
            }
            _ => (r, None),
        }
    }
}

pub fn other(slot: &str) -> &'static str {
    if slot == "A" {
        "B"
    } else {
        "A"
    }
}

pub fn load_record() -> Option<Record> {
    serde_json::from_slice(&std::fs::read(RECORD).ok()?).ok()
}

pub fn save_record(r: &Record) -> Result<(), String> {
    super::write_atomic(
        RECORD,
        serde_json::to_string_pretty(r)
            .expect("serialises")
            .as_bytes(),
        0o600,
    )
    .map_err(|e| format!("{RECORD}: {e}"))
}

// ------------------------------------------------------------------------ syslinux, loader

/// The `LABEL name` stanza of a syslinux config (up to the next LABEL), if any.
pub fn stanza(cfg: &str, label: &str) -> Option<String> {
    let mut out = String::new();
    let mut inside = false;
    for line in cfg.lines() {
        let word = line.split_whitespace().next().unwrap_or("");
        if word.eq_ignore_ascii_case("LABEL") {
            inside = line.split_whitespace().nth(1) == Some(label);
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    (!out.is_empty()).then_some(out)
}

/// `cfg` with the stanza for `label` replaced by (or extended with) `new`.
pub fn set_stanza(cfg: &str, label: &str, new: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    let mut placed = false;
    for line in cfg.lines() {
        let word = line.split_whitespace().next().unwrap_or("");
        if word.eq_ignore_ascii_case("LABEL") {
            inside = line.split_whitespace().nth(1) == Some(label);
            if inside && !placed {
                out.push_str(new);
                placed = true;
            }
        }
        if !inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !placed {
        out.push_str(new);
    }
    out
}

/// `cfg` with `DEFAULT label`.
pub fn set_default(cfg: &str, label: &str) -> String {
    cfg.lines()
        .map(|l| {
            if l.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("DEFAULT"))
            {
                format!("DEFAULT {label}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// systemd-boot's loader.conf with `default ENTRY`.
pub fn loader_default(conf: &str, entry: &str) -> String {
    let mut lines: Vec<String> = conf
        .lines()
        .filter(|l| !l.trim_start().starts_with("default"))
        .map(str::to_string)
        .collect();
    lines.push(format!("default {entry}"));
    lines.join("\n") + "\n"
}

/// The root hash a boot stanza or command line names (`appliance.verity=`).
pub fn verity_of(text: &str) -> Option<String> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("appliance.verity="))
        .map(str::to_string)
}

// ------------------------------------------------------------------------ boot manifest

/// Inside every image's root, so under its root hash: the hashes of the boot files and the
/// kernel command lines. An install takes from the download only what this file vouches for,
/// and builds the syslinux stanza itself: the pinned root hash authenticates everything that
/// boots (the kernel, the initrd, the UKI and the command line with its `appliance.config=`).
pub const MANIFEST: &str = "boot/manifest";
/// Stands for the root hash in the manifest: a UKI's command line names the root hash, which
/// is computed after the root (and so the manifest) is made. The manifest hashes each UKI with
/// the placeholder in place of the hash; an install puts it back to compare.
pub const HASH_PLACEHOLDER: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";
const MANIFEST_MAX: usize = 16 * 1024;

/// A parsed [`MANIFEST`]: `vmlinuz`, `initrd`, `uki-A`, `uki-B` (sha256) and `cmdline-A`,
/// `cmdline-B`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    sha256: std::collections::BTreeMap<String, String>,
    cmdline: std::collections::BTreeMap<String, String>,
}

fn verity_arg(hash: &str) -> String {
    format!("appliance.verity={hash}")
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    super::userdata::hex(&sha2::Sha256::digest(b))
}

/// `hay` with every `from` replaced by `to` (of the same length).
fn replace_all(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    debug_assert_eq!(from.len(), to.len());
    let mut out = hay.to_vec();
    for at in memchr::memmem::find_iter(hay, from) {
        out[at..at + to.len()].copy_from_slice(to);
    }
    out
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Manifest, String> {
        if text.len() > MANIFEST_MAX {
            return Err(format!("{MANIFEST}: more than {MANIFEST_MAX} bytes"));
        }
        let mut m = Manifest {
            sha256: Default::default(),
            cmdline: Default::default(),
        };
        for (n, line) in text.lines().enumerate() {
            let at = || format!("{MANIFEST}:{}", n + 1);
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("{}: not KEY VALUE", at()))?;
            match key {
                "vmlinuz" | "initrd" | "uki-A" | "uki-B" => {
                    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!("{}: {key}: not a sha256", at()));
                    }
                    m.sha256.insert(key.into(), value.to_ascii_lowercase());
                }
                "cmdline-A" | "cmdline-B" => {
                    let slot = &key[8..];
                    let words: Vec<&str> = value.split_whitespace().collect();
                    let has = |w: &str| words.iter().filter(|x| **x == w).count() == 1;
                    if !has(&verity_arg(HASH_PLACEHOLDER))
                        || !has(&format!("appliance.slot={slot}"))
                        || words
                            .iter()
                            .filter(|w| w.starts_with("appliance.verity="))
                            .count()
                            != 1
                    {
                        return Err(format!(
                            "{}: {key} must name appliance.slot={slot} and the root hash placeholder once",
                            at()
                        ));
                    }
                    m.cmdline.insert(slot.into(), value.into());
                }
                _ => return Err(format!("{}: unknown key {key:?}", at())),
            }
        }
        for k in ["vmlinuz", "initrd", "uki-A", "uki-B"] {
            if !m.sha256.contains_key(k) {
                return Err(format!("{MANIFEST}: no {k}"));
            }
        }
        for s in ["A", "B"] {
            if !m.cmdline.contains_key(s) {
                return Err(format!("{MANIFEST}: no cmdline-{s}"));
            }
        }
        Ok(m)
    }

    /// Slot `slot`'s kernel command line with root hash `hash`.
    pub fn cmdline(&self, slot: &str, hash: &str) -> String {
        self.cmdline[slot].replace(&verity_arg(HASH_PLACEHOLDER), &verity_arg(hash))
    }

    /// The syslinux stanza for `slot`, built here rather than taken from the download.
    pub fn stanza(&self, slot: &str, hash: &str) -> String {
        format!(
            "LABEL {slot}\n  LINUX /{slot}/vmlinuz\n  INITRD /{slot}/initrd\n  APPEND {}\n",
            self.cmdline(slot, hash)
        )
    }

    /// `bytes` (the file the download calls `name`: vmlinuz or initrd) is the one vouched for.
    pub fn check(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        let got = sha256_hex(bytes);
        if got != self.sha256[name] {
            return Err(format!(
                "its {name} (sha256 {got}) is not the one its root vouches for ({}): not installed",
                self.sha256[name]
            ));
        }
        Ok(())
    }

    /// Slot `slot`'s UKI as it is to be written: the download's, once it matches the
    /// manifest with the placeholder for the root hash, with `hash` put back everywhere the
    /// vouched-for file has the placeholder.
    pub fn uki(&self, slot: &str, hash: &str, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let (real, placeholder) = (verity_arg(hash), verity_arg(HASH_PLACEHOLDER));
        let vouched = replace_all(bytes, real.as_bytes(), placeholder.as_bytes());
        let key = format!("uki-{slot}");
        let got = sha256_hex(&vouched);
        if got != self.sha256[&key] {
            return Err(format!(
                "its slot-{slot} UKI is not the one its root vouches for (sha256 {got} with the root hash placeheld, not {}): not installed",
                self.sha256[&key]
            ));
        }
        Ok(replace_all(
            &vouched,
            placeholder.as_bytes(),
            real.as_bytes(),
        ))
    }
}

const ADV_MAGIC1: u32 = 0x5a2d_2fa5;
const ADV_MAGIC2: u32 = 0xa304_1767;
const ADV_MAGIC3: u32 = 0xdd28_bf64;
const ADV_BOOTONCE: u8 = 1;

/// syslinux's auxiliary data vector (the last 1024 bytes of ldlinux.sys: two identical
/// 512-byte copies) holding one "boot once" command.
pub fn adv_boot_once(command: &str) -> [u8; 1024] {
    adv(Some(command))
}

/// An ADV with no record: no boot-once command.
pub fn adv_empty() -> [u8; 1024] {
    adv(None)
}

fn adv(boot_once: Option<&str>) -> [u8; 1024] {
    let mut a = [0u8; 512];
    a[0..4].copy_from_slice(&ADV_MAGIC1.to_le_bytes());
    if let Some(command) = boot_once {
        a[8] = ADV_BOOTONCE;
        a[9] = command.len() as u8;
        a[10..10 + command.len()].copy_from_slice(command.as_bytes());
    }
    a[508..512].copy_from_slice(&ADV_MAGIC3.to_le_bytes());
    let sum = a[8..508].chunks(4).fold(0u32, |s, w| {
        s.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
    });
    a[4..8].copy_from_slice(&ADV_MAGIC2.wrapping_sub(sum).to_le_bytes());
    let mut both = [0u8; 1024];
    both[..512].copy_from_slice(&a);
    both[512..].copy_from_slice(&a);
    both
}

// ------------------------------------------------------------------------ block devices

/// Partitions of one disk by GPT name: name → (device node, "major:minor", size in bytes).
pub fn disk_partitions(disk: &str) -> std::collections::HashMap<String, (String, String, u64)> {
    let name = disk.rsplit('/').next().unwrap_or(disk);
    let mut out = std::collections::HashMap::new();
    let dir = format!("/sys/class/block/{name}");
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Ok(u) = std::fs::read_to_string(e.path().join("uevent")) else {
            continue;
        };
        let field = |k: &str| {
            u.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                .map(str::to_string)
        };
        let size: u64 = std::fs::read_to_string(e.path().join("size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if let (Some(p), Some(dev), Some(maj), Some(min)) = (
            field("PARTNAME"),
            field("DEVNAME"),
            field("MAJOR"),
            field("MINOR"),
        ) {
            out.insert(
                p,
                (format!("/dev/{dev}"), format!("{maj}:{min}"), size * 512),
            );
        }
    }
    out
}

/// The disk whose partition is mounted at `/state`: the boot disk.
pub fn boot_disk() -> Result<String, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let mm = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(super::STATE))
        .and_then(|l| l.split(' ').nth(2))
        .ok_or("the state partition is not mounted")?;
    let link = std::fs::read_link(format!("/sys/dev/block/{mm}")).map_err(|e| e.to_string())?;
    let disk = link
        .parent()
        .and_then(|p| p.file_name())
        .ok_or("cannot find the disk of the state partition")?;
    Ok(format!("/dev/{}", disk.to_string_lossy()))
}

// linux/loop.h
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_PARTSCAN: u32 = 8;

/// Attach an image file to a read-only loop device with partition scanning; the device goes
/// away when its last user closes it (autoclear). Returns the device and its open handle.
fn attach_loop(path: &str) -> Result<(String, std::fs::File), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let ctl =
        std::fs::File::open("/dev/loop-control").map_err(|e| format!("/dev/loop-control: {e}"))?;
    // SAFETY: no argument.
    let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
    if n < 0 {
        return Err(format!(
            "no free loop device: {}",
            std::io::Error::last_os_error()
        ));
    }
    let dev = format!("/dev/loop{n}");
    let lo = std::fs::OpenOptions::new()
        .read(true)
        .open(&dev)
        .map_err(|e| format!("{dev}: {e}"))?;
    // struct loop_config { __u32 fd; __u32 block_size; struct loop_info64 info; __u64 reserved[8]; }
    // loop_info64 is 232 bytes; lo_flags sits at offset 52 inside it.
    let mut cfg = [0u8; 4 + 4 + 232 + 64];
    cfg[0..4].copy_from_slice(&(file.as_raw_fd() as u32).to_ne_bytes());
    let flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN;
    cfg[8 + 52..8 + 56].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: cfg is a loop_config for the call's duration.
    if unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_CONFIGURE, cfg.as_ptr()) } < 0 {
        return Err(format!(
            "{dev}: LOOP_CONFIGURE: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok((dev, lo))
}

fn copy_partition(from: &str, to: &str) -> Result<(), String> {
    let mut src = std::fs::File::open(from).map_err(|e| format!("{from}: {e}"))?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .open(to)
        .map_err(|e| format!("{to}: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        cancelled()?;
        let n = src
            .read(&mut buf)
            .map_err(|e| format!("reading {from}: {e}"))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])
            .map_err(|e| format!("writing {to}: {e}"))?;
    }
    dst.sync_all().map_err(|e| format!("{to}: {e}"))
}

fn read_file(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))
}

/// The boot files an image may carry are tens of MiB; more is not a boot file.
const BOOT_FILE_MAX: u64 = 256 << 20;

fn read_bytes(path: &str) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let mut out = Vec::new();
    f.take(BOOT_FILE_MAX + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("{path}: {e}"))?;
    if out.len() as u64 > BOOT_FILE_MAX {
        return Err(format!("{path}: more than {} MiB", BOOT_FILE_MAX >> 20));
    }
    Ok(out)
}

fn write_boot_file(to: &str, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = std::path::Path::new(to).parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    super::write_atomic(to, bytes, 0o644).map_err(|e| format!("writing {to}: {e}"))
}

const NEW_ROOT_MOUNT: &str = "/run/appliance/new-root";

/// The [`MANIFEST`] of the verified root on `dev`.
fn read_manifest(dev: &str) -> Result<Manifest, String> {
    std::fs::create_dir_all(NEW_ROOT_MOUNT).map_err(|e| e.to_string())?;
    sys::mount(dev, NEW_ROOT_MOUNT, "erofs", libc::MS_RDONLY, "")?;
    let path = format!("{NEW_ROOT_MOUNT}/{MANIFEST}");
    let text = std::fs::File::open(&path)
        .and_then(|f| {
            let mut t = String::new();
            f.take(MANIFEST_MAX as u64 + 1).read_to_string(&mut t)?;
            Ok(t)
        })
        .map_err(|e| {
            format!("{path}: {e} (an image built before boot manifests cannot be installed)")
        });
    sys::umount(NEW_ROOT_MOUNT);
    Manifest::parse(&text?)
}

/// Write `adv` over the last 1024 bytes of the ESP's ldlinux.sys, where syslinux keeps it.
fn write_adv(adv: &[u8; 1024]) -> Result<(), String> {
    let ld = format!("{ESP_MOUNT}/syslinux/ldlinux.sys");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&ld)
        .map_err(|e| format!("{ld}: {e}"))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(len.saturating_sub(1024)))
        .map_err(|e| e.to_string())?;
    f.write_all(adv)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{ld}: {e}"))
}

/// Clear syslinux's boot-once record.
fn disarm() -> Result<(), String> {
    write_adv(&adv_empty())
}

/// Arm the one-shot boot of `target`: syslinux's ADV, and on UEFI systemd-boot's variable.
fn arm_once(target: &str) -> Result<(), String> {
    write_adv(&adv_boot_once(target))?;
    if is_efi() {
        efi_oneshot(&format!("appliance-{target}.efi"))?;
    }
    Ok(())
}

/// Write `LoaderEntryOneShot` (UTF-16LE, NUL-terminated; attributes NV|BS|RT).
fn efi_oneshot(entry: &str) -> Result<(), String> {
    let vars = "/sys/firmware/efi/efivars";
    let _ = sys::mount("efivarfs", vars, "efivarfs", 0, "");
    let mut data = 7u32.to_le_bytes().to_vec();
    for u in entry.encode_utf16().chain([0]) {
        data.extend_from_slice(&u.to_le_bytes());
    }
    let path = format!("{vars}/LoaderEntryOneShot-{LOADER_GUID}");
    std::fs::write(&path, &data).map_err(|e| format!("{path}: {e}"))
}

const DOWNLOAD: &str = "/state/appliance/update.raw";

/// Set by a shutdown: the install stops at its next chunk and lets go of its files on state.
static CANCEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// An install holds files on state.
static BUSY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ask an install in progress to stop, and wait up to `wait` for it; true when none runs.
pub fn cancel(wait: Duration) -> bool {
    use std::sync::atomic::Ordering;
    CANCEL.store(true, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + wait;
    while BUSY.load(Ordering::SeqCst) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn cancelled() -> Result<(), String> {
    if CANCEL.load(std::sync::atomic::Ordering::SeqCst) {
        return Err("cancelled: the machine is shutting down".into());
    }
    Ok(())
}
/// An image is a few hundred MiB unpacked; a download that grows past this is refused.
pub const DOWNLOAD_MAX: u64 = 2 << 30;
/// A download that takes longer than this, however slowly the bytes trickle in, is abandoned.
pub const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(20 * 60);

/// Fetch a raw image over HTTP into the state partition (gunzipped when it starts with the gzip
/// magic; runs of zeros are skipped, so the file stays sparse).
fn download(url: &str) -> Result<String, String> {
    use std::io::{BufRead as _, Seek as _, SeekFrom};
    say(&format!("downloading {url}"));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .timeout_global(Some(DOWNLOAD_DEADLINE))
        .build()
        .into();
    let mut resp = agent.get(url).call().map_err(|e| format!("{url}: {e}"))?;
    let mut body = std::io::BufReader::new(resp.body_mut().as_reader());
    let gzip = body
        .fill_buf()
        .map_err(|e| format!("{url}: {e}"))?
        .starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn std::io::Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(body))
    } else {
        Box::new(body)
    };
    let mut out = std::fs::File::create(DOWNLOAD).map_err(|e| format!("{DOWNLOAD}: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total: u64 = 0;
    loop {
        let mut n = 0;
        while n < buf.len() {
            cancelled()?;
            match reader.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(format!("{url}: {e}")),
            }
        }
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(n as i64))
                .map_err(|e| e.to_string())?;
        } else {
            out.write_all(&buf[..n])
                .map_err(|e| format!("{DOWNLOAD}: {e}"))?;
        }
        total += n as u64;
        if total > DOWNLOAD_MAX {
            return Err(format!(
                "{url}: more than {} MiB unpacked: not an image; abandoned",
                DOWNLOAD_MAX >> 20
            ));
        }
    }
    out.set_len(total)
        .and_then(|_| out.sync_all())
        .map_err(|e| format!("{DOWNLOAD}: {e}"))?;
    say(&format!(
        "downloaded {} MiB{}",
        total >> 20,
        if gzip { " (gunzipped)" } else { "" }
    ));
    Ok(DOWNLOAD.to_string())
}

fn is_efi() -> bool {
    std::path::Path::new("/sys/firmware/efi").exists()
}

/// What [`install`] did: the slot and root hash it installed, None when `image` is running.
pub type Installed = Result<Option<(String, String)>, String>;

/// Install `image` (a disk image file, block device or http:// URL of one built by
/// images/build.sh) into the inactive slot and arm a one-shot boot of it. `pin`: the root hash
/// the image must have. Returns (slot, root hash), or None when the
/// image is the one running.
pub fn install(image: &str, pin: Option<&str>) -> Installed {
    use std::sync::atomic::Ordering;
    // Held for the whole install (a shutdown waits for it to let go of state and the ESP).
    BUSY.store(true, Ordering::SeqCst);
    let r = install_any(image, pin);
    BUSY.store(false, Ordering::SeqCst);
    r
}

fn install_any(image: &str, pin: Option<&str>) -> Installed {
    let current = super::cmdline()
        .slot
        .ok_or("no appliance.slot= on the kernel command line: not booted from the image")?;
    if let Some(p) = pin {
        // Known before any download: the running image, or one that failed its trial.
        if super::cmdline().verity.as_deref() == Some(p) {
            return Ok(None);
        }
        if load_record().is_some_and(|r| r.failed.iter().any(|f| f == p)) {
            return Err(format!(
                "root hash {p} failed a trial boot before: not installing it again"
            ));
        }
    }
    if image.starts_with("http://") {
        let r = download(image).and_then(|file| install_any(&file, pin));
        let _ = std::fs::remove_file(DOWNLOAD);
        return r;
    }
    let target = other(&current).to_string();
    let rec = load_record().unwrap_or(Record {
        good: current.clone(),
        ..Record::default()
    });
    // The other slot is overwritten: it must not be the one that boots by default (a trial
    // that could not be made the default runs here while the other still is).
    if rec.good != current {
        return Err(format!(
            "slot {current} is running but slot {} boots by default: not overwriting the default slot",
            rec.good
        ));
    }
    // A file goes through a loop device so its partitions appear like a disk's.
    let is_block = std::fs::metadata(image)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .map_err(|e| format!("{image}: {e}"))?;
    let (disk, _hold) = if is_block {
        (image.to_string(), None)
    } else {
        let (d, f) = attach_loop(image)?;
        std::thread::sleep(Duration::from_millis(500));
        (d, Some(f))
    };
    let new = disk_partitions(&disk);
    let ours = disk_partitions(&boot_disk()?);
    let part =
        |m: &std::collections::HashMap<String, (String, String, u64)>, n: &str, whose: &str| {
            m.get(n)
                .cloned()
                .ok_or(format!("{whose} has no partition named {n}"))
        };
    let (new_esp, _, _) = part(&new, "esp", image)?;
    let (new_root, _, new_root_size) = part(&new, "rootA", image)?;
    let (new_verity, _, new_verity_size) = part(&new, "verityA", image)?;
    let (esp, _, _) = part(&ours, "esp", "the boot disk")?;
    let (root, root_mm, root_size) = part(&ours, &format!("root{target}"), "the boot disk")?;
    let (verity, verity_mm, verity_size) =
        part(&ours, &format!("verity{target}"), "the boot disk")?;
    if new_root_size > root_size || new_verity_size > verity_size {
        return Err(format!("{image}: its root ({new_root_size} bytes) or verity ({new_verity_size}) does not fit slot {target} ({root_size}, {verity_size})"));
    }
    std::fs::create_dir_all(NEW_ESP_MOUNT).map_err(|e| e.to_string())?;
    sys::mount(&new_esp, NEW_ESP_MOUNT, "vfat", libc::MS_RDONLY, "")?;
    let result = (|| {
        let stanza_text = read_file(&format!("{NEW_ESP_MOUNT}/slots/syslinux-{target}.cfg"))?;
        let hash = verity_of(&stanza_text).ok_or(format!(
            "{image}: its slot-{target} boot entry names no root hash"
        ))?;
        dm::check_root_hash(&hash)?;
        if let Some(p) = pin {
            if p != hash {
                return Err(format!(
                    "{image} has root hash {hash}, not the pinned {p}: not installed"
                ));
            }
        }
        if super::cmdline().verity.as_deref() == Some(hash.as_str()) {
            return Ok(None);
        }
        if rec.failed.contains(&hash) {
            return Err(format!(
                "root hash {hash} failed a trial boot before: not installing it again"
            ));
        }
        say(&format!(
            "installing {image} into slot {target} (root hash {hash})"
        ));
        copy_partition(&new_root, &root)?;
        copy_partition(&new_verity, &verity)?;
        // The written slot must verify against the hash its boot entry will pass.
        let sb = sys::read_head(&verity, 512).map_err(|e| format!("{verity}: {e}"))?;
        let sb = dm::parse_superblock(&sb).map_err(|e| format!("{verity}: {e}"))?;
        let (sectors, table) = dm::verity_table(&sb, &root_mm, &verity_mm, &hash);
        let name = format!("verify-{target}");
        let dev = dm::create_verity(&name, sectors, &table)?;
        // Read the manifest through verity: what it says is under the root hash.
        let manifest = super::verify_all(&dev).and_then(|()| read_manifest(&dev));
        dm::remove(&name)?;
        let manifest = manifest.map_err(|e| {
            format!("slot {target} does not verify against root hash {hash}: {e}; not installed")
        })?;
        // Boot files only as the manifest vouches for them; the stanza is built here.
        let vmlinuz = read_bytes(&format!("{NEW_ESP_MOUNT}/A/vmlinuz"))?;
        manifest
            .check("vmlinuz", &vmlinuz)
            .map_err(|e| format!("{image}: {e}"))?;
        let initrd = read_bytes(&format!("{NEW_ESP_MOUNT}/A/initrd"))?;
        manifest
            .check("initrd", &initrd)
            .map_err(|e| format!("{image}: {e}"))?;
        // The image keeps slot A's UKI where systemd-boot finds it, slot B's in slots/.
        let uki = read_bytes(&if target == "A" {
            format!("{NEW_ESP_MOUNT}/EFI/Linux/appliance-A.efi")
        } else {
            format!("{NEW_ESP_MOUNT}/slots/appliance-B.efi")
        })?;
        let uki = manifest
            .uki(&target, &hash, &uki)
            .map_err(|e| format!("{image}: {e}"))?;
        let stanza_text = manifest.stanza(&target, &hash);
        std::fs::create_dir_all(ESP_MOUNT).map_err(|e| e.to_string())?;
        sys::mount(&esp, ESP_MOUNT, "vfat", 0, "")?;
        let boot = (|| {
            // Each file by temp-and-rename: a crash leaves the old file or the new, whole.
            for (bytes, to) in [
                (&vmlinuz, format!("{ESP_MOUNT}/{target}/vmlinuz")),
                (&initrd, format!("{ESP_MOUNT}/{target}/initrd")),
                (
                    &uki,
                    format!("{ESP_MOUNT}/EFI/Linux/appliance-{target}.efi"),
                ),
            ] {
                write_boot_file(&to, bytes)?;
            }
            let cfg_path = format!("{ESP_MOUNT}/syslinux/syslinux.cfg");
            let cfg = read_file(&cfg_path)?;
            write_boot_file(
                &cfg_path,
                set_stanza(&cfg, &target, &stanza_text).as_bytes(),
            )?;
            // The trial is recorded before the one-shot is armed: a boot of the new slot
            // always finds itself on trial (and is rolled back if it is not healthy).
            let mut trial = Record {
                good: rec.good.clone(),
                trial: Some(target.clone()),
                trial_hash: Some(hash.clone()),
                failed: rec.failed.clone(),
                armed: false,
            };
            save_record(&trial)?;
            match arm_once(&target) {
                Ok(()) => {
                    trial.armed = true;
                    save_record(&trial)
                }
                Err(e) => {
                    // Half armed (syslinux's record written, the EFI variable not): disarm.
                    if let Err(d) = disarm() {
                        say(&format!("cannot clear syslinux's boot-once record: {d}"));
                    }
                    if let Err(r) = save_record(&rec) {
                        say(&r);
                    }
                    Err(e)
                }
            }
        })();
        sys::umount(ESP_MOUNT);
        boot?;
        Ok(Some((target.clone(), hash)))
    })();
    sys::umount(NEW_ESP_MOUNT);
    result
}

/// Make `slot` the default boot entry on BIOS and UEFI.
fn make_default(slot: &str) -> Result<(), String> {
    let esp = disk_partitions(&boot_disk()?)
        .get("esp")
        .map(|p| p.0.clone())
        .ok_or("the boot disk has no esp")?;
    std::fs::create_dir_all(ESP_MOUNT).map_err(|e| e.to_string())?;
    sys::mount(&esp, ESP_MOUNT, "vfat", 0, "")?;
    let r = (|| {
        let cfg_path = format!("{ESP_MOUNT}/syslinux/syslinux.cfg");
        let cfg = read_file(&cfg_path)?;
        write_boot_file(&cfg_path, set_default(&cfg, slot).as_bytes())?;
        let loader = format!("{ESP_MOUNT}/loader/loader.conf");
        let conf = read_file(&loader)?;
        write_boot_file(
            &loader,
            loader_default(&conf, &format!("appliance-{slot}.efi")).as_bytes(),
        )
    })();
    sys::umount(ESP_MOUNT);
    r
}

/// Called once a boot is healthy: a trial slot becomes the default.
pub fn on_healthy(slot: &str) {
    let Some(mut rec) = load_record() else {
        return;
    };
    if rec.trial.as_deref() == Some(slot) {
        match make_default(slot) {
            Ok(()) => {
                say(&format!(
                    "slot {slot} is healthy: it is now the default (slot {} is the fallback)",
                    rec.good
                ));
                rec.good = slot.to_string();
                rec.trial = None;
                rec.trial_hash = None;
                if let Err(e) = save_record(&rec) {
                    say(&e);
                }
            }
            Err(e) => say(&format!(
                "slot {slot} is healthy but could not be made the default: {e}"
            )),
        }
    }
}

/// At boot: a trial that came back to the old slot failed; say so and remember its hash.
pub fn on_boot(slot: &str) {
    let Some(rec) = load_record() else {
        return;
    };
    let (after, note) = rec.after_boot(slot);
    if let Some(n) = note {
        say(&n);
    }
    if after != rec {
        if let Err(e) = save_record(&after) {
            say(&e);
        }
    }
}

/// Is this boot a trial of `slot`?
pub fn is_trial(slot: &str) -> bool {
    load_record().is_some_and(|r| r.trial.as_deref() == Some(slot))
}

/// Reboot now (after syncing): PID 1 only.
pub fn reboot() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    sys::halt_forever()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "SERIAL 0 115200\nPROMPT 0\nTIMEOUT 1\nDEFAULT A\nLABEL A\n  LINUX /A/vmlinuz\n  INITRD /A/initrd\n  APPEND console=ttyS0 appliance.slot=A appliance.verity=aa\n";

    #[test]
    fn a_stanza_is_added_replaced_and_read_back() {
        let b = "LABEL B\n  LINUX /B/vmlinuz\n  APPEND appliance.slot=B appliance.verity=bb\n";
        let two = set_stanza(CFG, "B", b);
        assert_eq!(stanza(&two, "B").unwrap(), b);
        assert_eq!(stanza(&two, "A"), stanza(CFG, "A"));
        let b2 = b.replace("bb", "cc");
        let replaced = set_stanza(&two, "B", &b2);
        assert_eq!(stanza(&replaced, "B").unwrap(), b2);
        assert_eq!(replaced.matches("LABEL B").count(), 1);
        assert_eq!(
            verity_of(&stanza(&replaced, "B").unwrap()).as_deref(),
            Some("cc")
        );
    }

    #[test]
    fn the_default_changes_and_nothing_else() {
        let d = set_default(CFG, "B");
        assert!(d.contains("\nDEFAULT B\n"));
        assert_eq!(d.replace("DEFAULT B", "DEFAULT A"), CFG);
        let l = loader_default(
            "timeout 0\ndefault appliance-A.efi\nconsole-mode keep\n",
            "appliance-B.efi",
        );
        assert_eq!(l, "timeout 0\nconsole-mode keep\ndefault appliance-B.efi\n");
    }

    #[test]
    fn the_adv_checksum_matches_syslinux_for_an_empty_vector() {
        // An empty ADV as syslinux --install writes it: checksum word == ADV_MAGIC2.
        let mut empty = [0u8; 512];
        empty[0..4].copy_from_slice(&ADV_MAGIC1.to_le_bytes());
        empty[4..8].copy_from_slice(&ADV_MAGIC2.to_le_bytes());
        empty[508..512].copy_from_slice(&ADV_MAGIC3.to_le_bytes());
        let a = adv_boot_once("B");
        assert_eq!(&a[..512], &a[512..]);
        assert_eq!(&a[10..11], b"B");
        assert_eq!(a[8..10], [ADV_BOOTONCE, 1]);
        // Words after the header sum to MAGIC2 (checksum word included), as for the empty one.
        let sum = |b: &[u8]| {
            b[4..508].chunks(4).fold(0u32, |s, w| {
                s.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            })
        };
        assert_eq!(sum(&a[..512]), ADV_MAGIC2);
        assert_eq!(sum(&empty), ADV_MAGIC2);
        // What a disarm writes is that empty vector, twice.
        assert_eq!(&adv_empty()[..512], &empty[..]);
        assert_eq!(&adv_empty()[512..], &empty[..]);
    }

    #[test]
    fn the_record_round_trips() {
        let r = Record {
            good: "A".into(),
            trial: Some("B".into()),
            trial_hash: Some("ab".into()),
            failed: vec![],
            armed: true,
        };
        let back: Record = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(other("A"), "B");
        assert_eq!(other("B"), "A");
    }
    fn manifest_for(vmlinuz: &[u8], initrd: &[u8], uki_a: &[u8], uki_b: &[u8]) -> String {
        let cmd = |s: &str| {
            format!("console=ttyS0,115200 appliance.slot={s} appliance.verity={HASH_PLACEHOLDER} panic=10")
        };
        format!(
            "vmlinuz {}\ninitrd {}\nuki-A {}\nuki-B {}\ncmdline-A {}\ncmdline-B {}\n",
            sha256_hex(vmlinuz),
            sha256_hex(initrd),
            sha256_hex(uki_a),
            sha256_hex(uki_b),
            cmd("A"),
            cmd("B")
        )
    }

    fn uki(slot: &str, hash: &str) -> Vec<u8> {
        let mut b = b"MZ stub .osrel .cmdline console=ttyS0,115200 appliance.slot=".to_vec();
        b.extend_from_slice(slot.as_bytes());
        b.extend_from_slice(
            format!(" appliance.verity={hash} panic=10 .linux KERNEL .initrd").as_bytes(),
        );
        b
    }

    /// The root's manifest vouches for the kernel, the initrd, each slot's UKI (whose
    /// command line names the root hash) and the command line; nothing else of the download
    /// is believed. A download that swaps any of them is refused.
    #[test]
    fn boot_files_are_installed_only_as_the_verified_root_vouches_for_them() {
        let hash = "ab".repeat(32);
        let m = Manifest::parse(&manifest_for(
            b"KERNEL",
            b"INITRD",
            &uki("A", HASH_PLACEHOLDER),
            &uki("B", HASH_PLACEHOLDER),
        ))
        .unwrap();
        m.check("vmlinuz", b"KERNEL").unwrap();
        let e = m.check("vmlinuz", b"KERNEL + a rootkit").unwrap_err();
        assert!(e.contains("its vmlinuz (sha256"), "{e}");
        assert!(m.check("initrd", b"INITRD").is_ok());
        assert!(m.check("initrd", b"KERNEL").is_err());
        // The real UKI passes and is written as it came.
        assert_eq!(
            m.uki("B", &hash, &uki("B", &hash)).unwrap(),
            uki("B", &hash)
        );
        // Slot A's UKI is not slot B's; a changed command line is refused.
        assert!(m.uki("B", &hash, &uki("A", &hash)).is_err());
        let evil = String::from_utf8(uki("B", &hash))
            .unwrap()
            .replace("panic=10", "appliance.config=http://evil/ panic=10");
        let e = m.uki("B", &hash, evil.as_bytes()).unwrap_err();
        assert!(
            e.contains("slot-B UKI is not the one its root vouches for"),
            "{e}"
        );
        // A UKI naming another root hash is refused too.
        assert!(m.uki("B", &hash, &uki("B", &"cd".repeat(32))).is_err());
        // The stanza is built from the manifest, whatever the download's says.
        let st = m.stanza("B", &hash);
        assert_eq!(
            st,
            format!("LABEL B\n  LINUX /B/vmlinuz\n  INITRD /B/initrd\n  APPEND console=ttyS0,115200 appliance.slot=B appliance.verity={hash} panic=10\n")
        );
        assert_eq!(verity_of(&st).as_deref(), Some(hash.as_str()));
    }

    #[test]
    fn a_manifest_missing_a_file_or_with_a_loose_command_line_is_refused() {
        let good = manifest_for(b"k", b"i", b"a", b"b");
        assert!(Manifest::parse(&good).is_ok());
        let no_initrd: String = good
            .lines()
            .filter(|l| !l.starts_with("initrd"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(Manifest::parse(&no_initrd)
            .unwrap_err()
            .contains("no initrd"));
        let two_hashes = good.replace(
            "panic=10",
            &format!("appliance.verity={} panic=10", "ab".repeat(32)),
        );
        assert!(Manifest::parse(&two_hashes)
            .unwrap_err()
            .contains("placeholder once"));
        let wrong_slot = good.replace(
            "cmdline-B console=ttyS0,115200 appliance.slot=B",
            "cmdline-B console=ttyS0,115200 appliance.slot=A",
        );
        assert!(Manifest::parse(&wrong_slot).is_err());
        assert!(Manifest::parse(&"x".repeat(MANIFEST_MAX + 1)).is_err());
        assert!(Manifest::parse("vmlinuz xyz\n")
            .unwrap_err()
            .contains(":1: vmlinuz: not a sha256"));
    }

    /// A trial found on the old slot failed only if its one-shot was armed: an install cut
    /// between recording and arming never booted, and its image may be installed again. A
    /// record written before `armed` existed counts as armed (it was armed first).
    #[test]
    fn a_trial_counts_as_failed_only_once_it_was_armed() {
        let trial = |armed| Record {
            good: "A".into(),
            trial: Some("B".into()),
            trial_hash: Some("ab".into()),
            failed: vec![],
            armed,
        };
        let (after, note) = trial(true).after_boot("A");
        assert_eq!(after.failed, ["ab"]);
        assert_eq!(after.trial, None);
        assert!(note.unwrap().contains("did not come up healthy"));
        let (after, note) = trial(false).after_boot("A");
        assert!(after.failed.is_empty());
        assert_eq!(after.trial, None);
        assert!(note
            .unwrap()
            .contains("interrupted before its one-shot boot was armed"));
        let (after, note) = trial(true).after_boot("B");
        assert_eq!((after, note), (trial(true), None), "the trial itself boots");
        let old: Record =
            serde_json::from_str(r#"{"good":"A","trial":"B","trial_hash":"ab","failed":[]}"#)
                .unwrap();
        assert!(old.armed);
    }
}
