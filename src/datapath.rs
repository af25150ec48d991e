//! Datapath I/O: one tun queue and one UDP socket per link, two threads each (tun → UDP and
//! UDP → tun). The threads only move bytes; every decision is [`crate::wg::Link`]'s.
//!
//! The link value is swapped atomically on reload (`replace`): the threads pick up the new peer
//! table on their next packet, and peers that were kept keep their sessions.

use crate::tundev;
use crate::wg::{Inbound, Link, Outbound, MAX_PACKET};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often blocked threads wake up to notice a stop request.
const WAKE: Duration = Duration::from_millis(200);
/// Socket buffers: ECMP over several links and bursts from TSO-sized writes need room.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

pub struct LinkRuntime {
    pub dev: String,
    link: Arc<RwLock<Arc<Link>>>,
    udp: Arc<UdpSocket>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl LinkRuntime {
    /// Attach to the link's tun device, bind its UDP socket, start its threads. `v6` binds the
    /// socket for an IPv6 underlay.
    pub fn start(link: Link, v6: bool) -> io::Result<LinkRuntime> {
        let dev = link.spec_dev.clone();
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let name = std::ffi::CString::new(dev.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("tunnel device {dev} does not exist (the reconcile creates it)"),
            ));
        }
        let tun = Arc::new(tundev::attach(&dev)?);
        let port = link.listen_port.unwrap_or(0);
        let bind: SocketAddr = if v6 {
            (Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, port).into()
        };
        let udp = UdpSocket::bind(bind).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot bind UDP {bind} for {dev}: {e}"))
        })?;
        udp.set_read_timeout(Some(WAKE))?;
        for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            // Best effort: the kernel caps it at net.core.[rw]mem_max.
            // SAFETY: setsockopt with a c_int value of the right size.
            unsafe {
                libc::setsockopt(
                    udp.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &SOCKET_BUFFER as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        let udp = Arc::new(udp);
        let link = Arc::new(RwLock::new(Arc::new(link)));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (link, udp, tun, stop) = (link.clone(), udp.clone(), tun.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{dev}-tx"))
                    .spawn(move || tun_to_udp(&link, &udp, &tun, &stop))?,
            );
        }
        {
            let (link, udp, tun, stop) = (link.clone(), udp.clone(), tun.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{dev}-rx"))
                    .spawn(move || udp_to_tun(&link, &udp, &tun, &stop))?,
            );
        }
        Ok(LinkRuntime {
            dev,
            link,
            udp,
            stop,
            threads,
        })
    }

    pub fn current(&self) -> Arc<Link> {
        self.link.read().expect("not poisoned").clone()
    }

    pub fn replace(&self, link: Link) {
        *self.link.write().expect("not poisoned") = Arc::new(link);
    }

    pub fn local_port(&self) -> Option<u16> {
        self.udp.local_addr().ok().map(|a| a.port())
    }

    /// Send datagrams produced outside the packet threads (timers, keepalives).
    pub fn send_all(&self, datagrams: &[(SocketAddr, Vec<u8>)]) {
        for (to, d) in datagrams {
            if let Err(e) = self.udp.send_to(d, to) {
                tracing::debug!(dev = %self.dev, %to, error = %e, "send failed");
            }
        }
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn wait_readable(fd: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, WAKE.as_millis() as i32) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

fn tun_to_udp(link: &RwLock<Arc<Link>>, udp: &UdpSocket, tun: &File, stop: &AtomicBool) {
    let mut packet = vec![0u8; MAX_PACKET];
    let mut out = vec![0u8; MAX_PACKET];
    let mut reader = tun;
    while !stop.load(Ordering::Relaxed) {
        if !wait_readable(tun.as_raw_fd()) {
            continue;
        }
        let n = match reader.read(&mut packet) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "tun read failed; link stops");
                return;
            }
        };
        let link = link.read().expect("not poisoned").clone();
        if let Outbound::Send(to, len) = link.outbound(&packet[..n], &mut out) {
            let _ = udp.send_to(&out[..len], to);
        }
    }
}

fn udp_to_tun(link: &RwLock<Arc<Link>>, udp: &UdpSocket, tun: &File, stop: &AtomicBool) {
    let mut datagram = vec![0u8; MAX_PACKET];
    let mut out = vec![0u8; MAX_PACKET];
    let mut writer = tun;
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match udp.recv_from(&mut datagram) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "udp receive failed");
                continue;
            }
        };
        let link = link.read().expect("not poisoned").clone();
        let Inbound { to_tun, to_net, .. } = link.inbound(from, &datagram[..n], &mut out);
        if let Some(len) = to_tun {
            if let Err(e) = writer.write(&out[..len]) {
                tracing::debug!(error = %e, "tun write failed");
            }
        }
        for (to, d) in to_net {
            let _ = udp.send_to(&d, to);
        }
    }
}
