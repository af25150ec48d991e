//! The boot suite: build the image with images/build.sh, check it, and boot it under
//! `qemu-system-x86_64 -accel tcg`, reading the serial console with generous wall-clock
//! timeouts (the machine is slow and shared). One VM at a time.
//!
//! Networking: the metadata service is emulated inside qemu's user networking with
//! `restrict=on` and a `guestfwd` command (tests/image/metadata-server.py on the connection's
//! stdio): no host socket is opened and the guest can reach nothing else. The two-VM test joins
//! its VMs with a qemu stream netdev over a Unix socket in the test's own directory.
//!
//! Needs root (the kernel in /boot, apt) and the packages tests/run.sh installs; outside CI it
//! skips when they are missing, under CI=true it fails.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the image polls the live sources before the cache stands in (test images only;
/// the shipped default is 30 s).
const TEST_WAIT: &str = "appliance.wait=8";

/// One VM at a time: TCG is CPU-bound and the machine has two cores.
static VM: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ready(test: &str) -> bool {
    if !common::root_or_skip(test) {
        return false;
    }
    let have = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64 && command -v mkfs.erofs && command -v veritysetup && command -v xorriso && test -r /usr/share/OVMF/OVMF_CODE_4M.fd"])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: CI must have qemu-system-x86, erofs-utils, cryptsetup-bin, xorriso and ovmf (tests/run.sh installs them)"
        );
        eprintln!("skipping {test}: image tools missing (run tests/run.sh as root)");
    }
    have
}

fn scratch(name: &str) -> PathBuf {
    let base = root().join("target").join("image-tests");
    // Directories of earlier runs whose process is gone (the shared image, failed tests' logs).
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().unwrap_or("");
            if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let d = base.join(format!("{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A test's directory: removed when the test passes, kept (with the console logs) when it fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        Scratch(scratch(name))
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Build the image into `out`; returns the build's wall-clock time.
fn build(out: &Path) -> Duration {
    build_with(out, TEST_WAIT, None)
}

/// The release binary the images are built from (built once per run; the debug binary's
/// WireGuard is too slow under TCG for the workload's NFS traffic).
fn release_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let ok = Command::new("cargo")
            .args(["build", "--release", "--quiet"])
            .current_dir(root())
            .status()
            .expect("cargo build --release")
            .success();
        assert!(ok, "cargo build --release failed");
        root()
            .join("target/x86_64-unknown-linux-gnu/release/appliance")
            .to_string_lossy()
            .into_owned()
    })
}

fn build_with(out: &Path, cmdline: &str, version: Option<&str>) -> Duration {
    let bin = release_bin();
    let t = Instant::now();
    let mut cmd = Command::new(root().join("images/build.sh"));
    cmd.args(["--bin", bin, "--out"])
        .arg(out)
        .args(["--cmdline-extra", cmdline])
        .env("SOURCE_DATE_EPOCH", "1767225600");
    if let Some(v) = version {
        cmd.args(["--version", v]);
    }
    let o = cmd.output().expect("run images/build.sh");
    assert!(
        o.status.success(),
        "images/build.sh failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    t.elapsed()
}

/// The image every boot test starts from, built once per test run.
fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let out = scratch("image");
        let took = build(&out);
        eprintln!("image built in {:.1} s", took.as_secs_f64());
        out
    })
}

fn sha256(s: &str) -> String {
    appliance::image::userdata::sha256_hex(s)
}

fn copy_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("disk.raw");
    let ok = Command::new("cp")
        .args(["--sparse=always"])
        .arg(image().join("appliance.raw"))
        .arg(&disk)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    disk
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A NoCloud seed: a vfat disk labelled CIDATA, or an ISO 9660 image labelled cidata.
fn seed(dir: &Path, name: &str, user_data: &[u8], iso: bool) -> PathBuf {
    let src = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("user-data"), user_data).unwrap();
    std::fs::write(src.join("meta-data"), "instance-id: test\n").unwrap();
    let img = dir.join(format!("{name}.img"));
    let p = |p: &Path| p.to_str().unwrap().to_string();
    if iso {
        run(
            "xorriso",
            &[
                "-as",
                "mkisofs",
                "-quiet",
                "-V",
                "cidata",
                "-J",
                "-r",
                "-o",
                &p(&img),
                &p(&src),
            ],
        );
    } else {
        run("truncate", &["-s", "4M", &p(&img)]);
        run("mkfs.vfat", &["-n", "CIDATA", &p(&img)]);
        run(
            "mcopy",
            &[
                "-i",
                &p(&img),
                &p(&src.join("user-data")),
                &p(&src.join("meta-data")),
                "::",
            ],
        );
    }
    img
}

/// qemu arguments for a read-only virtio disk (seeds, update images).
fn ro_drive(p: &Path) -> Vec<String> {
    vec![
        "-drive".to_string(),
        format!("file={},format=raw,if=virtio,readonly=on", p.display()),
    ]
}

/// qemu arguments for a VM without a network card.
fn no_nic() -> Vec<String> {
    vec!["-nic".to_string(), "none".to_string()]
}

/// A running VM and everything its serial console printed.
struct Vm {
    child: Child,
    console: Arc<Mutex<String>>,
    log: PathBuf,
    started: Instant,
    _turn: Option<std::sync::MutexGuard<'static, ()>>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Only the qemu we started, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::write(&self.log, self.console.lock().unwrap().as_bytes());
    }
}

enum Firmware {
    Bios,
    /// q35 + OVMF; the VARS copy lives in the test directory.
    Uefi(PathBuf),
    /// i440fx + OVMF: Proxmox's default machine with UEFI.
    UefiI440fx(PathBuf),
}

/// OVMF on `machine`, with a fresh copy of its variable store at `vars`.
fn uefi(args: &mut Vec<String>, vars: &Path, machine: &str) {
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", vars).unwrap();
    args.extend([
        "-machine".into(),
        machine.into(),
        "-drive".into(),
        "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
        "-drive".into(),
        format!("if=pflash,format=raw,file={}", vars.display()),
    ]);
}

fn start_vm(
    dir: &Path,
    name: &str,
    fw: Firmware,
    disk: &Path,
    extra: &[String],
    take_turn: bool,
) -> Vm {
    start_vm_in(None, "512", dir, name, fw, disk, extra, take_turn)
}

/// [`start_vm`] in a network namespace (its tap devices appear there) with `mem` MiB.
#[allow(clippy::too_many_arguments)]
fn start_vm_in(
    netns: Option<&str>,
    mem: &str,
    dir: &Path,
    name: &str,
    fw: Firmware,
    disk: &Path,
    extra: &[String],
    take_turn: bool,
) -> Vm {
    let turn = take_turn.then(|| VM.lock().unwrap_or_else(|e| e.into_inner()));
    let format = if disk.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    let mut args: Vec<String> = vec![
        "-accel".into(),
        "tcg".into(),
        "-m".into(),
        mem.into(),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
        "-drive".into(),
        format!("file={},format={format},if=virtio", disk.display()),
    ];
    match fw {
        Firmware::Bios => args.extend(["-machine".into(), "pc".into()]),
        Firmware::Uefi(vars) => uefi(&mut args, &vars, "q35"),
        Firmware::UefiI440fx(vars) => uefi(&mut args, &vars, "pc"),
    }
    args.extend(extra.iter().cloned());
    let mut command = match netns {
        // `ip netns exec` execs qemu: the child's PID is qemu's.
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    let mut child = command
        .args(&args)
        .env("METADATA_LOG", dir.join(format!("{name}-metadata.log")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let console = Arc::new(Mutex::new(String::new()));
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let c = console.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut line = Vec::new();
            while r
                .read_until(b'\n', &mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                c.lock().unwrap().push_str(&String::from_utf8_lossy(&line));
                line.clear();
            }
        });
    }
    Vm {
        child,
        console,
        log: dir.join(format!("{name}.console.log")),
        started: Instant::now(),
        _turn: turn,
    }
}

