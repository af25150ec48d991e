//! The health check: an ICMP echo to an address behind the tunnels (typically a gateway's
//! site address), named by `health-check` in the user-data's `appliance` block. The image has
//! no shell and no ping: this is how its console shows the tunnels carry traffic, and what
//! marks a freshly installed slot good. Echo encoding is pure and tested; [`ping`] uses a raw
//! socket (PID 1 is root). Each ping has a random identifier and nonce, and only a reply that
//! arrives on a tunnel device counts (IP_PKTINFO names the interface).

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

/// One echo's identity: a random identifier and nonce per ping (PID 1's pid, the old
/// identifier, is always 1), so nobody off the tunnels can answer for the target by guessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub id: u16,
    pub seq: u16,
    pub nonce: [u8; 16],
}

impl Probe {
    pub fn random(seq: u16) -> Probe {
        use rand_core::RngCore as _;
        let mut b = [0u8; 18];
        rand_core::OsRng.fill_bytes(&mut b);
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&b[2..]);
        Probe {
            id: u16::from_be_bytes([b[0], b[1]]),
            seq,
            nonce,
        }
    }
}

const TAG: &[u8] = b"appliance health";

/// An ICMP echo request (type 8): identifier, sequence, and a payload carrying the nonce.
pub fn echo_request(p: &Probe) -> Vec<u8> {
    let mut b = vec![8, 0, 0, 0];
    b.extend_from_slice(&p.id.to_be_bytes());
    b.extend_from_slice(&p.seq.to_be_bytes());
    b.extend_from_slice(TAG);
    b.extend_from_slice(&p.nonce);
    let c = checksum(&b);
    b[2..4].copy_from_slice(&c.to_be_bytes());
    b
}

/// Is `packet` (an IPv4 datagram as a raw socket returns it) the echo reply to `p` from `from`
/// (identifier, sequence and nonce echoed back)?
pub fn is_reply(packet: &[u8], from: Ipv4Addr, p: &Probe) -> bool {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 1 {
        return false;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let icmp = &packet[ihl.min(packet.len())..];
    icmp.len() >= 8 + TAG.len() + p.nonce.len()
        && src == from
        && icmp[0] == 0
        && icmp[4..6] == p.id.to_be_bytes()
        && icmp[6..8] == p.seq.to_be_bytes()
        && icmp[8..8 + TAG.len()] == *TAG
        && icmp[8 + TAG.len()..8 + TAG.len() + 16] == p.nonce
        && checksum(icmp) == 0
}

/// Only a reply that came in through a tunnel device counts: the health check is there to show
/// the tunnels carry traffic, and a reply on the underlay (forged, or routed around them) does
/// not show that.
pub fn through_a_tunnel(ifname: &str) -> bool {
    ifname.starts_with(crate::intent::state::LINK_PREFIX)
        && ifname != crate::intent::state::ADDRESS_DEVICE
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
    let probe = Probe::random(seq);
    let req = echo_request(&probe);
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Ipv4PacketInfo, &true)
        .map_err(|e| format!("IP_PKTINFO: {e}"))?;
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
        let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let Ok(m) = nix::sys::socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) else {
            continue;
        };
        let via = m.cmsgs().ok().and_then(|mut c| {
            c.find_map(|c| match c {
                nix::sys::socket::ControlMessageOwned::Ipv4PacketInfo(pi) => {
                    nix::net::if_::if_indextoname(pi.ipi_ifindex as u32).ok()
                }
                _ => None,
            })
        });
        let n = m.bytes;
        let through = via
            .as_ref()
            .is_some_and(|v| through_a_tunnel(&v.to_string_lossy()));
        if through && is_reply(&buf[..n], target, &probe) {
            return Ok(sent.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_request_carries_a_valid_checksum_and_fresh_identity() {
        let p = Probe::random(7);
        let r = echo_request(&p);
        assert_eq!((r[0], r[1]), (8, 0));
        assert_eq!(checksum(&r), 0);
        let q = Probe::random(7);
        assert_ne!((p.id, p.nonce), (q.id, q.nonce), "each ping is new");
    }

    fn reply_to(p: &Probe) -> Vec<u8> {
        let mut icmp = echo_request(p);
        icmp[0] = 0;
        icmp[2..4].copy_from_slice(&[0, 0]);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 10, 0, 2, 10, 200, 0, 11,
        ];
        ip.extend_from_slice(&icmp);
        ip
    }

    #[test]
    fn only_the_matching_reply_from_the_target_counts() {
        let p = Probe::random(7);
        let ip = reply_to(&p);
        let gw = Ipv4Addr::new(10, 10, 0, 2);
        assert!(is_reply(&ip, gw, &p));
        assert!(!is_reply(&ip, gw, &Probe { seq: 8, ..p }));
        assert!(!is_reply(&ip, Ipv4Addr::new(10, 10, 0, 3), &p));
        let mut req = ip.clone();
        req[20] = 8;
        assert!(!is_reply(&req, gw, &p), "our own request is not a reply");
    }

    /// A forger on the cloud network who knows the old fixed identifier (PID 1: 1) and can
    /// count sequence numbers no longer answers for the target: the nonce is not guessable, and
    /// a reply must come in through a tunnel.
    #[test]
    fn a_forged_reply_with_the_right_id_and_seq_but_no_nonce_does_not_count() {
        let p = Probe::random(3);
        let forged = reply_to(&Probe {
            nonce: [0; 16],
            ..p
        });
        assert!(!is_reply(&forged, Ipv4Addr::new(10, 10, 0, 2), &p));
        assert!(through_a_tunnel("ap-gw1-0"));
        assert!(!through_a_tunnel("eth0"));
        assert!(
            !through_a_tunnel("ap-lo"),
            "our own address device is not a tunnel"
        );
    }
}
