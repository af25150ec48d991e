//! The tunnels. [`engine`] is the per-link WireGuard engine: peers, cryptokey routing and
//! every per-packet decision, with no I/O and no clock of its own (`now` is an argument);
//! [`probe`] is the in-band liveness probe and [`liveness`] the verdicts; [`flow`] picks a
//! decrypted packet's tun queue; [`offload`] is the UDP GSO self-check; [`runtime`] is the I/O edge: per link one or more queues, each
//! a tun queue, a UDP socket and two packet threads.

pub mod engine;
pub mod flow;
pub mod liveness;
pub mod mss;
pub mod offload;
pub mod probe;
#[allow(unsafe_code)] // system calls without a safe wrapper; SAFETY comments inside
pub mod runtime;
