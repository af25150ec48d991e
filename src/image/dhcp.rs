//! A minimal DHCPv4 client (RFC 2131): DISCOVER → OFFER → REQUEST → ACK on one interface,
//! enough for a cloud VM's underlay address and the route to the metadata service. The codec is
//! pure and tested; [`lease`] does the socket work.
//!
//! Written here rather than taken from a crate: the maintained codec (dhcproto) pulls in
//! hickory-proto and the ICU stack for domain names, which this image never needs.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

const MAGIC: [u8; 4] = [99, 130, 83, 99];
const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;

/// What the server granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub server: Ipv4Addr,
    pub routers: Vec<Ipv4Addr>,
    /// Option 121 (RFC 3442): when present, the routers option is ignored.
    pub classless_routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
    pub mtu: Option<u16>,
    pub lease_secs: u32,
}

/// A client message. `request` carries (requested address, server id) for a REQUEST.
pub fn encode(xid: u32, mac: [u8; 6], request: Option<(Ipv4Addr, Ipv4Addr)>) -> Vec<u8> {
    let mut b = vec![0u8; 236];
    b[0] = 1; // BOOTREQUEST
    b[1] = 1; // Ethernet
    b[2] = 6;
    b[4..8].copy_from_slice(&xid.to_be_bytes());
    b[10..12].copy_from_slice(&0x8000u16.to_be_bytes()); // broadcast replies: we have no address yet
    b[28..34].copy_from_slice(&mac);
    b.extend_from_slice(&MAGIC);
    match request {
        None => b.extend_from_slice(&[53, 1, DISCOVER]),
        Some((addr, server)) => {
            b.extend_from_slice(&[53, 1, REQUEST, 50, 4]);
            b.extend_from_slice(&addr.octets());
            b.extend_from_slice(&[54, 4]);
            b.extend_from_slice(&server.octets());
        }
    }
    // Parameter request: mask, router, MTU, lease time, classless static routes.
    b.extend_from_slice(&[55, 5, 1, 3, 26, 51, 121, 255]);
    b
}

/// A server reply to our `xid`: (message type, lease). None for anything else.
pub fn decode(b: &[u8], xid: u32) -> Option<(u8, Lease)> {
    if b.len() < 240 || b[0] != 2 || b[4..8] != xid.to_be_bytes() || b[236..240] != MAGIC {
        return None;
    }
    let mut lease = Lease {
        address: Ipv4Addr::new(b[16], b[17], b[18], b[19]),
        prefix_len: 24,
        server: Ipv4Addr::new(b[20], b[21], b[22], b[23]),
        routers: Vec::new(),
        classless_routes: Vec::new(),
        mtu: None,
        lease_secs: 3600,
    };
    let mut kind = None;
    let mut i = 240;
    while i < b.len() {
        let code = b[i];
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let len = *b.get(i + 1)? as usize;
        let v = b.get(i + 2..i + 2 + len)?;
        let ip = |o: usize| Ipv4Addr::new(v[o], v[o + 1], v[o + 2], v[o + 3]);
        match (code, len) {
            (53, 1) => kind = Some(v[0]),
            (1, 4) => lease.prefix_len = u32::from(ip(0)).leading_ones() as u8,
            (3, l) if l % 4 == 0 => lease.routers = (0..l / 4).map(|k| ip(4 * k)).collect(),
            (54, 4) => lease.server = ip(0),
            (51, 4) => lease.lease_secs = u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
            (26, 2) => lease.mtu = Some(u16::from_be_bytes([v[0], v[1]])),
            (121, _) => lease.classless_routes = classless(v)?,
            _ => {}
        }
        i += 2 + len;
    }
    Some((kind?, lease))
}

/// RFC 3442: width, the significant octets of the destination, then the router.
fn classless(mut v: &[u8]) -> Option<Vec<(Ipv4Addr, u8, Ipv4Addr)>> {
    let mut out = Vec::new();
    while let Some(&width) = v.first() {
        if width > 32 {
            return None;
        }
        let n = (width as usize).div_ceil(8);
        let dest = v.get(1..1 + n)?;
        let router = v.get(1 + n..5 + n)?;
        let mut d = [0u8; 4];
        d[..n].copy_from_slice(dest);
        out.push((
            Ipv4Addr::from(d),
            width,
            Ipv4Addr::new(router[0], router[1], router[2], router[3]),
        ));
        v = &v[5 + n..];
    }
    Some(out)
}

fn sockopt(fd: i32, level: i32, name: i32, val: &[u8]) -> std::io::Result<()> {
    // SAFETY: val outlives the call; the kernel copies it.
    let rc = unsafe { libc::setsockopt(fd, level, name, val.as_ptr().cast(), val.len() as u32) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A UDP socket on port 68 bound to `ifname`, allowed to broadcast.
fn client_socket(ifname: &str) -> std::io::Result<UdpSocket> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let one = 1i32.to_ne_bytes();
    sockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)?;
    sockopt(fd, libc::SOL_SOCKET, libc::SO_BROADCAST, &one)?;
    sockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_BINDTODEVICE,
        ifname.as_bytes(),
    )?;
    let sock = UdpSocket::from(owned);
    // std binds through the owned socket: convert address by hand.
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 68u16.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: addr is a valid sockaddr_in for the call's duration.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

