//! `appliance workload-exec SPEC`: start the workload in namespaces of its own. The image's
//! PID 1 spawns this as a fresh, single-threaded process (so fork and unshare are safe), after
//! putting it in the workload's cgroup.
//!
//! ```text
//! helper (host root)   unshare(mnt, uts, ipc, cgroup) → overlay root on state → /dev, /sys (ro),
//!                      NFS binds → pivot_root → host name → unshare(pid) → fork ─┐
//!   └ ns-init (pid 1)  mount /proc → unshare(user) ⇄ helper writes uid/gid maps    │
//!                      → setresuid(0) inside (host uid 100000) → fork ──────────┐  │
//!       └ job           the image's user → exec the command                       │  │
//! ```
//! The network namespace is the node's: the job's packets leave with the node's site address
//! through the tunnels. Its root is root only inside its user namespace, which owns none of
//! the node's namespaces: it cannot change links, routes or sysctls, load modules, or pass
//! the control socket's root check (SO_PEERCRED shows uid 100000). The node's `state` is not in
//! its mount namespace at all.
//!
//! Signals: the helper and the ns-init block TERM/INT/HUP/QUIT/USR1/USR2 and CHLD and take
//! them with sigwait: the helper forwards to the ns-init, the ns-init to the job; each exits
//! with its child's status.

use super::unpack::{ID_RANGE, ROOT_HOST_ID};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// The unpacked image (the overlay's lower layer, never written).
    pub rootfs: PathBuf,
    /// Fresh at every start: the overlay's upper and work directories and the merged root.
    pub scratch: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// uid, gid inside the workload (the image's `User`); None: root.
    pub user: Option<(u32, u32)>,
    pub hostname: String,
    /// (host path, path inside, read-only): the NFS mounts.
    pub binds: Vec<(PathBuf, String, bool)>,
}

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let s = src.map(c);
    let t = c(&target.to_string_lossy());
    let f = fstype.map(c);
    let d = data.map(c);
    // SAFETY: every pointer is a live NUL-terminated string or null for the call's duration.
    let rc = unsafe {
        libc::mount(
            s.as_ref().map_or(std::ptr::null(), |x| x.as_ptr()),
            t.as_ptr(),
            f.as_ref().map_or(std::ptr::null(), |x| x.as_ptr()),
            flags,
            d.as_ref().map_or(std::ptr::null(), |x| x.as_ptr().cast()),
        )
    };
    if rc < 0 {
        return Err(errno(&format!(
            "mount {} on {}",
            src.unwrap_or("-"),
            target.display()
        )));
    }
    Ok(())
}

fn unshare(flags: libc::c_int, what: &str) -> Result<(), String> {
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(flags) } < 0 {
        return Err(errno(what));
    }
    Ok(())
}

/// The signals the helper and the ns-init take with sigwait (blocked everywhere but the job).
fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGCHLD,
        ] {
            libc::sigaddset(&mut s, sig);
        }
        s
    }
}

fn block(set: &libc::sigset_t, how: libc::c_int) {
    // SAFETY: a valid set; the old mask is not needed.
    unsafe { libc::sigprocmask(how, set, std::ptr::null_mut()) };
}

/// Wait for `child` while forwarding signals to it; returns its exit code (128+signal when
/// killed), after reaping every other child that ends meanwhile.
fn forward_until_exit(child: libc::pid_t, set: &libc::sigset_t) -> i32 {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: a valid set and an out-parameter.
        if unsafe { libc::sigwait(set, &mut sig) } != 0 {
            continue;
        }
        if sig != libc::SIGCHLD {
            // SAFETY: kill with a pid we forked.
            unsafe { libc::kill(child, sig) };
            continue;
        }
        loop {
            let mut status = 0;
            // SAFETY: waitpid with an out-parameter.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == child {
                if libc::WIFEXITED(status) {
                    return libc::WEXITSTATUS(status);
                }
                if libc::WIFSIGNALED(status) {
                    return 128 + libc::WTERMSIG(status);
                }
            }
        }
    }
}

