//! The tunnels. [`engine`] is the per-link WireGuard engine: peers, cryptokey routing and
//! every per-packet decision, with no I/O and no clock of its own (`now` is an argument);
//! [`probe`] is the in-band liveness probe and [`liveness`] the verdicts; [`runtime`] is the
//! I/O edge: one tun queue, one UDP socket and two packet threads per link.

pub mod engine;
pub mod liveness;
pub mod mss;
pub mod probe;
#[allow(unsafe_code)] // system calls without a safe wrapper; SAFETY comments inside
pub mod runtime;
