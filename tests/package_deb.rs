//! The Debian package (packaging/build-deb.sh, `cargo deb`), installed with dpkg into a
//! scratch root: no container, no chroot, nothing on the host touched. The package has no
//! maintainer scripts, so `dpkg --root` needs no shell inside the root.
//!
//! Checks what an admin would: dpkg installs and removes it cleanly, the installed binary
//! runs and validates the shipped example, `man appliance-reconcile` renders, bash completes
//! `appliance rec` to `reconcile`, and the systemd unit's hardening scores as systemd rates it.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn sh(script: &str) -> std::process::Output {
    Command::new("bash").arg("-c").arg(script).output().unwrap()
}

fn ok(script: &str) -> String {
    let o = sh(script);
    assert!(o.status.success(), "{script}:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_debian_package_installs_into_a_scratch_root_with_man_pages_completions_and_a_hardened_unit()
{
    if !root_or_skip("package_deb") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ap-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    let o = Command::new(repo("packaging/build-deb.sh"))
        .args(["--bin", BIN, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "build-deb.sh:\n{}", text(&o));
    let deb = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");
    let deb = deb.display();
    eprintln!(
        "package: {deb}, {} KiB",
        std::fs::metadata(deb.to_string()).unwrap().len() / 1024
    );
    let fields = ok(&format!(
        "dpkg-deb -f {deb} Package Version Architecture Depends"
    ));
    assert!(fields.contains("Package: appliance"), "{fields}");
    assert!(
        !fields.contains("Depends"),
        "a static binary depends on nothing: {fields}"
    );
    let files = ok(&format!("dpkg-deb -c {deb}"));
    for f in [
        "./usr/bin/appliance",
        "./usr/lib/systemd/system/appliance.service",
        "./usr/share/man/man1/appliance.1.gz",
        "./usr/share/man/man1/appliance-reconcile.1.gz",
        "./usr/share/bash-completion/completions/appliance",
        "./usr/share/zsh/vendor-completions/_appliance",
        "./usr/share/fish/vendor_completions.d/appliance.fish",
        "./usr/share/doc/appliance/config.kdl.example",
        "./usr/share/doc/appliance/grafana-dashboard.json",
    ] {
        assert!(files.contains(f), "{f} missing:\n{files}");
    }
    assert!(
        !ok(&format!("dpkg-deb --ctrl-tarfile {deb} | tar -t")).contains("inst"),
        "no maintainer scripts (installing must not start or restart the daemon)"
    );

    // dpkg into a scratch root.
    let root = dir.join("root");
    let r = root.display();
    ok(&format!(
        "mkdir -p {r}/var/lib/dpkg/info {r}/var/lib/dpkg/updates && touch {r}/var/lib/dpkg/status"
    ));
    ok(&format!("dpkg --root={r} --log=/dev/null -i {deb}"));
    let status = ok(&format!("dpkg --root={r} -s appliance"));
    assert!(status.contains("Status: install ok installed"), "{status}");

    // The installed binary runs, and checks the example it ships.
    let v = ok(&format!("{r}/usr/bin/appliance --version"));
    assert_eq!(v.trim(), format!("appliance {}", env!("CARGO_PKG_VERSION")));
    ok(&format!(
        "{r}/usr/bin/appliance check -c {r}/usr/share/doc/appliance/config.kdl.example"
    ));

    // man renders the pages from the package's man directory.
    let page = ok(&format!(
        "MANWIDTH=100 man --manpath={r}/usr/share/man appliance-reconcile 2>/dev/null"
    ));
    assert!(
        page.contains("appliance-reconcile") && page.contains("--dry-run"),
        "{page}"
    );
    let top = ok(&format!(
        "MANWIDTH=100 man --manpath={r}/usr/share/man appliance 2>/dev/null"
    ));
    assert!(
        top.contains("SUBCOMMANDS") || top.contains("reconcile"),
        "{top}"
    );

    // bash loads the completion and completes a subcommand and a flag.
    let complete = |line: &str| {
        let words: Vec<&str> = line.split(' ').collect();
        ok(&format!(
            "source {r}/usr/share/bash-completion/completions/appliance; \
             COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}; \
             _appliance appliance '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            words.join(" "),
            words.len() - 1,
            line.len(),
            words[words.len() - 1],
            words[words.len() - 2],
        ))
    };
    assert_eq!(complete("appliance rec").trim(), "reconcile");
    assert!(
        complete("appliance reconcile --dr").contains("--dry-run"),
        "flags complete too"
    );

    // The unit: systemd's own offline rating of its sandboxing, on the installed file.
    let unit = root.join("usr/lib/systemd/system/appliance.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/appliance run"), "{text}");
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let sec = sh(&format!(
            "systemd-analyze security --offline=yes --root={r} appliance.service 2>&1"
        ));
        let sec = String::from_utf8_lossy(&sec.stdout).into_owned();
        let score: f64 = sec
            .lines()
            .find_map(|l| l.split("appliance.service: ").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level:\n{sec}"));
        eprintln!("systemd-analyze security: exposure {score} (0 = fully sandboxed, 10 = none)");
        assert!(
            score <= 3.0,
            "the unit's sandboxing slipped: {score}\n{sec}"
        );
    }

    // And it leaves cleanly.
    ok(&format!("dpkg --root={r} --log=/dev/null -r appliance"));
    let left = ok(&format!("find {r} -path {r}/var -prune -o -type f -print"));
    assert!(left.is_empty(), "left behind:\n{left}");
    let _ = std::fs::remove_dir_all(&dir);
}
