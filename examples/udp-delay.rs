//! A UDP forwarder that adds delay, fast enough for tunnel benchmarks (the kernel here has no
//! netem; `tests/udp-delay.py` is the lab's slower one).
//!
//!     udp-delay DELAY_MS LISTEN_ADDR:PORT=TARGET_ADDR:PORT [...]
//!
//! For each mapping, datagrams arriving on LISTEN from its client (the last address heard) go
//! to TARGET from a socket of their own, and TARGET's answers go back to the client; each is
//! held DELAY_MS in each direction (the round trip grows by twice that). Trains of datagrams
//! are received with UDP GRO and sent with UDP GSO, so the forwarder costs a few system calls
//! per 64 KiB. A direction holds at most QUEUE trains (a router's queue): more are dropped.
//! Each second in which something was lost, stderr gets the running totals: trains dropped
//! at a full queue, datagrams the socket refused. Runs until killed.

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const QUEUE: usize = 4096;
/// Socket buffers: a train burst at line rate must not overflow the forwarder itself.
const BUFFER: usize = 16 << 20;

fn bind(addr: SocketAddr) -> UdpSocket {
    use nix::sys::socket::{setsockopt, sockopt};
    let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let _ = setsockopt(&sock, sockopt::RcvBufForce, &BUFFER);
    let _ = setsockopt(&sock, sockopt::SndBufForce, &BUFFER);
    sock
}

struct Train {
    due: Instant,
    data: Vec<u8>,
    stride: usize,
}

/// Where a direction's trains go: a fixed target, or the client last heard on the front.
enum To {
    Fixed(SocketAddr),
    Client(Arc<Mutex<Option<SocketAddr>>>),
}

fn receive(
    sock: Arc<UdpSocket>,
    delay: Duration,
    tx: SyncSender<Train>,
    client: Option<Arc<Mutex<Option<SocketAddr>>>>,
    dropped: Arc<AtomicU64>,
) {
    let state = UdpSocketState::new((&*sock).into()).expect("udp state");
    // quinn-udp made it non-blocking: this thread blocks in recvmsg instead.
    sock.set_nonblocking(false).expect("blocking socket");
    let mut buf = vec![0u8; 65536 * 2];
    let mut meta = [RecvMeta::default()];
    loop {
        let got = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            state.recv((&*sock).into(), &mut iov, &mut meta)
        };
        let Ok(n) = got else { continue };
        let now = Instant::now();
        for m in meta.iter().take(n) {
            if let Some(c) = &client {
                *c.lock().unwrap() = Some(m.addr);
            }
            let train = Train {
                due: now + delay,
                data: buf[..m.len].to_vec(),
                stride: m.stride,
            };
            if let Err(TrySendError::Full(_)) = tx.try_send(train) {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn send(sock: Arc<UdpSocket>, to: To, rx: Receiver<Train>, unsent: Arc<AtomicU64>) {
    let state = UdpSocketState::new((&*sock).into()).expect("udp state");
    for t in rx {
        let now = Instant::now();
        if t.due > now {
            std::thread::sleep(t.due - now);
        }
        let dest = match &to {
            To::Fixed(a) => *a,
            To::Client(c) => match *c.lock().unwrap() {
                Some(a) => a,
                None => continue,
            },
        };
        let max = state.max_gso_segments().max(1) * t.stride.max(1);
        for chunk in t.data.chunks(max) {
            let transmit = Transmit {
                destination: dest,
                ecn: None,
                contents: chunk,
                segment_size: (chunk.len() > t.stride).then_some(t.stride),
                src_ip: None,
            };
            if state.try_send((&*sock).into(), &transmit).is_err() {
                // A refused GSO write (or a full buffer): datagram by datagram.
                for d in chunk.chunks(t.stride.max(1)) {
                    if sock.send_to(d, dest).is_err() {
                        unsent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: udp-delay DELAY_MS LISTEN_ADDR:PORT=TARGET_ADDR:PORT [...]";
    let delay_ms: u64 = args.first().and_then(|d| d.parse().ok()).expect(usage);
    let delay = Duration::from_millis(delay_ms);
    let dropped = Arc::new(AtomicU64::new(0));
    let unsent = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    assert!(args.len() > 1, "{usage}");
    for m in &args[1..] {
        let (listen, target) = m.split_once('=').expect(usage);
        let listen: SocketAddr = listen.parse().expect(usage);
        let target: SocketAddr = target.parse().expect(usage);
        let front = Arc::new(bind(listen));
        let any: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let up = Arc::new(bind(any));
        let client = Arc::new(Mutex::new(None));
        let (to_target, from_front) = sync_channel(QUEUE);
        let (to_client, from_up) = sync_channel(QUEUE);
        let (f, c, d) = (front.clone(), client.clone(), dropped.clone());
        threads.push(std::thread::spawn(move || {
            receive(f, delay, to_target, Some(c), d)
        }));
        let (u, n) = (up.clone(), unsent.clone());
        threads.push(std::thread::spawn(move || {
            send(u, To::Fixed(target), from_front, n)
        }));
        let (u, d) = (up.clone(), dropped.clone());
        threads.push(std::thread::spawn(move || {
            receive(u, delay, to_client, None, d)
        }));
        let (f, c, n) = (front.clone(), client.clone(), unsent.clone());
        threads.push(std::thread::spawn(move || {
            send(f, To::Client(c), from_up, n)
        }));
    }
    let mut said = (0, 0);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = (
            dropped.load(Ordering::Relaxed),
            unsent.load(Ordering::Relaxed),
        );
        if now != said {
            eprintln!(
                "udp-delay: {} trains dropped (queue full), {} datagrams unsent",
                now.0, now.1
            );
            said = now;
        }
    }
}
