//! The daemon's local control socket: one JSON request line, one JSON response line.
//!
//! The socket lives in the abstract unix namespace (`@appliance-control`), which belongs to the
//! network namespace: `appliance status` run in a namespace finds that namespace's daemon, and
//! nothing is left on disk by a crash. Abstract sockets have no file permissions, so requests
//! that change anything are accepted only from root (checked with SO_PEERCRED), and a client
//! believes only a server that runs as root (a local user could bind the name first).
//!
//! Any local user can connect, so the socket is served on a task of its own ([`serve`]): a
//! client that sends nothing, sends a line without end or never reads its reply costs one of
//! [`CLIENTS_MAX`] slots for at most [`CLIENT_TIMEOUT`] each way, never the daemon's loop
//! (which only answers requests that arrived whole, over a bounded channel). Root's clients
//! need no slot, so the operator's `appliance status` answers through any flood.

use super::status::Reply;
use serde::{Deserialize, Serialize};
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, Semaphore};

const NAME: &[u8] = b"appliance-control";
/// How long the CLI waits for the daemon's answer (a reload reconciles the host first).
const TIMEOUT: Duration = Duration::from_secs(30);
/// The longest request line the daemon reads.
pub const LINE_MAX: usize = 64 * 1024;
/// How long the daemon waits for a client's request, and for it to take the reply.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Clients served at once; one more is closed at once.
pub const CLIENTS_MAX: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    /// Re-read the config (from `config`, or the file the daemon was started with).
    Reload {
        config: Option<String>,
    },
    /// Drain this node (`on`), or take it back into service: see `Daemon::node_drain`.
    Drain {
        on: bool,
    },
}

/// A request that arrived whole, for the daemon's loop to answer on `reply`.
pub struct Asked {
    pub request: Request,
    /// The client runs as root.
    pub root: bool,
    pub reply: oneshot::Sender<Reply>,
}

/// Who holds the abstract name `@appliance-control` in this network namespace, if anyone.
fn holder() -> Option<String> {
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(NAME).ok()?;
    let s = std::os::unix::net::UnixStream::connect_addr(&addr).ok()?;
    let c = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    Some(format!("pid {} (uid {})", c.pid(), c.uid()))
}

pub fn bind() -> io::Result<tokio::net::UnixListener> {
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(NAME)?;
    let l = std::os::unix::net::UnixListener::bind_addr(&addr).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                e.kind(),
                format!(
                    "@appliance-control is already bound in this network namespace by {}: another appliance daemon, or a process holding the name",
                    holder().unwrap_or_else(|| "a process that does not answer".into())
                ),
            )
        } else {
            e
        }
    })?;
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

/// The channel requests that arrived whole reach the daemon's loop by (the control socket's
/// clients and the `/metrics` listener share it).
pub fn channel() -> (mpsc::Sender<Asked>, mpsc::Receiver<Asked>) {
    mpsc::channel(CLIENTS_MAX)
}

/// Serve the control socket on tasks of their own; requests that arrived whole go to `tx`.
pub fn serve(listener: tokio::net::UnixListener, tx: mpsc::Sender<Asked>) {
    let slots = Arc::new(Semaphore::new(CLIENTS_MAX));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors, say: do not spin on it.
                    tracing::debug!(error = %e, "control socket accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Root is always served (it could stop the daemon anyway); everyone else shares
            // the slots, so a flood of local connections cannot lock the operator out.
            let root = stream.peer_cred().is_ok_and(|c| c.uid() == 0);
            let slot = match slots.clone().try_acquire_owned() {
                Ok(s) => Some(s),
                Err(_) if root => None,
                Err(_) => {
                    tracing::debug!("control socket: {CLIENTS_MAX} clients already, one closed");
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                client(stream, root, tx).await;
                drop(slot);
            });
        }
    });
}

/// One client: its request line (bounded in length and time), the loop's answer, the reply
/// (bounded in time).
async fn client(mut stream: tokio::net::UnixStream, root: bool, tx: mpsc::Sender<Asked>) {
    let request = match tokio::time::timeout(CLIENT_TIMEOUT, read_line(&mut stream)).await {
        Err(_) => return,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "control connection");
            return;
        }
        Ok(Ok(None)) => Err(format!("request longer than {LINE_MAX} bytes")),
        Ok(Ok(Some(line))) => parse_request(&line),
    };
    let reply = match request {
        Err(e) => Reply::error(e),
        Ok(r) => {
            let (reply, answer) = oneshot::channel();
            let asked = Asked {
                request: r,
                root,
                reply,
            };
            if tx.send(asked).await.is_err() {
                return;
            }
            match answer.await {
                Ok(a) => a,
                Err(_) => return,
            }
        }
    };
    let mut line = serde_json::to_string(&reply).expect("a reply serialises");
    line.push('\n');
    let _ = tokio::time::timeout(CLIENT_TIMEOUT, stream.write_all(line.as_bytes())).await;
}

/// A request line as a client sent it (the decoder of what any local user can send).
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
}

/// One line of at most [`LINE_MAX`] bytes; `None` when it is longer.
async fn read_line(stream: &mut tokio::net::UnixStream) -> io::Result<Option<String>> {
    let mut line = String::new();
    let mut reader = BufReader::new(&mut *stream).take(LINE_MAX as u64 + 1);
    reader.read_line(&mut line).await?;
    Ok((line.len() <= LINE_MAX).then_some(line))
}

/// Send one request to the daemon of this network namespace. `NotFound` when none runs.
pub async fn request(req: &Request) -> io::Result<Reply> {
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(NAME)?;
    let std_stream = std::os::unix::net::UnixStream::connect_addr(&addr).map_err(|e| {
        if e.kind() == io::ErrorKind::ConnectionRefused {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no appliance daemon is running in this network namespace",
            )
        } else {
            e
        }
    })?;
    std_stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(std_stream)?;
    // The daemon runs as root; anyone else holding the name gets no say.
    match stream.peer_cred() {
        Ok(c) if c.uid() == 0 => {}
        Ok(c) => {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "@appliance-control is held by pid {} (uid {}), not by a daemon running as root: not trusting it",
                    c.pid().map_or("?".into(), |p| p.to_string()),
                    c.uid()
                ),
            ))
        }
        Err(e) => return Err(e),
    }
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(req).expect("request serialises");
    line.push('\n');
    let answer = async {
        w.write_all(line.as_bytes()).await?;
        let mut reply = String::new();
        BufReader::new(r).read_line(&mut reply).await?;
        Ok::<_, io::Error>(reply)
    };
    let reply = tokio::time::timeout(TIMEOUT, answer)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the daemon did not answer"))??;
    serde_json::from_str(&reply).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
