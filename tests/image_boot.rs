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

fn build_with(out: &Path, cmdline: &str, version: Option<&str>) -> Duration {
    let t = Instant::now();
    let mut cmd = Command::new(root().join("images/build.sh"));
    cmd.args(["--bin", common::BIN, "--out"])
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
        "512".into(),
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
    let mut child = Command::new("qemu-system-x86_64")
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