impl Vm {
    fn text(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// Wait for a console line containing `needle`; returns the seconds since qemu started.
    fn wait_for(&mut self, needle: &str) -> f64 {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if self.text().contains(needle) {
                return self.started.elapsed().as_secs_f64();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "qemu exited ({status}) before {needle:?}; console:\n{}",
                    tail(&self.text())
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "no {needle:?} within {BOOT_TIMEOUT:?}; console:\n{}",
                    tail(&self.text())
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Send one QMP command to a VM's monitor socket and wait for its reply (events may come
/// first).
fn qmp_command(sock: &Path, command: &str) {
    let s = std::os::unix::net::UnixStream::connect(sock).expect("QMP socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut lines = BufReader::new(s).lines();
    let mut reply = |what: &str| loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("QMP closed before {what}"))
            .unwrap();
        if line.contains("\"return\"") || line.contains("\"error\"") || line.contains("\"QMP\"") {
            return line;
        }
    };
    reply("the greeting");
    w.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    reply("qmp_capabilities");
    w.write_all(format!("{{\"execute\": \"{command}\"}}\n").as_bytes())
        .unwrap();
    let r = reply(command);
    assert!(r.contains("\"return\""), "QMP {command}: {r}");
}

/// Did the supervisor report `appliance run` ending?
fn died(console: &str) -> bool {
    console.lines().any(|l| {
        l.contains("appliance-init: appliance run (pid")
            && (l.contains("exited with status") || l.contains("was killed by signal"))
    })
}

impl Vm {
    /// Wait for qemu to end by itself (the guest powered off).
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the VM did not power off within {timeout:?}: {}",
                tail(&self.text())
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// A key pair from our own `genkey` / `pubkey`.
fn keypair() -> (String, String) {
    let private = run(common::BIN, &["genkey"]).trim().to_string();
    let mut c = Command::new(common::BIN)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(format!("{private}\n").as_bytes())
        .unwrap();
    let public = String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap();
    (private, public.trim().to_string())
}

const C1_PUBLIC: &str = "Yv/7p9TBowqS327ezLJ0y0qDFu1eWh6tlOG0wxZybZE=";

fn site(host: &str) -> String {
    site_with_key(host, C1_PUBLIC, None)
}

/// The test site; `c1_public` is node c1's key, `private` (if any) goes into the block.
fn site_with_key(host: &str, c1_public: &str, private: Option<&str>) -> String {
    let key = private
        .map(|k| format!("\n    private-key \"{k}\""))
        .unwrap_or_default();
    format!(
        r#"appliance {{
    host "{host}"{key}
}}
site "lab" {{
    asn 65010
    cloud-block "10.200.0.0/16"
    site-prefix "10.10.0.0/16"
    links 2
}}
gateway "gw1" {{
    endpoint "192.0.2.1"
    site-address "10.10.0.2"
    public-key "1nE7Va0QzFM6HwnWNX6LFyqkPZDBqPd1ib73nKyCE2Y="
}}
node "c1" {{
    address "10.200.0.11"
    public-key "{c1_public}"
}}
"#
    )
}

#[test]
fn two_builds_are_bit_identical_and_the_disk_has_the_expected_layout() {
    if !ready("image reproducibility") {
        return;
    }
    let first = image();
    let second = scratch("image-again");
    let took = build(&second);
    eprintln!("second build in {:.1} s", took.as_secs_f64());
    let sums = |d: &Path| std::fs::read_to_string(d.join("SHA256SUMS")).unwrap();
    assert_eq!(sums(first), sums(&second), "two builds differ");
    let _ = std::fs::remove_dir_all(&second);

    let info: serde_json::Value = serde_json::from_str(&run(
        "qemu-img",
        &[
            "info",
            "--output=json",
            first.join("appliance.qcow2").to_str().unwrap(),
        ],
    ))
    .unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 10u64 * 1024 * 1024 * 1024, "{info}");
    let qcow2_size = std::fs::metadata(first.join("appliance.qcow2"))
        .unwrap()
        .len();
    eprintln!("qcow2 {} MiB on disk", qcow2_size / (1024 * 1024));
    assert!(
        qcow2_size < 200 * 1024 * 1024,
        "qcow2 is {qcow2_size} bytes: preallocated?"
    );

    let table: serde_json::Value = serde_json::from_str(&run(
        "sfdisk",
        &["-J", first.join("appliance.raw").to_str().unwrap()],
    ))
    .unwrap();
    let t = &table["partitiontable"];
    assert_eq!(t["label"], "gpt");
    let parts = t["partitions"].as_array().unwrap();
    let names: Vec<&str> = parts.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["esp", "rootA", "verityA", "rootB", "verityB", "state"]
    );
    let types: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(types[0], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    assert_eq!(types[1], "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709");
    assert_eq!(types[2], "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5");
    assert_eq!(parts[0]["attrs"], "LegacyBIOSBootable");
    // The root hash in the UKI's command line is the one veritysetup computed.
    let hash = std::fs::read_to_string(first.join("root-hash-A")).unwrap();
    let uki = std::fs::read(first.join("appliance-A.efi")).unwrap();
    let needle = format!("appliance.verity={}", hash.trim());
    assert!(
        uki.windows(needle.len()).any(|w| w == needle.as_bytes()),
        "UKI lacks {needle}"
    );
}

#[test]
fn bios_boot_applies_a_nocloud_seed_then_the_cache_and_keeps_it_against_a_bad_seed() {
    if !ready("BIOS boot") {
        return;
    }
    let dir = Scratch::new("bios");
    let disk = copy_disk(&dir);
    // A disk larger than the image, as `dd` onto a bigger disk leaves it.
    run("truncate", &["-s", "+256M", disk.to_str().unwrap()]);
    let user_data = site("c1");
    let hash = sha256(&user_data);
    let good = seed(&dir, "seed", user_data.as_bytes(), false);

    // 1. First boot, NoCloud seed (vfat CIDATA): applied from cidata; a key is generated.
    let mut vm = start_vm(
        &dir,
        "boot1",
        Firmware::Bios,
        &disk,
        &[ro_drive(&good), no_nic()].concat(),
        true,
    );
    let t = vm.wait_for(&format!("config applied from cidata, hash {hash}"));
    vm.wait_for("started appliance run");
    let text = vm.text();
    assert!(
        text.contains("first boot: generated a private key"),
        "{}",
        tail(&text)
    );
    let pubkey = text
        .lines()
        .find_map(|l| l.split("appliance-init: public key: ").nth(1))
        .unwrap()
        .trim()
        .to_string();
    assert!(
        text.contains("state grown from 64 MiB to 320 MiB"),
        "{}",
        tail(&text)
    );
    eprintln!("BIOS + cidata: config applied {t:.1} s after qemu start");
    drop(vm);
    let verify = Command::new("sfdisk")
        .arg("--verify")
        .arg(&disk)
        .output()
        .unwrap();
    let verify = String::from_utf8_lossy(&verify.stdout).to_string()
        + &String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.contains("No errors detected"),
        "sfdisk --verify after growth:\n{verify}"
    );

    // 2. No source at all: the cached config, and the same key (state persisted).
    let mut vm = start_vm(&dir, "boot2", Firmware::Bios, &disk, &no_nic(), true);
    let t = vm.wait_for(&format!("config applied from cache, hash {hash}"));
    let text = vm.text();
    assert!(
        text.contains("first accepted from cidata"),
        "{}",
        tail(&text)
    );
    assert!(
        text.contains(&format!("public key: {pubkey}")),
        "{}",
        tail(&text)
    );
    assert!(!text.contains("generated a private key"), "{}", tail(&text));
    assert!(
        !text.contains("state grown"),
        "growth happens once: {}",
        tail(&text)
    );
    eprintln!("BIOS, no source: cached config applied {t:.1} s after qemu start");
    drop(vm);

    // 3. A malformed seed (ISO 9660 this time): refused with the reason, the cache stays.
    let bad_text = user_data.replace("links 2", "links 0");
    let bad = seed(&dir, "bad", bad_text.as_bytes(), true);
    let mut vm = start_vm(
        &dir,
        "boot3",
        Firmware::Bios,
        &disk,
        &[ro_drive(&bad), no_nic()].concat(),
        true,
    );
    vm.wait_for(&format!(
        "config from cidata rejected, the last good config (hash {hash}) stays in force"
    ));
    let t = vm.wait_for(&format!("config applied from cache, hash {hash}"));
    let text = vm.text();
    assert!(
        text.contains("user-data (cidata on /dev/"),
        "{}",
        tail(&text)
    );
    assert!(
        text.contains("links"),
        "the reason names the field: {}",
        tail(&text)
    );
    assert!(!text.contains(&format!(
        "config applied from cidata, hash {}",
        sha256(&bad_text)
    )));
    eprintln!("BIOS, malformed seed: kept the cached config {t:.1} s after qemu start");
}

#[test]
fn uefi_boot_applies_gzip_user_data_from_the_emulated_metadata_service() {
    if !ready("UEFI boot") {
        return;
    }
    let dir = Scratch::new("uefi");
    // The published qcow2 (10 GiB virtual), under a throw-away overlay: what Exoscale boots.
    let disk = dir.join("overlay.qcow2");
    let backing = image().join("appliance.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            backing.to_str().unwrap(),
            disk.to_str().unwrap(),
        ],
    );
    let (private, public) = keypair();
    let user_data = site_with_key("c1", &public, Some(&private));
    let hash = sha256(&user_data);
    let gz = dir.join("user-data.gz");
    let o = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(user_data.as_bytes())?;
            c.wait_with_output()
        });
    let gzipped = o.unwrap().stdout;
    assert_eq!(&gzipped[..2], &[0x1f, 0x8b]);
    std::fs::write(&gz, &gzipped).unwrap();
    let server = root().join("tests/image/metadata-server.py");
    let netdev = format!(
        "user,id=n0,net=169.254.169.0/24,host=169.254.169.2,dhcpstart=169.254.169.15,restrict=on,guestfwd=tcp:169.254.169.254:80-cmd:python3 {} {}",
        server.display(),
        gz.display()
    );
    let qmp = dir.join("qmp.sock");
    let extra = vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ];
    let mut vm = start_vm(
        &dir,
        "uefi",
        Firmware::Uefi(dir.join("vars.fd")),
        &disk,
        &extra,
        true,
    );
    let t = vm.wait_for(&format!("config applied from metadata, hash {hash}"));
    // The supplied key matches the site file: the daemon stays up and the boot is healthy.
    vm.wait_for("healthy: the daemon is up");
    let text = vm.text();
    assert!(!died(&text), "the daemon died: {}", tail(&text));
    assert!(
        text.contains(&format!("public key: {public}")),
        "{}",
        tail(&text)
    );
    assert!(
        text.contains("state grown from 64 MiB to 99"),
        "{}",
        tail(&text)
    );
    assert!(!text.contains(&private), "the private key was printed");
    // The daemon's log lines reach the console as plain text (the firmware's own screen
    // control sequences at the top are not ours).
    let daemon_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" INFO ") || l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(!daemon_lines.is_empty(), "{}", tail(&text));
    assert!(
        daemon_lines.iter().all(|l| !l.contains('\x1b')),
        "colour escapes in the daemon's console lines: {daemon_lines:?}"
    );
    assert!(
        text.contains("eth0: DHCP lease 169.254.169.15/24"),
        "{}",
        tail(&text)
    );
    let log = std::fs::read_to_string(dir.join("uefi-metadata.log")).unwrap_or_default();
    assert!(
        log.contains("GET /1.0/user-data HTTP/1.1 -> 200"),
        "metadata log: {log}"
    );
    eprintln!("UEFI + metadata (gzip): config applied {t:.1} s after qemu start");

    // The ACPI power button (what a cloud's "stop" presses): an orderly power-off.
    qmp_command(&qmp, "system_powerdown");
    vm.wait_for("shutdown requested (power button or SIGTERM)");
    vm.wait_for("state remounted read-only");
    let status = vm.wait_exit(Duration::from_secs(120));
    assert!(
        status.success(),
        "qemu ended with {status}: {}",
        tail(&vm.text())
    );
    assert!(
        vm.text().contains("appliance run stopped"),
        "{}",
        tail(&vm.text())
    );
}

