//! The health check: an ICMP echo to an address behind the tunnels (typically a gateway's
//! site address), named by `health-check` in the user-data's `appliance` block. The image has
//! no shell and no ping: this is how its console shows the tunnels carry traffic, and what
//! marks a freshly installed slot good. Echo encoding is pure and tested; [`ping`] uses a raw
//! socket (PID 1 is root).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

/// RFC 1071 checksum.
pub fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request (type 8) with identifier, sequence and a payload.
pub fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut b = vec![8, 0, 0, 0];
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(b"appliance health check..........");
    let c = checksum(&b);
    b[2..4].copy_from_slice(&c.to_be_bytes());
    b
}

/// Is `packet` (an IPv4 datagram as a raw socket returns it) an echo reply to (id, seq) from
/// `from`?
pub fn is_reply(packet: &[u8], from: Ipv4Addr, id: u16, seq: u16) -> bool {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 1 {
        return false;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let icmp = &packet[ihl.min(packet.len())..];
    icmp.len() >= 8
        && src == from
        && icmp[0] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
        && checksum(icmp) == 0
}

/// Send one echo request to `target` and wait up to `timeout` for its reply.
pub fn ping(target: Ipv4Addr, seq: u16, timeout: Duration) -> Result<Duration, String> {
    // SAFETY: plain socket(2); owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(format!(
            "raw ICMP socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is ours alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let id = (std::process::id() & 0xffff) as u16;
    let req = echo_request(id, seq);
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(target).to_be(),
        },
        sin_zero: [0; 8],
    };
    let sent = Instant::now();
    // SAFETY: buffer and address are valid for the call.
    let rc = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc < 0 {
        return Err(format!("{target}: {}", std::io::Error::last_os_error()));
    }
    let mut buf = [0u8; 1500];
    loop {
        let left = timeout.saturating_sub(sent.elapsed());
        if left.is_zero() {
            return Err(format!(
                "{target}: no echo reply within {} ms",
                timeout.as_millis()
            ));
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
            continue;
        }
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 && is_reply(&buf[..n as usize], target, id, seq) {
            return Ok(sent.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_request_carries_a_valid_checksum() {
        let r = echo_request(0x1234, 7);
        assert_eq!((r[0], r[1]), (8, 0));
        assert_eq!(checksum(&r), 0);
    }

    #[test]
    fn only_the_matching_reply_from_the_target_counts() {
        let mut icmp = echo_request(0x1234, 7);
        icmp[0] = 0;
        icmp[2..4].copy_from_slice(&[0, 0]);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 10, 0, 2, 10, 200, 0, 11,
        ];
        ip.extend_from_slice(&icmp);
        let gw = Ipv4Addr::new(10, 10, 0, 2);
        assert!(is_reply(&ip, gw, 0x1234, 7));
        assert!(!is_reply(&ip, gw, 0x1234, 8));
        assert!(!is_reply(&ip, Ipv4Addr::new(10, 10, 0, 3), 0x1234, 7));
        let mut req = ip.clone();
        req[20] = 8;
        assert!(
            !is_reply(&req, gw, 0x1234, 7),
            "our own request is not a reply"
        );
    }
}
