//! Persistent tun devices (kernel edge).
//!
//! The reconcile creates tunnel devices persistent and without a queue attached: the kernel
//! keeps them with no carrier until the datapath daemon attaches (same name, same flags; see
//! `datapath::attach_offload`), and
//! drops the carrier again when the daemon exits or crashes. rtnetlink cannot create tun
//! devices (the kernel answers "Operation not supported"), so this is the classic
//! `/dev/net/tun` + `TUNSETIFF` + `TUNSETPERSIST`, as `ip tuntap add` does.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// Flags every tunnel device is created with; the datapath must attach with the same
/// `IFF_MULTI_QUEUE` setting (the kernel refuses a mismatch).
pub const TUN_FLAGS: libc::c_short =
    (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE) as libc::c_short;

/// Created without carrier: otherwise the device has carrier until the kernel's linkwatch
/// notices the creating fd is gone (up to a second), and routes through it are briefly live
/// with no datapath behind them. The datapath attaches without this flag, which turns the
/// carrier on.
const CREATE_FLAGS: libc::c_short = TUN_FLAGS | libc::IFF_NO_CARRIER as libc::c_short;

fn ifreq(name: &str, flags: libc::c_short) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad device name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags;
    Ok(req)
}

/// Create (or re-open) tun device `name` and mark it persistent.
pub fn create_persistent(name: &str) -> io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = ifreq(name, CREATE_FLAGS)?;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