/// No kernel command line config, no seed drive, no network, no cache: the image waits,
/// says what it looked for, and starts nothing; it neither exits nor restarts.
#[test]
fn with_no_config_anywhere_the_image_waits_and_says_so_instead_of_crash_looping() {
    if !ready("no-config boot") {
        return;
    }
    let dir = Scratch::new("noconfig");
    let disk = copy_disk(&dir);
    let mut vm = start_vm(&dir, "noconfig", Firmware::Bios, &disk, &no_nic(), true);
    let t = vm.wait_for("no config yet (kernel command line, cidata/config-2 drive, metadata service, cache): waiting");
    // Still polling a few seconds later: PID 1 is alive and nothing was started.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "the VM stopped: {}",
        tail(&vm.text())
    );
    let text = vm.text();
    for bad in [
        "started appliance run",
        "Kernel panic",
        "config applied from",
    ] {
        assert!(
            !text.contains(bad),
            "{bad:?} on the console:\n{}",
            tail(&text)
        );
    }
    eprintln!("no config anywhere: waiting line {t:.1} s after qemu start");
}

/// Proxmox's default machine (i440fx) with UEFI (OVMF) and a virtio NoCloud seed: the
/// combination where an IDE CD-ROM seed was never found (../shared/IMAGE.md), so seeds must be
/// virtio disks there; this boot shows that one is found.
#[test]
fn uefi_on_i440fx_finds_a_virtio_nocloud_seed() {
    if !ready("UEFI i440fx boot") {
        return;
    }
    let dir = Scratch::new("i440fx");
    let disk = copy_disk(&dir);
    let user_data = site("c1");
    let hash = sha256(&user_data);
    let seed = seed(&dir, "seed", user_data.as_bytes(), false);
    let mut vm = start_vm(
        &dir,
        "i440fx",
        Firmware::UefiI440fx(dir.join("vars.fd")),
        &disk,
        &[ro_drive(&seed), no_nic()].concat(),
        true,
    );
    let t = vm.wait_for(&format!("config applied from cidata, hash {hash}"));
    eprintln!("UEFI on i440fx + virtio cidata: config applied {t:.1} s after qemu start");
}

#[test]
fn a_corrupted_root_block_stops_the_boot() {
    if !ready("verity tamper") {
        return;
    }
    let dir = Scratch::new("tamper");
    let disk = copy_disk(&dir);
    let table: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &["-J", disk.to_str().unwrap()])).unwrap();
    let root_start = table["partitiontable"]["partitions"][1]["start"]
        .as_u64()
        .unwrap();
    // Flip one byte 2 MiB into the root filesystem: inside the binary's data.
    let offset = root_start * 512 + 2 * 1024 * 1024 + 123;
    {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut b = [0u8; 1];
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&[b[0] ^ 0xff]).unwrap();
    }
    let mut vm = start_vm(&dir, "tamper", Firmware::Bios, &disk, &no_nic(), true);
    let t = vm.wait_for("boot stopped: root slot A");
    let text = vm.text();
    assert!(text.contains("fails dm-verity"), "{}", tail(&text));
    assert!(
        text.contains("is corrupted"),
        "the kernel names the block: {}",
        tail(&text)
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !vm.text().contains("stage 2"),
        "the boot went on: {}",
        tail(&vm.text())
    );
    eprintln!("verity tamper: boot stopped {t:.1} s after qemu start");
}