fn exchange(
    sock: &UdpSocket,
    msg: &[u8],
    xid: u32,
    want: &[u8],
    deadline: Instant,
) -> std::io::Result<Option<(u8, Lease)>> {
    let server = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let mut buf = [0u8; 1500];
    let mut next_send = Instant::now();
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        if now >= next_send {
            sock.send_to(msg, server)?;
            next_send = now + Duration::from_secs(2);
        }
        sock.set_read_timeout(Some(
            (next_send.min(deadline) - now).max(Duration::from_millis(10)),
        ))?;
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                if let Some((kind, lease)) = decode(&buf[..n], xid) {
                    if want.contains(&kind) {
                        return Ok(Some((kind, lease)));
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Obtain a lease on `ifname` (which must be up), or None when no server answered in time.
pub fn lease(ifname: &str, mac: [u8; 6], timeout: Duration) -> std::io::Result<Option<Lease>> {
    let sock = client_socket(ifname)?;
    let deadline = Instant::now() + timeout;
    let xid = rand_core::RngCore::next_u32(&mut rand_core::OsRng);
    let Some((_, offer)) = exchange(&sock, &encode(xid, mac, None), xid, &[OFFER], deadline)?
    else {
        return Ok(None);
    };
    let req = encode(xid, mac, Some((offer.address, offer.server)));
    match exchange(&sock, &req, xid, &[ACK, NAK], deadline)? {
        Some((ACK, lease)) => Ok(Some(lease)),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(xid: u32, kind: u8, extra: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 236];
        b[0] = 2;
        b[4..8].copy_from_slice(&xid.to_be_bytes());
        b[16..20].copy_from_slice(&[169, 254, 169, 15]);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&[
            53, 1, kind, 1, 4, 255, 255, 255, 0, 3, 4, 169, 254, 169, 2, 54, 4, 169, 254, 169, 2,
        ]);
        b.extend_from_slice(&[51, 4, 0, 1, 81, 128]);
        b.extend_from_slice(extra);
        b.push(255);
        b
    }

    #[test]
    fn a_discover_asks_for_broadcast_replies_and_the_routes_we_use() {
        let m = encode(7, [2, 0, 0, 0, 0, 1], None);
        assert_eq!(&m[4..8], &7u32.to_be_bytes());
        assert_eq!(&m[10..12], &[0x80, 0]);
        assert_eq!(&m[236..243], &[99, 130, 83, 99, 53, 1, DISCOVER]);
        assert!(m.windows(2).any(|w| w == [55, 5]));
    }

    #[test]
    fn a_request_names_the_offered_address_and_the_server() {
        let m = encode(
            7,
            [2; 6],
            Some((Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 1))),
        );
        assert!(m.windows(6).any(|w| w == [50, 4, 10, 0, 0, 5]));
        assert!(m.windows(6).any(|w| w == [54, 4, 10, 0, 0, 1]));
    }

    #[test]
    fn an_ack_gives_address_prefix_router_and_lease_time() {
        let (kind, l) = decode(&reply(9, ACK, &[26, 2, 5, 220]), 9).unwrap();
        assert_eq!(kind, ACK);
        assert_eq!(
            (l.address, l.prefix_len),
            (Ipv4Addr::new(169, 254, 169, 15), 24)
        );
        assert_eq!(l.routers, vec![Ipv4Addr::new(169, 254, 169, 2)]);
        assert_eq!(l.lease_secs, 86400);
        assert_eq!(l.mtu, Some(1500));
    }

    #[test]
    fn classless_static_routes_are_decoded() {
        // 169.254.169.254/32 via 10.0.0.1, default via 10.0.0.2.
        let opt = [121, 14, 32, 169, 254, 169, 254, 10, 0, 0, 1, 0, 10, 0, 0, 2];
        let (_, l) = decode(&reply(9, ACK, &opt), 9).unwrap();
        assert_eq!(
            l.classless_routes,
            vec![
                (
                    Ipv4Addr::new(169, 254, 169, 254),
                    32,
                    Ipv4Addr::new(10, 0, 0, 1)
                ),
                (Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(10, 0, 0, 2))
            ]
        );
    }

    #[test]
    fn replies_to_other_transactions_or_truncated_ones_are_ignored() {
        assert!(decode(&reply(9, ACK, &[]), 10).is_none());
        let r = reply(9, ACK, &[]);
        assert!(decode(&r[..200], 9).is_none());
        let bad = reply(9, ACK, &[121, 3, 40, 1, 2]);
        assert!(decode(&bad, 9).is_none());
    }
}
