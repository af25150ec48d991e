//! The daemon's local control socket: one JSON request line, one JSON response line.
//!
//! The socket lives in the abstract unix namespace (`@appliance-control`), which belongs to the
//! network namespace: `appliance status` run in a namespace finds that namespace's daemon, and
//! nothing is left on disk by a crash. Abstract sockets have no file permissions, so requests
//! that change anything are accepted only from root (checked with SO_PEERCRED).

use super::status::Reply;
use serde::{Deserialize, Serialize};
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const NAME: &[u8] = b"appliance-control";
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    /// Re-read the config (from `config`, or the file the daemon was started with).
    Reload {
        config: Option<String>,
    },
}

pub fn bind() -> io::Result<tokio::net::UnixListener> {
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(NAME)?;
    let l = std::os::unix::net::UnixListener::bind_addr(&addr).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                e.kind(),
                "another appliance daemon is already running in this network namespace",
            )
        } else {
            e
        }
    })?;
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
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
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(req).expect("request serialises");
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    let mut reply = String::new();
    tokio::time::timeout(TIMEOUT, BufReader::new(r).read_line(&mut reply))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the daemon did not answer"))??;
    serde_json::from_str(&reply).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Read one request from a connection; returns it with whether the peer is root.
pub async fn read_request(
    stream: &mut tokio::net::UnixStream,
) -> io::Result<(Result<Request, String>, bool)> {
    let root = stream.peer_cred().map(|c| c.uid() == 0).unwrap_or(false);
    let mut line = String::new();
    let mut reader = BufReader::new(&mut *stream);
    tokio::time::timeout(TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client sent nothing"))??;
    Ok((
        serde_json::from_str(&line).map_err(|e| format!("bad request: {e}")),
        root,
    ))
}

pub async fn reply(stream: &mut tokio::net::UnixStream, value: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_string(value).expect("a reply serialises");
    line.push('\n');
    stream.write_all(line.as_bytes()).await
}