#[test]
fn a_gateway_vm_and_a_node_vm_bring_up_the_tunnels_and_the_node_reaches_the_site_address() {
    if !ready("two VMs") {
        return;
    }
    let dir = Scratch::new("pair");
    let (gw_private, gw_public) = keypair();
    let (c1_private, c1_public) = keypair();
    let site_text = format!(
        r#"site "lab" {{
    asn 65010
    cloud-block "10.200.0.0/16"
    site-prefix "10.10.0.0/16"
    links 2
}}
gateway "gw1" {{
    endpoint "192.0.2.1"
    site-address "10.10.0.2"
    public-key "{gw_public}"
}}
node "c1" {{
    address "10.200.0.11"
    public-key "{c1_public}"
}}
"#
    );
    // The gateway's site address sits on its loopback: the node reaches it only through the
    // tunnels (its one route to 10.10.0.0/16 is the multipath route over them).
    let gw_data = format!(
        "appliance {{\n    host \"gw1\"\n    private-key \"{gw_private}\"\n    interface \"eth0\" {{\n        address \"192.0.2.1/24\"\n    }}\n    interface \"lo\" {{\n        address \"10.10.0.2/32\"\n    }}\n}}\n{site_text}"
    );
    let c1_data = format!(
        "appliance {{\n    host \"c1\"\n    private-key \"{c1_private}\"\n    interface \"eth0\" {{\n        address \"192.0.2.11/24\"\n    }}\n    health-check \"10.10.0.2\"\n}}\n{site_text}"
    );
    let gw_disk = dir.join("gw.raw");
    let c1_disk = dir.join("c1.raw");
    for d in [&gw_disk, &c1_disk] {
        run(
            "cp",
            &[
                "--sparse=always",
                image().join("appliance.raw").to_str().unwrap(),
                d.to_str().unwrap(),
            ],
        );
    }
    let gw_seed = seed(&dir, "gw-seed", gw_data.as_bytes(), false);
    let c1_seed = seed(&dir, "c1-seed", c1_data.as_bytes(), false);
    // One virtual wire: a qemu stream netdev over a Unix socket in this test's directory.
    let wire = dir.join("wire.sock");
    let nic = |server: &str, mac: &str| {
        let seed = if server == "on" { &gw_seed } else { &c1_seed };
        let mut args = ro_drive(seed);
        args.extend([
            "-netdev".into(),
            format!(
                "stream,id=w0,server={server},addr.type=unix,addr.path={}",
                wire.display()
            ),
            "-device".into(),
            format!("virtio-net-pci,netdev=w0,mac={mac}"),
        ]);
        args
    };
    let mut gw = start_vm(
        &dir,
        "gw1",
        Firmware::Bios,
        &gw_disk,
        &nic("on", "52:54:00:00:00:01"),
        true,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !wire.exists() {
        assert!(
            Instant::now() < deadline,
            "qemu did not create {}",
            wire.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c1 = start_vm(
        &dir,
        "c1",
        Firmware::Bios,
        &c1_disk,
        &nic("off", "52:54:00:00:00:02"),
        false,
    );
    gw.wait_for("config applied from cidata");
    c1.wait_for("config applied from cidata");
    let t = c1.wait_for("health check: 10.10.0.2 answered");
    c1.wait_for("healthy: the daemon is up");
    for (vm, name) in [(&gw, "gateway"), (&c1, "node")] {
        let text = vm.text();
        assert!(!died(&text), "the {name} daemon died: {}", tail(&text));
    }
    eprintln!("two VMs: the node reached the gateway's site address through the tunnels {t:.1} s after start");
    drop(c1);
    drop(gw);
}

#[test]
fn a_broken_image_installed_in_slot_b_falls_back_to_slot_a() {
    if !ready("A/B fallback") {
        return;
    }
    let dir = Scratch::new("ab");
    let disk = copy_disk(&dir);
    // An update whose kernel cannot start its init: it panics, and panic=10 reboots.
    let broken = dir.join("broken");
    build_with(
        &broken,
        &format!("{TEST_WAIT} rdinit=/nonexistent"),
        Some("0.1.0-broken"),
    );
    let (private, public) = keypair();
    let user_data = site_with_key("c1", &public, Some(&private)).replace(
        "    host \"c1\"\n",
        "    host \"c1\"\n    install-image \"/dev/vdb\"\n",
    );
    assert!(user_data.contains("install-image"));
    let seed = seed(&dir, "seed", user_data.as_bytes(), false);
    let extra = [
        ro_drive(&broken.join("appliance.raw")),
        ro_drive(&seed),
        // Let the guest reboot: the fallback is a reboot.
        vec!["-action".into(), "reboot=reset".into()],
        no_nic(),
    ]
    .concat();
    let mut vm = start_vm(&dir, "ab", Firmware::Bios, &disk, &extra, true);
    vm.wait_for("healthy: the daemon is up");
    let t_installed = vm.wait_for("slot B installed and verified");
    vm.wait_for("appliance.slot=B");
    let t_panic = vm.wait_for("Kernel panic");
    let t_back = vm.wait_for("slot B did not come up healthy: back on slot A");
    vm.wait_for("failed a trial boot before: not installing it again");
    let text = vm.text();
    assert!(!text.contains("slot B is healthy"), "{}", tail(&text));
    eprintln!(
        "A/B: slot B installed {t_installed:.1} s, trial panicked {t_panic:.1} s, back on A {t_back:.1} s after qemu start"
    );
}

#[test]
fn a_good_update_fetched_over_http_boots_once_on_uefi_and_becomes_the_default_when_healthy() {
    if !ready("A/B update") {
        return;
    }
    let dir = Scratch::new("ab-uefi");
    let disk = copy_disk(&dir);
    let next = dir.join("next");
    build_with(&next, TEST_WAIT, Some("0.1.0-next"));
    // Whoever can alter the download rewrites its boot entry: the install must not believe it
    // (it builds the entry from the verified root's manifest).
    tamper_esp(&next, "slots/syslinux-B.cfg", |b| {
        String::from_utf8(b)
            .unwrap()
            .replace(
                "panic=10",
                "appliance.config=http://192.0.2.66/evil panic=10",
            )
            .into_bytes()
    });
    let (mut vm, next_hash) = update_vm(
        &dir,
        &disk,
        &next,
        "ab-uefi",
        Firmware::Uefi(dir.join("vars.fd")),
    );
    vm.wait_for("downloading http://169.254.169.254/appliance.raw.gz");
    vm.wait_for("(gunzipped)");
    let t_installed = vm.wait_for(&format!(
        "slot B installed and verified (root hash {next_hash})"
    ));
    vm.wait_for("slot B is on trial");
    let t_default = vm.wait_for("slot B is healthy: it is now the default");
    std::thread::sleep(Duration::from_secs(3));
    drop(vm);
    // The ESP now boots B by default, on both firmwares.
    let table: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &["-J", disk.to_str().unwrap()])).unwrap();
    let esp_offset = table["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap()
        * 512;
    let image = format!("{}@@{esp_offset}", disk.display());
    let loader = run("mtype", &["-i", &image, "::/loader/loader.conf"]);
    assert!(loader.contains("default appliance-B.efi"), "{loader}");
    let syslinux = run("mtype", &["-i", &image, "::/syslinux/syslinux.cfg"]);
    assert!(syslinux.contains("DEFAULT B"), "{syslinux}");
    assert!(
        syslinux.contains(&format!("appliance.verity={next_hash}")),
        "{syslinux}"
    );
    assert!(
        !syslinux.contains("appliance.config="),
        "the download's boot entry was believed: {syslinux}"
    );
    eprintln!("A/B on UEFI: slot B installed {t_installed:.1} s, default after its healthy trial {t_default:.1} s after qemu start");
}

/// Rewrite one file of the ESP of the image built in `dir` (its appliance.raw), and gzip the
/// disk again into appliance.raw.gz: what an attacker on the download path could do.
fn tamper_esp(dir: &Path, file: &str, f: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    let raw = dir.join("appliance.raw");
    let table: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &["-J", raw.to_str().unwrap()])).unwrap();
    let offset = table["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap()
        * 512;
    let image = format!("{}@@{offset}", raw.display());
    let local = dir.join("tampered");
    run(
        "mcopy",
        &[
            "-n",
            "-i",
            &image,
            &format!("::/{file}"),
            local.to_str().unwrap(),
        ],
    );
    let bytes = f(std::fs::read(&local).unwrap());
    std::fs::write(&local, bytes).unwrap();
    run(
        "mcopy",
        &[
            "-o",
            "-i",
            &image,
            local.to_str().unwrap(),
            &format!("::/{file}"),
        ],
    );
    let gz = std::fs::File::create(dir.join("appliance.raw.gz")).unwrap();
    let ok = Command::new("gzip")
        .args(["-1n", "-c"])
        .arg(&raw)
        .stdout(gz)
        .status()
        .unwrap()
        .success();
    assert!(ok, "gzip");
}

/// A VM booted from `disk` whose user-data installs `next` (built by images/build.sh) over
/// HTTP, pinned by its root hash, from a guestfwd server; returns it and the pinned hash.
fn update_vm(dir: &Path, disk: &Path, next: &Path, name: &str, fw: Firmware) -> (Vm, String) {
    let next_hash = std::fs::read_to_string(next.join("root-hash-A"))
        .unwrap()
        .trim()
        .to_string();
    let served = next.join("appliance.raw.gz").display().to_string();
    (
        serving_update(dir, disk, &served, &next_hash, name, fw),
        next_hash,
    )
}

/// A VM booted from `disk` whose user-data installs http://169.254.169.254/appliance.raw.gz,
/// pinned to `hash`, served from `served` (a file, or the metadata server's "@trickle"); its
/// QMP socket is DIR/qmp.sock.
fn serving_update(
    dir: &Path,
    disk: &Path,
    served: &str,
    next_hash: &str,
    name: &str,
    fw: Firmware,
) -> Vm {
    // Room on state for the download (state grows to the disk at first boot).
    run("truncate", &["-s", "+512M", disk.to_str().unwrap()]);
    let (private, public) = keypair();
    let user_data = site_with_key("c1", &public, Some(&private)).replace(
        "    host \"c1\"\n",
        &format!("    host \"c1\"\n    install-image \"http://169.254.169.254/appliance.raw.gz\"\n    install-root-hash \"{next_hash}\"\n"),
    );
    let seed = seed(dir, "seed", user_data.as_bytes(), false);
    let empty = dir.join("no-user-data");
    std::fs::write(&empty, "").unwrap();
    let netdev = format!(
        "user,id=n0,net=169.254.169.0/24,host=169.254.169.2,dhcpstart=169.254.169.15,restrict=on,guestfwd=tcp:169.254.169.254:80-cmd:python3 {} {} appliance /appliance.raw.gz={}",
        root().join("tests/image/metadata-server.py").display(),
        empty.display(),
        served
    );
    let extra = [
        ro_drive(&seed),
        vec![
            "-action".into(),
            "reboot=reset".into(),
            "-netdev".into(),
            netdev,
            "-device".into(),
            "virtio-net-pci,netdev=n0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()),
        ],
    ]
    .concat();
    start_vm(dir, name, fw, disk, &extra, true)
}

/// A download that never ends (one byte a second of a claimed 1 GiB) runs beside the
/// supervisor, not inside it: the power button pressed meanwhile powers the machine off in
/// order, while the download is still running (it once ran inside PID 1's loop, which heard
/// nothing until the download failed).
#[test]
fn the_power_button_works_while_an_update_trickles_in() {
    if !ready("A/B trickling download") {
        return;
    }
    let dir = Scratch::new("ab-trickle");
    let disk = copy_disk(&dir);
    let mut vm = serving_update(
        &dir,
        &disk,
        "@trickle",
        &"ab".repeat(32),
        "ab-trickle",
        Firmware::Bios,
    );
    vm.wait_for("downloading http://169.254.169.254/appliance.raw.gz");
    std::thread::sleep(Duration::from_secs(5));
    qmp_command(&dir.join("qmp.sock"), "system_powerdown");
    vm.wait_for("shutdown requested (power button or SIGTERM)");
    vm.wait_for("state remounted read-only");
    let status = vm.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "qemu ended with {status}");
    let text = vm.text();
    assert!(
        !text.contains("install-image http://"),
        "the download ended before the power-off was heard: {}",
        tail(&text)
    );
}

/// An update whose kernel was swapped on the way (its root, and so its root hash, intact):
/// the install refuses it before anything is written or armed, and the machine stays on A.
#[test]
fn an_update_whose_kernel_was_swapped_on_the_way_is_refused_and_nothing_changes() {
    if !ready("A/B tampered kernel") {
        return;
    }
    let dir = Scratch::new("ab-tampered");
    let disk = copy_disk(&dir);
    let next = dir.join("next");
    build_with(&next, TEST_WAIT, Some("0.1.0-next"));
    tamper_esp(&next, "A/vmlinuz", |mut b| {
        let n = b.len();
        b[n - 1] ^= 0xff;
        b
    });
    let (mut vm, _) = update_vm(&dir, &disk, &next, "ab-tampered", Firmware::Bios);
    vm.wait_for("(gunzipped)");
    vm.wait_for("its vmlinuz (sha256");
    vm.wait_for("is not the one its root vouches for");
    std::thread::sleep(Duration::from_secs(2));
    let text = vm.text();
    assert!(!text.contains("on trial"), "{}", tail(&text));
    assert!(!text.contains("rebooting to try"), "{}", tail(&text));
    drop(vm);
    let table: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &["-J", disk.to_str().unwrap()])).unwrap();
    let offset = table["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap()
        * 512;
    let image = format!("{}@@{offset}", disk.display());
    let syslinux = run("mtype", &["-i", &image, "::/syslinux/syslinux.cfg"]);
    assert!(!syslinux.contains("LABEL B"), "{syslinux}");
    let listing = run("mdir", &["-i", &image, "::/"]);
    assert!(
        !listing.contains(" B "),
        "nothing written for slot B: {listing}"
    );
}

