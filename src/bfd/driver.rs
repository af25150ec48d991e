//! The BFD socket edge (RFC 5881, single hop, IPv4): one task that owns every session of a
//! gateway, receives on port 3784 (only packets that arrive with TTL 255), sends from one
//! source port in 49152–65535 with TTL 255, runs the sessions' timers, and reports each state
//! change on a channel. The decisions are [`super::session`]'s.

use super::packet::{Control, Diag, State};
use super::session::Session;
use super::{PORT, TTL};
use crate::intent::bgp::BfdSessions;
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrIn};
use serde::{Deserialize, Serialize};
use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::Interest;
use tokio::sync::mpsc;

/// One session as `appliance status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BfdStatus {
    pub peer: String,
    pub address: Ipv4Addr,
    pub state: String,
    pub diag: String,
    pub received: u64,
    pub discarded: u64,
}

pub type SharedBfd = Arc<Mutex<Vec<BfdStatus>>>;

/// A session went Up or left Up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub peer: String,
    pub up: bool,
    pub diag: Diag,
}

fn bind(addr: SocketAddrV4) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Start the task with the sessions `want` names. Fails if the ports cannot be bound.
pub fn start(
    want: BfdSessions,
    changes: mpsc::UnboundedSender<Change>,
) -> std::io::Result<SharedBfd> {
    let BfdSessions {
        local,
        peers,
        timers: cfg,
    } = want;
    let rx = bind(SocketAddrV4::new(local, PORT))?;
    setsockopt(&rx, sockopt::Ipv4RecvTtl, &true).map_err(std::io::Error::from)?;
    let tx = (49152..=65535u16)
        .find_map(|p| bind(SocketAddrV4::new(local, p)).ok())
        .ok_or_else(|| std::io::Error::other("no free BFD source port in 49152-65535"))?;
    setsockopt(&tx, sockopt::Ipv4Ttl, &(TTL as i32)).map_err(std::io::Error::from)?;
    let rx = tokio::net::UdpSocket::from_std(rx)?;
    let tx = tokio::net::UdpSocket::from_std(tx)?;
    let now = Instant::now();
    let mut sessions: Vec<(String, Ipv4Addr, Session)> = peers
        .into_iter()
        .enumerate()
        .map(|(i, (name, addr))| {
            let discr =
                rand_core::RngCore::next_u32(&mut rand_core::OsRng) & 0xffff_ff00 | (i as u32 + 1);
            (name, addr, Session::new(cfg, discr.max(1), now))
        })
        .collect();
    let status: SharedBfd = Arc::new(Mutex::new(
        sessions
            .iter()
            .map(|(name, addr, s)| BfdStatus {
                peer: name.clone(),
                address: *addr,
                state: s.state().to_string(),
                diag: s.diag().to_string(),
                received: 0,
                discarded: 0,
            })
            .collect(),
    ));
    let shared = status.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 128];
        loop {
            let wake = sessions
                .iter()
                .map(|s| s.2.next_wake())
                .min()
                .unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(1));
            tokio::select! {
                got = rx.async_io(Interest::READABLE, || receive(rx.as_raw_fd(), &mut buf)) => {
                    // Whatever arrives (a flood from anywhere included), the timers below still
                    // run: a datagram is looked at once and never skips them.
                    if let Ok((n, from, ttl)) = got {
                        take(&mut sessions, &shared, &changes, &buf[..n], from, ttl);
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            let now = Instant::now();
            for (name, addr, s) in sessions.iter_mut().filter(|s| now >= s.2.next_wake()) {
                let jitter = rand_core::RngCore::next_u32(&mut rand_core::OsRng);
                let (t, p) = s.timers(now, jitter);
                if let Some(t) = t {
                    report(&changes, name, t.from, t.to, t.diag);
                }
                if let Some(p) = p {
                    let _ = tx.try_send_to(&p.encode(), SocketAddr::from((*addr, PORT)));
                }
            }
            let mut st = shared.lock().expect("not poisoned");
            for (i, (_, _, s)) in sessions.iter().enumerate() {
                st[i].state = s.state().to_string();
                st[i].diag = s.diag().to_string();
            }
        }
    });
    Ok(status)
}

/// One datagram from `from`, for the session with that peer if there is one: only with TTL 255
/// (RFC 5881 §5) and only if it decodes; counted either way.
fn take(
    sessions: &mut [(String, Ipv4Addr, Session)],
    shared: &SharedBfd,
    changes: &mpsc::UnboundedSender<Change>,
    datagram: &[u8],
    from: Ipv4Addr,
    ttl: Option<i32>,
) {
    let Some(i) = sessions.iter().position(|s| s.1 == from) else {
        return;
    };
    let now = Instant::now();
    let decoded = (ttl == Some(TTL as i32))
        .then(|| Control::decode(datagram).ok())
        .flatten();
    let result = decoded.map(|p| sessions[i].2.receive(&p, now));
    let mut st = shared.lock().expect("not poisoned");
    match result {
        Some(Ok(t)) => {
            st[i].received += 1;
            if let Some(t) = t {
                report(changes, &sessions[i].0, t.from, t.to, t.diag);
            }
        }
        _ => st[i].discarded += 1,
    }
}

fn report(changes: &mpsc::UnboundedSender<Change>, peer: &str, from: State, to: State, diag: Diag) {
    if to == State::Up || from == State::Up {
        tracing::info!(%peer, %from, %to, %diag, "BFD session {}", if to == State::Up { "up" } else { "down" });
        let _ = changes.send(Change {
            peer: peer.to_string(),
            up: to == State::Up,
            diag,
        });
    }
}

/// One datagram: (length, source address, TTL it arrived with).
fn receive(fd: i32, buf: &mut [u8]) -> std::io::Result<(usize, Ipv4Addr, Option<i32>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::c_int);
    let msg = recvmsg::<SockaddrIn>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)
        .map_err(std::io::Error::from)?;
    let ttl = msg
        .cmsgs()
        .map_err(std::io::Error::from)?
        .find_map(|c| match c {
            ControlMessageOwned::Ipv4Ttl(t) => Some(t),
            _ => None,
        });
    let from = msg.address.map(|a| a.ip()).unwrap_or(Ipv4Addr::UNSPECIFIED);
    Ok((msg.bytes, from, ttl))
}