/// Write `s` to `rel` under the directory `dir` (one write: id maps take one).
fn write_at(dir: &std::fs::File, rel: &str, s: &str) -> Result<(), String> {
    use std::os::fd::AsFd as _;
    let fd = nix::fcntl::openat(
        dir.as_fd(),
        rel,
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("/proc/{rel}: {e}"))?;
    nix::unistd::write(&fd, s.as_bytes()).map_err(|e| format!("/proc/{rel}: {e}"))?;
    Ok(())
}

/// Prepare the root (in the helper, as host root, in the new mount namespace) and return the
/// merged directory.
fn prepare_root(spec: &Spec) -> Result<PathBuf, String> {
    let e = |what: &str, err: std::io::Error| format!("{what}: {err}");
    // Nothing we mount here propagates back to the node.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let _ = std::fs::remove_dir_all(&spec.scratch);
    let (upper, work, merged) = (
        spec.scratch.join("upper"),
        spec.scratch.join("work"),
        spec.scratch.join("merged"),
    );
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).map_err(|x| e(&d.to_string_lossy(), x))?;
    }
    std::os::unix::fs::chown(&upper, Some(ROOT_HOST_ID), Some(ROOT_HOST_ID))
        .map_err(|x| e("upper", x))?;
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        spec.rootfs.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        libc::MS_NODEV,
        Some(&opts),
    )?;
    // /dev: a small tmpfs with the nodes a job needs, bound from the node's /dev.
    let dev = super::unpack::resolve_dir_in_root(&merged, "dev").map_err(|x| e("/dev", x))?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )?;
    for n in ["null", "zero", "full", "random", "urandom", "tty"] {
        let t = dev.join(n);
        std::fs::write(&t, b"").map_err(|x| e(&t.to_string_lossy(), x))?;
        mount(Some(&format!("/dev/{n}")), &t, None, libc::MS_BIND, None)?;
    }
    for d in ["pts", "shm", "mqueue"] {
        std::fs::create_dir(dev.join(d)).map_err(|x| e(d, x))?;
    }
    mount(
        Some("devpts"),
        &dev.join("pts"),
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    )?;
    mount(
        Some("shm"),
        &dev.join("shm"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777,size=50%"),
    )?;
    for (l, t) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(t, dev.join(l)).map_err(|x| e(l, x))?;
    }
    // /sys read-only (the node's network namespace is shared, so its sysfs view is right).
    let sys = super::unpack::resolve_dir_in_root(&merged, "sys").map_err(|x| e("/sys", x))?;
    mount(Some("/sys"), &sys, None, libc::MS_BIND | libc::MS_REC, None)?;
    mount(
        None,
        &sys,
        None,
        libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
    )?;
    super::unpack::resolve_dir_in_root(&merged, "proc").map_err(|x| e("/proc", x))?;
    // The site's NFS mounts at the site's own paths (resolved inside the root: an image's
    // symlink cannot send a mount onto the node's own directories).
    for (host, inside, ro) in &spec.binds {
        let t = super::unpack::resolve_dir_in_root(&merged, inside.trim_start_matches('/'))
            .map_err(|x| e(inside, x))?;
        mount(
            Some(&host.to_string_lossy()),
            &t,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
        if *ro {
            mount(
                None,
                &t,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                None,
            )?;
        }
    }
    Ok(merged)
}

fn pivot(merged: &Path) -> Result<(), String> {
    std::env::set_current_dir(merged).map_err(|e| format!("chdir {}: {e}", merged.display()))?;
    let dot = c(".");
    // SAFETY: pivot_root has no libc wrapper; both arguments are valid C strings. The old root
    // stacks under the new one at "." and is detached next.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } < 0 {
        return Err(errno("pivot_root"));
    }
    // SAFETY: a valid C string.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } < 0 {
        return Err(errno("detaching the node's root"));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))
}

