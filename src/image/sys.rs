//! Thin system-call wrappers for init: mounts, modules, the console, switch_root. Each returns
//! an error string naming what failed and why.

use std::ffi::CString;
use std::os::fd::AsRawFd as _;

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in paths")
}

fn os_err() -> String {
    std::io::Error::last_os_error().to_string()
}

pub fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let (s, t, f, d) = (cstr(src), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                f.as_ptr()
            },
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                d.as_ptr().cast()
            },
        )
    };
    if rc < 0 {
        return Err(format!("mount {src} on {target} ({fstype}): {}", os_err()));
    }
    Ok(())
}

/// Mount a pseudo filesystem unless something is mounted there already.
pub fn mount_fresh(
    fstype: &str,
    target: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    match mount(fstype, target, fstype, flags, data) {
        Err(_) if is_mountpoint(target) => Ok(()),
        r => r,
    }
}

fn is_mountpoint(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(path)))
        .unwrap_or(false)
}

pub fn umount(target: &str) {
    let t = cstr(target);
    // SAFETY: valid C string.
    unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
}

/// The first `len` bytes of a device (fewer if it is smaller).
pub fn read_head(dev: &str, len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut b = Vec::with_capacity(len);
    std::fs::File::open(dev)?
        .take(len as u64)
        .read_to_end(&mut b)?;
    Ok(b)
}

/// Load one kernel module file. Already loaded is fine.
pub fn load_module(path: &str) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let params = cstr("");
    // SAFETY: finit_module(fd, params, flags) with a valid fd and C string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(format!("{path}: {e}"));
    }
    Ok(())
}

/// Make fds 0, 1 and 2 the console when the kernel did not give us one (an initramfs without
/// /dev/console).
pub fn console() {
    // SAFETY: fcntl on fd 0 only queries it.
    if unsafe { libc::fcntl(0, libc::F_GETFD) } >= 0 {
        return;
    }
    let Ok(c) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors.
        unsafe { libc::dup2(c.as_raw_fd(), fd) };
    }
}

pub fn sethostname(name: &str) -> Result<(), String> {
    // SAFETY: pointer and length of a live byte slice.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc < 0 {
        return Err(format!("sethostname {name}: {}", os_err()));
    }
    Ok(())
}

/// Move the mounts we made into `new`, make it `/`, and exec `argv` there.
pub fn switch_root(new: &str, argv: &[&str]) -> Result<std::convert::Infallible, String> {
    for m in ["/dev", "/proc", "/sys"] {
        mount(m, &format!("{new}{m}"), "", libc::MS_MOVE, "")?;
    }
    // Free the initramfs: it stays in memory unless its files are deleted.
    for entry in ["/init", "/lib", "/etc"] {
        let p = std::path::Path::new(entry);
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
    }
    std::env::set_current_dir(new).map_err(|e| format!("chdir {new}: {e}"))?;
    mount(".", "/", "", libc::MS_MOVE, "")?;
    let dot = cstr(".");
    // SAFETY: valid C string.
    if unsafe { libc::chroot(dot.as_ptr()) } < 0 {
        return Err(format!("chroot {new}: {}", os_err()));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    exec(argv)
}

pub fn exec(argv: &[&str]) -> Result<std::convert::Infallible, String> {
    let args: Vec<CString> = argv.iter().map(|a| cstr(a)).collect();
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: argv is a NULL-terminated array of valid C strings.
    unsafe { libc::execv(ptrs[0], ptrs.as_ptr()) };
    Err(format!("exec {}: {}", argv[0], os_err()))
}

/// Never return: PID 1 must not exit (the kernel would panic and hide the reason).
pub fn halt_forever() -> ! {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
