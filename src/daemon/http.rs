//! The `/metrics` listener: the thin socket edge of [`super::metrics`].
//!
//! Anyone who reaches the address may connect (the site LAN on a gateway, the site through
//! the tunnels on a node), so it answers one request per connection and is bounded like the
//! control socket: at most [`CLIENTS_MAX`] connections at once (one more is closed), a
//! request head of at most [`HEAD_MAX`] bytes that must arrive within [`CLIENT_TIMEOUT`], a
//! reply that must be taken within the same time. Only `GET /metrics` (or `HEAD`) is served;
//! the snapshot comes from the daemon's loop over the control channel, never by touching the
//! loop's state from here. A small HTTP/1.1 subset suffices for a scraper; a
//! web framework would be most of the binary.

use super::control::{Asked, Request};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

pub const CLIENTS_MAX: usize = 8;
pub const HEAD_MAX: usize = 8 * 1024;
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed bind waits before trying again (the address may not be up yet).
const REBIND: Duration = Duration::from_secs(2);

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Asks {
    Metrics { head_only: bool },
    NotFound,
    BadMethod,
    Bad,
}

/// Parse a request head (the bytes up to the blank line).
pub fn parse_head(head: &[u8]) -> Asks {
    let Some(line) = head.split(|b| *b == b'\n').next() else {
        return Asks::Bad;
    };
    let line = std::str::from_utf8(line)
        .unwrap_or("")
        .trim_end_matches('\r');
    let mut w = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (w.next(), w.next(), w.next(), w.next())
    else {
        return Asks::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Asks::Bad;
    }
    let path = target.split('?').next().unwrap_or("");
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Asks::BadMethod,
    };
    if path == "/metrics" {
        Asks::Metrics { head_only }
    } else {
        Asks::NotFound
    }
}

/// Serve `/metrics` on `addr` for as long as the daemon runs; binds again until it can.
pub fn serve(addr: SocketAddr, ask: mpsc::Sender<Asked>) {
    tokio::spawn(async move {
        let mut said = false;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) => {
                    // Said once (the address may just not be up yet), then quietly retried.
                    if !said {
                        tracing::warn!(%addr, error = %e, "cannot serve /metrics yet; trying again every 2 s");
                        said = true;
                    }
                    tokio::time::sleep(REBIND).await;
                }
            }
        };
        tracing::info!(%addr, "serving /metrics");
        let slots = Arc::new(Semaphore::new(CLIENTS_MAX));
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let ask = ask.clone();
            tokio::spawn(async move {
                if let Err(e) = client(stream, ask).await {
                    tracing::debug!(error = %e, "metrics connection");
                }
                drop(slot);
            });
        }
    });
}

/// The request head, or `None` when it is longer than [`HEAD_MAX`] or the peer closed early.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
        if memchr::memmem::find(&head, b"\r\n\r\n").is_some()
            || memchr::memmem::find(&head, b"\n\n").is_some()
        {
            return Ok(Some(head));
        }
        if head.len() > HEAD_MAX {
            return Ok(None);
        }
    }
}

async fn client(mut stream: TcpStream, ask: mpsc::Sender<Asked>) -> io::Result<()> {
    let head = match tokio::time::timeout(CLIENT_TIMEOUT, read_head(&mut stream)).await {
        Err(_) | Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Some(h))) => h,
    };
    let (status, ctype, body, head_only) = match parse_head(&head) {
        Asks::Metrics { head_only } => {
            let (reply, answer) = oneshot::channel();
            let asked = Asked {
                request: Request::Status,
                root: false,
                reply,
            };
            let status = match ask.send(asked).await {
                Ok(()) => answer.await.ok().and_then(|r| r.status),
                Err(_) => None,
            };
            match status {
                Some(s) => (
                    "200 OK",
                    super::metrics::CONTENT_TYPE,
                    super::metrics::render(&s),
                    head_only,
                ),
                None => (
                    "503 Service Unavailable",
                    "text/plain",
                    "the daemon is stopping\n".into(),
                    head_only,
                ),
            }
        }
        Asks::NotFound => (
            "404 Not Found",
            "text/plain",
            "only /metrics is served here\n".into(),
            false,
        ),
        Asks::BadMethod => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".into(),
            false,
        ),
        Asks::Bad => (
            "400 Bad Request",
            "text/plain",
            "not an HTTP/1 request\n".into(),
            false,
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    let _ = tokio::time::timeout(CLIENT_TIMEOUT, stream.write_all(&out)).await;
    let _ = stream.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asks::Metrics { head_only: false }
        );
        assert_eq!(
            parse_head(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Asks::Metrics { head_only: true }
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\n\r\n"), Asks::NotFound);
        assert_eq!(
            parse_head(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Asks::BadMethod
        );
        assert_eq!(parse_head(b"GET /metrics\r\n\r\n"), Asks::Bad);
        assert_eq!(parse_head(b"GET /metrics SSH-2.0\r\n\r\n"), Asks::Bad);
        assert_eq!(parse_head(b"\xff\xfe\r\n\r\n"), Asks::Bad);
        assert_eq!(parse_head(b""), Asks::Bad);
    }
}