/// Run the workload; returns the exit code to exit with.
pub fn exec(spec: &Spec) -> Result<i32, String> {
    let set = signal_set();
    block(&set, libc::SIG_BLOCK);
    unshare(
        libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWCGROUP,
        "unshare(mount, uts, ipc, cgroup)",
    )?;
    let merged = prepare_root(spec)?;
    // The node's /proc, kept open (close-on-exec) to write the ns-init's id maps once the old
    // root is detached; the ns-init closes its copy at once.
    let host_proc = std::fs::File::open("/proc").map_err(|e| format!("/proc: {e}"))?;
    pivot(&merged)?;
    crate::image::sys::sethostname(&spec.hostname)?;
    unshare(libc::CLONE_NEWPID, "unshare(pid)")?;
    // Two pipes: the ns-init says "my user namespace exists", the helper says "mapped".
    let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (mapped_r, mapped_w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: this process is single-threaded (a fresh exec of the binary), so the child may
    // run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(errno("fork"));
    }
    if pid == 0 {
        drop(host_proc);
        drop(ready_r);
        drop(mapped_w);
        let code = match ns_init(spec, &set, ready_w, mapped_r) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("workload: {e}");
                127
            }
        };
        std::process::exit(code);
    }
    drop(ready_w);
    drop(mapped_r);
    let mut b = [0u8; 1];
    let n = nix::unistd::read(&ready_r, &mut b)
        .map_err(|e| format!("waiting for the workload's user namespace: {e}"))?;
    if n != 1 {
        return Ok(forward_until_exit(pid, &set));
    }
    let map = format!("0 {ROOT_HOST_ID} 1\n1 1 {}\n", ID_RANGE - 1);
    for f in ["uid_map", "gid_map"] {
        write_at(&host_proc, &format!("{pid}/{f}"), &map)?;
    }
    nix::unistd::write(&mapped_w, b"m").map_err(|e| format!("signalling the workload: {e}"))?;
    drop(mapped_w);
    Ok(forward_until_exit(pid, &set))
}

/// PID 1 of the workload's PID namespace.
fn ns_init(
    spec: &Spec,
    set: &libc::sigset_t,
    ready: std::os::fd::OwnedFd,
    mapped: std::os::fd::OwnedFd,
) -> Result<i32, String> {
    mount(
        Some("proc"),
        Path::new("/proc"),
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    unshare(libc::CLONE_NEWUSER, "unshare(user)")?;
    nix::unistd::write(&ready, b"r").map_err(|e| format!("ready: {e}"))?;
    let mut b = [0u8; 1];
    if nix::unistd::read(&mapped, &mut b).map_err(|e| format!("mapped: {e}"))? != 1 {
        return Err("the helper did not map the user namespace".into());
    }
    drop(ready);
    drop(mapped);
    // SAFETY: plain credential system calls on this single-threaded process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) < 0
            || libc::setresgid(0, 0, 0) < 0
            || libc::setresuid(0, 0, 0) < 0
        {
            return Err(errno("becoming root in the user namespace"));
        }
    }
    let argv: Vec<CString> = spec.argv.iter().map(|a| c(a)).collect();
    if argv.is_empty() {
        return Err("the image and the site file give no command".into());
    }
    let env: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| c(&format!("{k}={v}")))
        .collect();
    let path = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let program = if spec.argv[0].contains('/') {
        spec.argv[0].clone()
    } else {
        path.split(':')
            .map(|d| format!("{d}/{}", spec.argv[0]))
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()))
            .ok_or_else(|| format!("{}: not found in PATH {path}", spec.argv[0]))?
    };
    // SAFETY: single-threaded; the child only calls async-signal-safe functions and exec.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(errno("fork"));
    }
    if pid == 0 {
        job(spec, set, &c(&program), &argv, &env);
    }
    Ok(forward_until_exit(pid, set))
}