#[test]
fn the_kernel_command_line_comes_first_and_a_config_drive_is_read_too() {
    if !ready("cmdline and config-2") {
        return;
    }
    let dir = Scratch::new("cmdline");
    // A site-specific image: the user-data (gzip, base64) baked into the kernel command line.
    let on_cmdline = site("c1");
    let gz = {
        let mut c = Command::new("gzip")
            .args(["-9n", "-c"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(on_cmdline.as_bytes())
            .unwrap();
        c.wait_with_output().unwrap().stdout
    };
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&gz);
    let baked = dir.join("baked");
    build_with(
        &baked,
        &format!("{TEST_WAIT} appliance.config=base64:{b64}"),
        None,
    );
    // An OpenStack-style config drive holding a different (valid) user-data.
    let on_drive = site("gw1");
    let src = dir.join("config-2.d/openstack/latest");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("user_data"), &on_drive).unwrap();
    let iso = dir.join("config-2.iso");
    run(
        "xorriso",
        &[
            "-as",
            "mkisofs",
            "-quiet",
            "-V",
            "config-2",
            "-J",
            "-r",
            "-o",
            iso.to_str().unwrap(),
            dir.join("config-2.d").to_str().unwrap(),
        ],
    );
    let drive = [ro_drive(&iso), no_nic()].concat();

    // 1. Both present: the command line wins.
    let disk = dir.join("baked.raw");
    run(
        "cp",
        &[
            "--sparse=always",
            baked.join("appliance.raw").to_str().unwrap(),
            disk.to_str().unwrap(),
        ],
    );
    let mut vm = start_vm(&dir, "cmdline", Firmware::Bios, &disk, &drive, true);
    let t = vm.wait_for(&format!(
        "config applied from cmdline, hash {}",
        sha256(&on_cmdline)
    ));
    assert!(
        vm.text().contains("(host c1, role node)"),
        "{}",
        tail(&vm.text())
    );
    eprintln!("BIOS, config on the kernel command line: applied {t:.1} s after qemu start");
    drop(vm);

    // 2. The shipped image and the config drive alone: read from the drive.
    let disk = copy_disk(&dir);
    let mut vm = start_vm(&dir, "config-2", Firmware::Bios, &disk, &drive, true);
    let t = vm.wait_for(&format!(
        "config applied from cidata, hash {}",
        sha256(&on_drive)
    ));
    assert!(
        vm.text().contains("(host gw1, role gateway)"),
        "{}",
        tail(&vm.text())
    );
    eprintln!("BIOS, config-2 drive: applied {t:.1} s after qemu start");
}

/// Is every tool the workload lab needs here (registry, skopeo, umoci, ganesha)?
fn workload_tools(test: &str) -> bool {
    let have = Command::new("sh")
        .args(["-c", "command -v docker-registry && command -v skopeo && command -v umoci && command -v ganesha.nfsd && command -v rpcbind && command -v birdc"])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: CI must have docker-registry, skopeo, umoci, nfs-ganesha, rpcbind and bird2 (tests/run.sh installs them)"
        );
        eprintln!("skipping {test}: workload tools missing (run tests/run.sh as root)");
    }
    have
}

