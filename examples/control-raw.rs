//! Send one raw request line to the daemon's control socket (`@appliance-control` in this
//! network namespace) and print the reply: what a hostile local client can send, without
//! `appliance`'s own client checks (it refuses a server that is not root). The image tests run
//! it as root inside the workload to show the daemon itself refuses drains and reloads.
//!
//!     control-raw '{"cmd":"drain","on":true}'

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::linux::net::SocketAddrExt as _;

fn main() {
    let line = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: control-raw JSON-REQUEST");
        std::process::exit(64)
    });
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(b"appliance-control")
        .expect("an abstract address");
    let mut s = std::os::unix::net::UnixStream::connect_addr(&addr).unwrap_or_else(|e| {
        eprintln!("connect @appliance-control: {e}");
        std::process::exit(1)
    });
    s.write_all(format!("{line}\n").as_bytes()).expect("send");
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).expect("reply");
    print!("{reply}");
}