/// The job: the image's user, its working directory, its command. Never returns.
fn job(
    spec: &Spec,
    set: &libc::sigset_t,
    program: &CString,
    argv: &[CString],
    env: &[CString],
) -> ! {
    block(set, libc::SIG_UNBLOCK);
    // SAFETY: a new session so the job owns its process group; credential calls and chdir on
    // valid arguments; execve with NULL-terminated pointer arrays built from live CStrings.
    unsafe {
        libc::setsid();
        if let Some((uid, gid)) = spec.user {
            if libc::setresgid(gid, gid, gid) < 0 || libc::setresuid(uid, uid, uid) < 0 {
                libc::_exit(126);
            }
        }
        let cwd = c(spec.cwd.as_deref().unwrap_or("/"));
        if libc::chdir(cwd.as_ptr()) < 0 {
            let root = c("/");
            libc::chdir(root.as_ptr());
        }
        let mut a: Vec<*const libc::c_char> = argv.iter().map(|x| x.as_ptr()).collect();
        a.push(std::ptr::null());
        let mut e: Vec<*const libc::c_char> = env.iter().map(|x| x.as_ptr()).collect();
        e.push(std::ptr::null());
        libc::execve(program.as_ptr(), a.as_ptr(), e.as_ptr());
        let msg = b"workload: exec failed\n";
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// The workload's ns-init: the helper's only child.
pub fn ns_init_of(helper: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{helper}/task/{helper}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Run `argv` inside the running workload (its namespaces, its root user, its environment):
/// the drain command. Returns its exit code.
pub fn join_exec(ns_init: i32, argv: &[String], env: &[(String, String)]) -> Result<i32, String> {
    use std::os::fd::AsRawFd as _;
    if argv.is_empty() {
        return Err("no command".into());
    }
    // Open every namespace first: after joining the mount namespace this /proc is gone.
    let mut fds = Vec::new();
    for ns in ["ipc", "uts", "cgroup", "pid", "mnt", "user"] {
        let p = format!("/proc/{ns_init}/ns/{ns}");
        fds.push((
            ns,
            std::fs::File::open(&p).map_err(|e| format!("{p}: {e}"))?,
        ));
    }
    for (ns, f) in &fds {
        // SAFETY: setns on a namespace file we hold open; flags 0 accept any type.
        if unsafe { libc::setns(f.as_raw_fd(), 0) } < 0 {
            return Err(errno(&format!("joining the workload's {ns} namespace")));
        }
    }
    drop(fds);
    // SAFETY: credential calls on this single-threaded process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) < 0
            || libc::setresgid(0, 0, 0) < 0
            || libc::setresuid(0, 0, 0) < 0
        {
            return Err(errno("becoming root in the workload's user namespace"));
        }
    }
    let set = signal_set();
    block(&set, libc::SIG_BLOCK);
    let spec = Spec {
        rootfs: PathBuf::new(),
        scratch: PathBuf::new(),
        argv: argv.to_vec(),
        env: env.to_vec(),
        cwd: None,
        user: None,
        hostname: String::new(),
        binds: Vec::new(),
    };
    let cargv: Vec<CString> = argv.iter().map(|a| c(a)).collect();
    let cenv: Vec<CString> = env.iter().map(|(k, v)| c(&format!("{k}={v}"))).collect();
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let program = if argv[0].contains('/') {
        argv[0].clone()
    } else {
        path.split(':')
            .map(|d| format!("{d}/{}", argv[0]))
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()))
            .ok_or_else(|| format!("{}: not found in PATH {path}", argv[0]))?
    };
    // SAFETY: single-threaded; the child only execs (joining the PID namespace takes effect
    // for children).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(errno("fork"));
    }
    if pid == 0 {
        job(&spec, &set, &c(&program), &cargv, &cenv);
    }
    Ok(forward_until_exit(pid, &set))
}