/// Run the workload fixture script; its last line of output.
fn fixture(env: &[(&str, &str)], args: &[&str]) -> String {
    let o = Command::new(root().join("tests/image/workload-fixture.sh"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("workload-fixture.sh");
    assert!(
        o.status.success(),
        "workload-fixture.sh {args:?}:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// Stops the fixture's daemons (by their pid files) however the test ends.
struct Fixtures(Vec<PathBuf>);

impl Drop for Fixtures {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = Command::new(root().join("tests/image/workload-fixture.sh"))
                .arg("stop")
                .arg(d)
                .output();
        }
    }
}

/// Received bytes of the gateway's link devices (what the node sent through each link).
fn link_rx(ns: &common::Netns) -> Vec<(String, u64)> {
    ns.ip_json(&["-s", "link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| {
            let name = l["ifname"].as_str().filter(|n| n.starts_with("ap-l"))?;
            Some((
                name.to_string(),
                l["stats64"]["rx"]["bytes"].as_u64().unwrap_or(0),
            ))
        })
        .collect()
}

impl Vm {
    fn wait_within(&mut self, needle: &str, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            if self.text().contains(needle) {
                return self.started.elapsed().as_secs_f64();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "qemu exited ({status}) before {needle:?}; console:\n{}",
                    tail(&self.text())
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {timeout:?}; console:\n{}",
                tail(&self.text())
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// examples/control-raw, built static for the workload image.
fn control_raw() -> String {
    let ok = Command::new("cargo")
        .args(["build", "--release", "--quiet", "--example", "control-raw"])
        .current_dir(root())
        .status()
        .expect("cargo build --example control-raw")
        .success();
    assert!(ok, "cargo build --example control-raw failed");
    root()
        .join("target/x86_64-unknown-linux-gnu/release/examples/control-raw")
        .to_string_lossy()
        .into_owned()
}

/// Liveness transitions of gw's links to c1 so far.
fn c1_flips(gw: &common::Netns) -> u64 {
    let out = gw.appliance(&["status", "-o", "json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status: {e}: {}", common::text(&out)));
    st["links"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["peer"] == "c1")
        .map(|l| l["transitions"].as_u64().unwrap_or(0))
        .sum()
}

/// The gateway's BGP session with c1: its state and how often it left Established.
fn c1_session(gw: &common::Netns) -> (String, u64) {
    let out = gw.appliance(&["status", "-o", "json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = st["bgp"]["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["name"] == "c1")
        .unwrap_or_else(|| panic!("no BGP session with c1: {}", st["bgp"]));
    (
        s["state"].as_str().unwrap_or("").to_string(),
        s["flaps"].as_u64().unwrap_or(0),
    )
}

/// bird's sessions with the gateways and when each last changed state.
fn bird_since(site: &common::Netns, lab: &Path) -> String {
    let o = site.exec(&[
        "birdc",
        "-s",
        lab.join("bird.ctl").to_str().unwrap(),
        "show",
        "protocols",
    ]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("gw")).collect();
    assert!(
        rows.iter().all(|r| r.contains("Established")) && rows.len() == 2,
        "bird's sessions:\n{text}"
    );
    rows.join("\n")
}

/// The file the job wrote arrived intact: its sha256 on the site equals what the job computed.
fn assert_same_sum(export: &Path, name: &str) {
    let site_sum = run("sha256sum", &[export.join(name).to_str().unwrap()]);
    let job_sum = std::fs::read_to_string(export.join(format!("{name}.sha256"))).unwrap();
    assert_eq!(
        site_sum.split_whitespace().next(),
        job_sum.split_whitespace().next(),
        "{name}: the bytes the job wrote arrived changed"
    );
}

/// The job's script (busybox sh): write 64 MiB through the kernel NFS mount, read the site's
/// file, try what a workload must not do, then stay up like a batch daemon.
const JOB: &str = r#"echo "job: uid $(id -u) host $(hostname)"; dd if=/dev/urandom of=/data/from-node bs=1M count=64 2>/dev/null && sha256sum /data/from-node > /data/from-node.sha256 && echo "job: wrote 64 MiB"; echo "job: site file $(sha256sum /data/from-site)"; if ip route add 10.98.0.0/24 dev lo 2>/dev/null; then echo "contain: route=CHANGED"; else echo "contain: route=refused"; fi; if cat /state/appliance/private.key >/dev/null 2>&1; then echo "contain: key=READ"; else echo "contain: key=unreadable"; fi; echo 'site "x" { asn 65010; cloud-block "10.200.0.0/16"; site-prefix "10.10.0.0/16"; links 2; }; gateway "gw1" { endpoint "192.0.2.1"; site-address "10.10.0.2"; public-key "1nE7Va0QzFM6HwnWNX6LFyqkPZDBqPd1ib73nKyCE2Y="; }; node "c1" { address "10.200.0.11"; public-key "Yv/7p9TBowqS327ezLJ0y0qDFu1eWh6tlOG0wxZybZE="; }' > /tmp/site.kdl; appliance drain c1 -c /tmp/site.kdl > /tmp/drain.out 2>&1; echo "contain: drain=$? $(head -c 300 /tmp/drain.out)"; echo "contain: raw drain: $(control-raw '{"cmd":"drain","on":true}')"; echo "contain: raw reload: $(control-raw '{"cmd":"reload","config":"/tmp/site.kdl"}')"; echo "job done"; t() { read up _ < /proc/uptime; echo "${up%.*}${up#*.}"; }; a=$(t); dd if=/dev/zero of=/data2/bench-n2 bs=1M count=32 conv=fsync 2>/dev/null; b=$(t); dd if=/dev/zero of=/data1/bench-n1 bs=1M count=32 conv=fsync 2>/dev/null; c=$(t); echo "bench: 32 MiB written in nconnect2_cs=$((b-a)) nconnect1_cs=$((c-b))"; while [ ! -e /data/go-burn ]; do sleep 1; done; s=$(t); n=$(grep -c ^processor /proc/cpuinfo); pids=""; i=0; while [ $i -lt $n ]; do yes > /dev/null & pids="$pids $!"; i=$((i+1)); done; echo "job: burning $n cores"; dd if=/dev/urandom of=/data/burn-copy bs=1M count=32 conv=fsync 2>/dev/null; sha256sum /data/burn-copy > /data/burn-copy.sha256; echo "job: burn copy done"; while [ $(( $(t) - s )) -lt 6000 ]; do sleep 1; done; kill $pids; echo "job: burn over"; while [ ! -e /data/go-fault ]; do sleep 1; done; dd if=/dev/urandom of=/data/fault-copy bs=1M count=48 conv=fsync 2>/dev/null; sha256sum /data/fault-copy > /data/fault-copy.sha256; echo "job: fault copy done"; while [ ! -e /data/go-write ]; do sleep 1; done; echo "job: writing"; i=0; while [ $i -lt 256 ]; do dd if=/dev/urandom of=/data/stop-copy bs=1M count=4 seek=$((i*4)) conv=notrunc,fsync 2>/dev/null; i=$((i+1)); done; echo "job: write ended"; exec sleep 100000"#;

#[test]
fn the_node_image_runs_the_sites_job_from_a_pinned_image_on_its_kernel_nfs_mount() {
    if !ready("workload VM") || !workload_tools("workload VM") {
        return;
    }
    let dir = Scratch::new("workload");
    let (site, gw1, gw2, inet, _c1, lab) = common::two_gateways("wl");
    // The site's services at 10.10.0.5 on the site LAN: a registry and an NFS server.
    site.ip(&["addr", "add", "10.10.0.5/24", "dev", "br0"]);
    // The same server at a second address: a second NFS client on the node (nconnect 1).
    site.ip(&["addr", "add", "10.10.0.6/24", "dev", "br0"]);
    site.ip(&["addr", "add", "10.10.0.7/24", "dev", "br0"]);
    let oci = dir.join("oci");
    // The workload image carries appliance (stripped), to try the control socket from inside.
    let extra = dir.join("appliance");
    run(
        "objcopy",
        &["--strip-debug", release_bin(), extra.to_str().unwrap()],
    );
    let bins = format!("{} {}", extra.display(), control_raw());
    let built = fixture(
        &[("WORKLOAD_EXTRA_BIN", &bins)],
        &["build", oci.to_str().unwrap()],
    );
    assert!(built.starts_with("v1 sha256:"), "{built}");
    let reg = dir.join("registry");
    let nfs_state = dir.join("ganesha");
    let export = dir.join("export");
    std::fs::create_dir_all(&export).unwrap();
    // A scratch export anyone may write (the job's root is uid 100000 to NFS, not root).
    run("chmod", &["1777", export.to_str().unwrap()]);
    let _daemons = Fixtures(vec![reg.clone(), nfs_state.clone()]);
    fixture(
        &[],
        &[
            "registry",
            &site.name,
            "10.10.0.5",
            "5000",
            reg.to_str().unwrap(),
        ],
    );
    let pinned = fixture(
        &[],
        &[
            "push",
            &site.name,
            oci.to_str().unwrap(),
            "10.10.0.5",
            "5000",
            "site/worker",
        ],
    );
    assert!(pinned.starts_with("site/worker@sha256:"), "{pinned}");
    // A file the site wrote, for the job to read back.
    run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", export.join("from-site").display()),
            "bs=1M",
            "count=8",
            "status=none",
        ],
    );
    let site_sum = run("sha256sum", &[export.join("from-site").to_str().unwrap()]);
    let site_sum = site_sum.split_whitespace().next().unwrap().to_string();
    fixture(
        &[],
        &[
            "ganesha",
            &site.name,
            "10.10.0.5",
            export.to_str().unwrap(),
            nfs_state.to_str().unwrap(),
        ],
    );
    // The site file: liveness that suits a TCG guest, and c1's workload.
    let conf = lab.join("site.kdl");
    let text = std::fs::read_to_string(&conf)
        .unwrap()
        .replace(
            "keepalive-ms 200\n dead-after 3",
            "keepalive-ms 300\n dead-after 10\n metrics-port 9477",
        )
        .replace(
            "node \"c1\" {\n address \"10.200.0.11\"\n",
            &format!(
                "node \"c1\" {{\n address \"10.200.0.11\"\n workload {{\n  image \"10.10.0.5:5000/{pinned}\"\n  command \"/bin/sh\" \"-c\" #\"{JOB}\"#\n  drain-command \"/bin/sh\" \"-c\" \"echo draining the job; sleep 2; echo job idle\"\n  mount \"10.10.0.5:/export\" \"/data\" {{ nconnect 8; }}\n  mount \"10.10.0.6:/export\" \"/data1\" {{ nconnect 1; }}\n  mount \"10.10.0.7:/export\" \"/data2\"\n  stop-timeout-s 10\n }}\n"
            ),
        );
    std::fs::write(&conf, &text).unwrap();
    let _bird = common::bird_site_router(&site, &lab);
    let _g1 = common::daemon(&gw1, &lab, "gw1");
    let g2 = common::daemon(&gw2, &lab, "gw2");
    let c1_key = std::fs::read_to_string(lab.join("c1.key")).unwrap();
    let user_data = format!(
        "appliance {{\n    host \"c1\"\n    private-key \"{}\"\n    interface \"eth0\" {{\n        address \"192.0.2.21/24\"\n    }}\n}}\n{text}",
        c1_key.trim()
    );
    let seed_img = seed(&dir, "c1-seed", user_data.as_bytes(), false);
    let disk = copy_disk(&dir);
    // Room on state for the image (it grows to the disk at first boot).
    run("truncate", &["-s", "3G", disk.to_str().unwrap()]);
    let qmp = dir.join("qmp.sock");
    let mut args = ro_drive(&seed_img);
    args.extend([
        "-netdev".into(),
        "tap,id=n0,ifname=vtap0,script=no,downscript=no".into(),
        "-device".into(),
        "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:21".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    let mut vm = start_vm_in(
        Some(&inet.name),
        "1024",
        &dir,
        "c1",
        Firmware::Bios,
        &disk,
        &args,
        true,
    );
    common::wait_for("qemu's tap device", Duration::from_secs(30), || {
        inet.exec(&["ip", "link", "show", "vtap0"]).status.success()
    });
    inet.ip(&["link", "set", "vtap0", "master", "br0", "up"]);
    let t_running = vm.wait_within("workload: started", Duration::from_secs(600));
    let t_done = vm.wait_within("workload| job done", Duration::from_secs(600));
    let console = vm.text();
    for want in [
        "workload: mounted 10.10.0.5:/export at /data",
        // The default: one connection per link.
        "workload: mounted 10.10.0.7:/export at /data2 (vers=4.1,addr=10.10.0.7,proto=tcp,hard,timeo=100,retrans=3,nconnect=2,",
        "workload| job: uid 0 host c1",
        "workload| job: wrote 64 MiB",
        "workload| contain: route=refused",
        "workload| contain: key=unreadable",
    ] {
        assert!(
            console.contains(want),
            "no {want:?} on the console:\n{}",
            tail(&console)
        );
    }
    // The job read the site's bytes, and the site got the job's bytes intact.
    assert!(
        console.contains(&format!("workload| job: site file {site_sum}")),
        "the job read other bytes than the site wrote:\n{}",
        tail(&console)
    );
    let node_sum = run("sha256sum", &[export.join("from-node").to_str().unwrap()]);
    // Root inside the workload is not root to the site's NFS server.
    let owner =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(export.join("from-node")).unwrap());
    assert_eq!(
        owner, 100_000,
        "the job's root wrote as uid {owner} on the site"
    );
    let job_said = std::fs::read_to_string(export.join("from-node.sha256")).unwrap();
    assert_eq!(
        node_sum.split_whitespace().next(),
        job_said.split_whitespace().next(),
        "the 64 MiB the job wrote arrived changed"
    );
    // A root process in the workload is refused the control socket's drain.
    let drain_line = console
        .lines()
        .find(|l| l.contains("workload| contain: drain="))
        .unwrap_or_else(|| panic!("no drain attempt on the console:\n{}", tail(&console)))
        .to_string();
    assert!(
        !drain_line.contains("drain=0 "),
        "the workload drained the node: {drain_line}"
    );
    // The daemon itself refuses them (a raw client, without appliance's own client checks).
    for want in [
        r#"workload| contain: raw drain: {"ok":false,"error":"drain needs root"}"#,
        r#"workload| contain: raw reload: {"ok":false,"error":"reload needs root"}"#,
    ] {
        assert!(console.contains(want), "no {want:?}:\n{}", tail(&console));
    }
    // The node's metrics, scraped from the site: the workload runs the pinned digest, its
    // mounts are up.
    let metrics = site.exec(&[
        "curl",
        "-sf",
        "--max-time",
        "10",
        "http://10.200.0.11:9477/metrics",
    ]);
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    let digest = pinned.split('@').nth(1).unwrap();
    for want in [
        "appliance_workload_state{state=\"running\"} 1".to_string(),
        format!("digest=\"{digest}\""),
        "appliance_workload_mount_up{path=\"/data\",device=\"10.10.0.5:/export\"} 1".to_string(),
        "appliance_workload_restarts_total 0".to_string(),
    ] {
        assert!(
            metrics.contains(&want),
            "no {want:?} in c1's metrics:\n{metrics}"
        );
    }
    // The mount's connections come from the node's site address, more than one of them.
    let ss = site.exec(&["ss", "-Htn", "state", "established", "( sport = :2049 )"]);
    let conns: Vec<String> = String::from_utf8_lossy(&ss.stdout)
        .lines()
        .filter(|l| l.contains("10.200.0.11"))
        .map(str::to_string)
        .collect();
    assert!(
        conns.len() >= 2,
        "NFS connections from 10.200.0.11: {conns:?}"
    );
    // ... and they spread over more than one (gateway, link). /data has 8 connections over the
    // 4 (gateway, link) paths; each path the kernel's L4 hash gives one carries 8 MiB or more.
    // All 8 on one path: 4 × 4^-8, once in 16,000 runs.
    let mut carried = Vec::new();
    for (name, gw) in [("gw1", &gw1), ("gw2", &gw2)] {
        for (dev, rx) in link_rx(gw) {
            if rx > 6 << 20 {
                carried.push(format!("{name}/{dev}: {} MiB", rx >> 20));
            }
        }
    }
    assert!(
        carried.len() >= 2,
        "the 64 MiB went over one link only: {carried:?}"
    );
    // The node's prefix is still at the site router (the refused drain changed nothing).
    let birdc = Command::new("ip")
        .args([
            "netns",
            "exec",
            &site.name,
            "birdc",
            "-s",
            lab.join("bird.ctl").to_str().unwrap(),
            "show",
            "route",
            "10.200.0.11/32",
        ])
        .output()
        .unwrap();
    let routes = String::from_utf8_lossy(&birdc.stdout).into_owned();
    assert!(
        routes.contains("10.200.0.11/32"),
        "bird lost c1's prefix:\n{routes}"
    );
    eprintln!(
        "workload VM: job started {t_running:.1} s after power-on, done at {t_done:.1} s; links that carried it: {carried:?}; {drain_line}"
    );
    // Power-on to the job, by step (seconds of guest uptime on the console; TCG).
    let at = |needle: &str| -> f64 {
        console
            .lines()
            .find(|l| l.contains(needle))
            .and_then(|l| {
                l.trim_start_matches('[')
                    .split(']')
                    .next()?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(f64::NAN)
    };
    let steps = [
        ("kernel + stage 1", "stage 2: PID 1"),
        ("config", "config applied from"),
        ("tunnels", "answers through the tunnels"),
        ("pull + verify + unpack", "workload: pulled"),
        ("NFS mounts", "workload: mounted 10.10.0.7"),
        ("start", "workload: started"),
    ];
    let mut last = 0.0;
    let mut breakdown = Vec::new();
    for (what, needle) in steps {
        let t = at(needle);
        breakdown.push(format!("{what} {:.1} s", t - last));
        last = t;
    }
    eprintln!(
        "workload VM: power-on to job {last:.1} s guest uptime: {}",
        breakdown.join(", ")
    );
    // What the mount carries, nconnect = links against nconnect 1 (TCG: a ratio, not a speed).
    vm.wait_within("workload| bench: 32 MiB written", Duration::from_secs(300));
    let bench = vm
        .text()
        .lines()
        .find(|l| l.contains("workload| bench:"))
        .unwrap()
        .to_string();
    eprintln!("workload VM: {bench}");
    // A job that burns every core beside an NFS copy: no link flaps, BGP stays up.
    let flips0 = c1_flips(&gw1) + c1_flips(&gw2);
    let sessions0 = [c1_session(&gw1), c1_session(&gw2)];
    assert!(
        sessions0.iter().all(|s| s.0 == "Established"),
        "c1's sessions before the burn: {sessions0:?}"
    );
    let bird0 = bird_since(&site, &lab);
    std::fs::write(export.join("go-burn"), b"").unwrap();
    vm.wait_within("workload| job: burn copy done", Duration::from_secs(300));
    vm.wait_within("workload| job: burn over", Duration::from_secs(300));
    assert_eq!(
        c1_flips(&gw1) + c1_flips(&gw2),
        flips0,
        "links to c1 flapped while the job burned the CPU"
    );
    assert_eq!(
        bird_since(&site, &lab),
        bird0,
        "a BGP session went down while the job burned the CPU"
    );
    assert_eq!(
        [c1_session(&gw1), c1_session(&gw2)],
        sessions0,
        "the gateways' BGP sessions with c1 went down while the job burned the CPU"
    );
    assert_same_sum(&export, "burn-copy");
    // Faults under a job: one link cut and a gateway killed during a 48 MiB copy through the
    // hard mount.
    std::fs::write(export.join("go-fault"), b"").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    gw1.exec(&["nft", "add", "table", "inet", "ap-cut"]);
    gw1.exec(&[
        "nft",
        "add",
        "chain",
        "inet",
        "ap-cut",
        "in",
        "{ type filter hook input priority -10; }",
    ]);
    let cut = gw1.exec(&[
        "nft", "add", "rule", "inet", "ap-cut", "in", "udp", "dport", "51821", "drop",
    ]);
    assert!(cut.status.success(), "nft: {}", common::text(&cut));
    std::thread::sleep(Duration::from_secs(3));
    g2.signal("-KILL");
    vm.wait_within("workload| job: fault copy done", Duration::from_secs(400));
    assert_same_sum(&export, "fault-copy");
    gw1.exec(&["nft", "delete", "table", "inet", "ap-cut"]);
    // Drain from a gateway: the drain command runs, the node withdraws only once it is idle.
    let out = gw1.appliance(&["drain", "c1", "-c", conf.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "appliance drain c1 on gw1: {}",
        common::text(&out)
    );
    vm.wait_within("workload: drain asked by gw1", Duration::from_secs(120));
    vm.wait_within("workload| job idle", Duration::from_secs(120));
    vm.wait_within(
        "workload: idle (the drain command exited with status 0)",
        Duration::from_secs(60),
    );
    vm.wait_within(
        "prefixes withdrawn, ready to evict",
        Duration::from_secs(120),
    );
    let console = vm.text();
    let idle_at = console.find("workload| job idle").unwrap();
    let net_at = console
        .find("draining: new connections from the tunnels refused")
        .unwrap_or_else(|| panic!("the network drain never started:\n{}", tail(&console)));
    assert!(
        idle_at < net_at,
        "the network drain started before the workload was idle:\n{}",
        tail(&console)
    );
    common::wait_for("bird to drop c1's prefix", Duration::from_secs(60), || {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &site.name,
                "birdc",
                "-s",
                lab.join("bird.ctl").to_str().unwrap(),
                "show",
                "route",
                "10.200.0.11/32",
            ])
            .output()
            .unwrap();
        !String::from_utf8_lossy(&o.stdout).contains("10.200.0.11/32")
    });
    // Back in service from the gateway: the prefix returns.
    let out = gw1.appliance(&["undrain", "c1", "-c", conf.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "appliance undrain c1 on gw1: {}",
        common::text(&out)
    );
    vm.wait_within(
        "workload: the gateways no longer ask for a drain",
        Duration::from_secs(120),
    );
    common::wait_for(
        "bird to learn c1's prefix again",
        Duration::from_secs(60),
        || {
            let o = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &site.name,
                    "birdc",
                    "-s",
                    lab.join("bird.ctl").to_str().unwrap(),
                    "show",
                    "route",
                    "10.200.0.11/32",
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).contains("10.200.0.11/32")
        },
    );
    // Power button during an NFS write: the workload stops, NFS unmounts, then the daemon and
    // state, within the stop timeout (10 s) and 10 s more.
    std::fs::write(export.join("go-write"), b"").unwrap();
    vm.wait_within("workload| job: writing", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    let t_button = Instant::now();
    qmp_command(&qmp, "system_powerdown");
    vm.wait_exit(Duration::from_secs(10 + 10));
    let console = vm.text();
    let order = [
        "workload: SIGTERM",
        "workload: stopped",
        "workload: /data unmounted",
        "appliance run stopped",
        "state remounted read-only",
    ];
    let mut at = 0;
    for step in order {
        let i = console[at..].find(step).unwrap_or_else(|| {
            panic!(
                "{step:?} missing or out of order after the power button:\n{}",
                tail(&console)
            )
        });
        at += i + step.len();
    }
    eprintln!(
        "workload VM: powered off {:.1} s after the button",
        t_button.elapsed().as_secs_f64()
    );
    drop(vm);
    let _ = std::fs::remove_dir_all(&lab);
}

/// A copy of the OCI layout `src` (fixture's `v1`) with one more image tagged `tag`: the same
/// layers, a config with `env` added. Returns its manifest digest and its config's digest.
fn derived_image(src: &Path, dst: &Path, tag: &str, env: &str) -> (String, String) {
    run("cp", &["-a", src.to_str().unwrap(), dst.to_str().unwrap()]);
    let blob = |d: &str| {
        dst.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("index.json")).unwrap()).unwrap();
    let v1 = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "v1")
        .unwrap()
        .clone();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(v1["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    config["config"]["Env"]
        .as_array_mut()
        .unwrap()
        .push(env.into());
    let put = |bytes: &[u8]| {
        let d = format!("sha256:{}", sha256_bytes(bytes));
        std::fs::write(blob(&d), bytes).unwrap();
        d
    };
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = put(&config_bytes);
    manifest["config"]["digest"] = config_digest.clone().into();
    manifest["config"]["size"] = config_bytes.len().into();
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = put(&manifest_bytes);
    let mut entry = v1;
    entry["digest"] = manifest_digest.clone().into();
    entry["size"] = manifest_bytes.len().into();
    entry["annotations"]["org.opencontainers.image.ref.name"] = tag.into();
    let mut index = index;
    index["manifests"].as_array_mut().unwrap().push(entry);
    std::fs::write(dst.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    (manifest_digest, config_digest)
}

fn sha256_bytes(b: &[u8]) -> String {
    use sha2::Digest as _;
    appliance::model::workload::Digest::from_sha256(&sha2::Sha256::digest(b))
        .hex()
        .to_string()
}

/// An OCI layout on an ISO labelled `label` whose one layer holds `../../escaped`. Returns the
/// ISO and the manifest digest.
fn escaping_layout_iso(dir: &Path, label: &str) -> (PathBuf, String) {
    let layout = dir.join("escape-layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    let name = b"../../escaped";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_size(2);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, &b"x\n"[..]).unwrap();
    let layer = b.into_inner().unwrap();
    let put = |bytes: &[u8]| {
        let d = sha256_bytes(bytes);
        std::fs::write(blobs.join(&d), bytes).unwrap();
        format!("sha256:{d}")
    };
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let cd = put(config);
    let ld = put(&layer);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let md = put(manifest.as_bytes());
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let iso = dir.join("escape.iso");
    run(
        "xorriso",
        &[
            "-as",
            "mkisofs",
            "-quiet",
            "-V",
            label,
            "-J",
            "-r",
            "-o",
            iso.to_str().unwrap(),
            layout.to_str().unwrap(),
        ],
    );
    (iso, md)
}

/// Bad images change nothing: a good image runs first; then, one boot each, a registry serving
/// a tampered blob, a layer with a path out of the root (from a drive), a digest the registry
/// does not have, and a tag without a digest. Each is refused with one console line and the
/// last good image runs again; nothing of the bad ones runs.
#[test]
fn bad_images_are_refused_and_the_last_good_workload_keeps_running() {
    if !ready("bad images VM") || !workload_tools("bad images VM") {
        return;
    }
    let dir = Scratch::new("badimages");
    let (site, gw1, _gw2, inet, _c1, lab) = common::two_gateways("bad");
    site.ip(&["addr", "add", "10.10.0.5/24", "dev", "br0"]);
    // No site router here: the site reaches the cloud block through gw1.
    site.ip(&["route", "add", "10.200.0.0/16", "via", "10.10.0.2"]);
    let oci = dir.join("oci");
    fixture(&[], &["build", oci.to_str().unwrap()]);
    let reg = dir.join("registry");
    let _daemons = Fixtures(vec![reg.clone()]);
    fixture(
        &[],
        &[
            "registry",
            &site.name,
            "10.10.0.5",
            "5000",
            reg.to_str().unwrap(),
        ],
    );
    let good = fixture(
        &[],
        &[
            "push",
            &site.name,
            oci.to_str().unwrap(),
            "10.10.0.5",
            "5000",
            "site/worker",
        ],
    );
    // Image b: the good layers, another config; pushed, then its config blob changed in the
    // registry's storage (the registry serves the changed bytes under the old digest).
    let (b_manifest, b_config) =
        derived_image(&oci.join("layout"), &dir.join("layout-b"), "b", "IMAGE=b");
    let o = site.exec(&[
        "skopeo",
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:b", dir.join("layout-b").display()),
        "docker://10.10.0.5:5000/site/worker:b",
    ]);
    assert!(o.status.success(), "skopeo: {}", common::text(&o));
    let hex = b_config.trim_start_matches("sha256:");
    let data = reg.join(format!(
        "storage/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = std::fs::read(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
    let n = bytes.len();
    bytes[n / 2] ^= 0x20;
    std::fs::write(&data, &bytes).unwrap();
    let (iso, escape) = escaping_layout_iso(&dir, "WLBAD");
    let nobody = format!("sha256:{}", sha256_bytes(b"no such image"));
    let conf = lab.join("site.kdl");
    let base = std::fs::read_to_string(&conf).unwrap().replace(
        "keepalive-ms 200\n dead-after 3",
        "keepalive-ms 300\n dead-after 10",
    );
    let c1_key = std::fs::read_to_string(lab.join("c1.key")).unwrap();
    let _g1 = common::daemon(&gw1, &lab, "gw1");
    let disk = copy_disk(&dir);
    run("truncate", &["-s", "2G", disk.to_str().unwrap()]);
    let boot = |n: usize, image: &str, extra_drive: Option<&Path>| -> Vm {
        let text = base.replace(
            "node \"c1\" {\n address \"10.200.0.11\"\n",
            &format!(
                "node \"c1\" {{\n address \"10.200.0.11\"\n workload {{\n  image \"{image}\"\n  command \"/bin/sh\" \"-c\" \"echo job running with IMAGE=$IMAGE; exec sleep 100000\"\n  stop-timeout-s 5\n }}\n"
            ),
        );
        let user_data = format!(
            "appliance {{\n    host \"c1\"\n    private-key \"{}\"\n    interface \"eth0\" {{\n        address \"192.0.2.21/24\"\n    }}\n}}\n{text}",
            c1_key.trim()
        );
        let seed_img = seed(&dir, &format!("seed{n}"), user_data.as_bytes(), false);
        let mut args = ro_drive(&seed_img);
        if let Some(d) = extra_drive {
            args.extend(ro_drive(d));
        }
        let qmp = dir.join(format!("qmp{n}.sock"));
        args.extend([
            "-netdev".into(),
            format!("tap,id=n0,ifname=vtap{n},script=no,downscript=no"),
            "-device".into(),
            "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:21".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ]);
        let vm = start_vm_in(
            Some(&inet.name),
            "768",
            &dir,
            &format!("c1-boot{n}"),
            Firmware::Bios,
            &disk,
            &args,
            true,
        );
        common::wait_for("qemu's tap device", Duration::from_secs(30), || {
            inet.exec(&["ip", "link", "show", &format!("vtap{n}")])
                .status
                .success()
        });
        inet.ip(&["link", "set", &format!("vtap{n}"), "master", "br0", "up"]);
        vm
    };
    let off = |mut vm: Vm, n: usize| {
        qmp_command(&dir.join(format!("qmp{n}.sock")), "system_powerdown");
        vm.wait_exit(Duration::from_secs(60));
        vm.text()
    };
    // 1. The good image runs and becomes the last good one.
    let mut vm = boot(1, &format!("10.10.0.5:5000/{good}"), None);
    vm.wait_within(
        "workload| job running with IMAGE=",
        Duration::from_secs(300),
    );
    off(vm, 1);
    let cases: [(&str, String, Option<&Path>, &str); 4] = [
        (
            "a tampered blob",
            format!("10.10.0.5:5000/site/worker@{b_manifest}"),
            None,
            "digest mismatch",
        ),
        (
            "a path out of the root",
            format!("disk:WLBAD@{escape}"),
            Some(&iso),
            "climbs out of the root",
        ),
        (
            "a digest the registry lacks",
            format!("10.10.0.5:5000/site/worker@{nobody}"),
            None,
            "not found",
        ),
        (
            "a tag without a digest",
            "10.10.0.5:5000/site/worker:v1".to_string(),
            None,
            "the image is not pinned by a digest",
        ),
    ];
    for (i, (what, image, drive, why)) in cases.iter().enumerate() {
        let n = i + 2;
        let mut vm = boot(n, image, *drive);
        vm.wait_within(
            "workload| job running with IMAGE=",
            Duration::from_secs(300),
        );
        let console = vm.text();
        let refusals: Vec<&str> = console.lines().filter(|l| l.contains(why)).collect();
        assert!(
            !refusals.is_empty(),
            "{what}: no refusal naming {why:?}:\n{}",
            tail(&console)
        );
        let job_lines: Vec<&str> = console
            .lines()
            .filter(|l| l.contains("workload| job running"))
            .collect();
        assert_eq!(job_lines.len(), 1, "{what}: {job_lines:?}");
        assert!(
            job_lines[0].ends_with("IMAGE="),
            "{what}: the bad image ran: {}",
            job_lines[0]
        );
        if *why == "the image is not pinned by a digest" {
            assert!(
                console.contains("config from cidata rejected"),
                "{what}:\n{}",
                tail(&console)
            );
        } else {
            assert_eq!(
                refusals.len(),
                1,
                "{what}: more than one refusal line: {refusals:?}"
            );
            assert!(refusals[0].contains("refused"), "{what}: {}", refusals[0]);
            assert!(
                console.contains("workload: running the last good image"),
                "{what}:\n{}",
                tail(&console)
            );
        }
        off(vm, n);
        eprintln!("bad images: {what} refused, the last good image ran");
    }
    let _ = std::fs::remove_dir_all(&lab);
}
