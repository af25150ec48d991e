//! Orderly shutdown for PID 1: the ACPI power button (what `exo compute instance stop`, libvirt
//! `shutdown` and qemu's `system_powerdown` press), SIGTERM and SIGUSR2 power off; SIGINT
//! (Ctrl-Alt-Del, which the kernel hands to init once told to) reboots. The supervisor loop
//! polls [`requested`] and runs the sequence: stop the daemon, sync, remount state read-only,
//! then power off or reboot.

use super::say;
use std::io::Read as _;
use std::sync::atomic::{AtomicU8, Ordering};

/// What has been asked for: 0 nothing, 1 power off, 2 reboot.
static REQUEST: AtomicU8 = AtomicU8::new(0);
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    PowerOff,
    Reboot,
}

/// What was asked for, and what asked.
pub fn requested() -> Option<(Action, &'static str)> {
    match REQUEST.load(Ordering::SeqCst) {
        1 => Some((
            Action::PowerOff,
            "shutdown requested (power button or SIGTERM)",
        )),
        2 => Some((Action::Reboot, "reboot requested (Ctrl-Alt-Del)")),
        _ => None,
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    REQUEST.store(if sig == libc::SIGINT { 2 } else { 1 }, Ordering::SeqCst);
}

/// Is this `struct input_event` (x86_64: 16-byte timeval, type, code, value) a power-button
/// press?
pub fn is_power_press(ev: &[u8]) -> bool {
    ev.len() >= 24
        && u16::from_ne_bytes([ev[16], ev[17]]) == EV_KEY
        && u16::from_ne_bytes([ev[18], ev[19]]) == KEY_POWER
        && i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]) == 1
}

/// Install the signal handlers, let Ctrl-Alt-Del become SIGINT, and watch every input device
/// for the power button.
pub fn start() {
    // SAFETY: installing a handler that only stores to an atomic; reboot(CAD_OFF) takes no
    // pointer.
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGUSR2, libc::SIGINT] {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
        libc::reboot(libc::RB_DISABLE_CAD);
    }
    for e in std::fs::read_dir("/dev/input")
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = e.path();
        if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("event"))
        {
            continue;
        }
        let Ok(mut f) = std::fs::File::open(&path) else {
            continue;
        };
        let _ = std::thread::Builder::new()
            .name("power-button".into())
            .spawn(move || {
                let mut ev = [0u8; 24];
                while f.read_exact(&mut ev).is_ok() {
                    if is_power_press(&ev) {
                        REQUEST.store(1, Ordering::SeqCst);
                    }
                }
            });
    }
}

/// Stop `daemon` (SIGTERM, then SIGKILL after 10 s), sync, remount state read-only, and power
/// off or reboot. Never returns.
pub fn shutdown(action: Action, why: &str, daemon: Option<i32>) -> ! {
    say(&format!(
        "{why}: stopping appliance run, then {}",
        match action {
            Action::PowerOff => "powering off",
            Action::Reboot => "rebooting",
        }
    ));
    // The site's jobs first, while the tunnels still carry their NFS traffic.
    crate::workload::supervise::stop_for_shutdown();
    if let Some(pid) = daemon {
        // SAFETY: signalling and reaping our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let mut status = 0;
            // SAFETY: valid status pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid || r < 0 {
                say("appliance run stopped");
                break;
            }
            if std::time::Instant::now() > deadline {
                say("appliance run did not stop within 10 s: killing it");
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    // An install in progress holds files open on state: stop it, so state can go read-only.
    if !super::ab::cancel(std::time::Duration::from_secs(5)) {
        say("the install in progress did not stop within 5 s");
    }
    // SAFETY: sync takes nothing.
    unsafe { libc::sync() };
    let flags = libc::MS_REMOUNT | libc::MS_RDONLY;
    match super::sys::mount("none", super::STATE, "", flags, "") {
        Ok(()) => say("state remounted read-only"),
        Err(e) => say(&format!("state stays writable: {e}")),
    }
    // SAFETY: reboot(2) with a command constant.
    unsafe {
        libc::sync();
        libc::reboot(match action {
            Action::PowerOff => libc::RB_POWER_OFF,
            Action::Reboot => libc::RB_AUTOBOOT,
        });
    }
    super::sys::halt_forever()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> [u8; 24] {
        let mut e = [0u8; 24];
        e[16..18].copy_from_slice(&kind.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_power_key_press_asks_for_shutdown() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, 30, 1)), "another key");
        assert!(!is_power_press(&event(0, KEY_POWER, 1)), "a sync event");
    }
}
