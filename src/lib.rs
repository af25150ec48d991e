//! `appliance`: extends a research site's network into a public cloud.
//!
//! The tree follows the data flow (ARCHITECTURE.md has the diagrams):
//!
//! - [`model`] — the site file as values: parsing and validation with positioned
//!   diagnostics, keys. Pure.
//! - [`intent`] — what one host must be, derived once from (config, host, live links, learned
//!   routes): kernel state, per-device datapath tables, BGP sessions; and the plan that takes
//!   the kernel there. Pure.
//! - [`host`] — the kernel edge: netlink (links, addresses, routes, rules), nf_tables (a
//!   relay's NAT), tun devices, sysctls, the reconcile sequence (observe → diff → apply →
//!   verify → revert), key files, logging.
//! - [`datapath`] — per-link WireGuard engine (pure, time is an input), MSS clamping,
//!   liveness, probes, and the packet threads that move bytes.
//! - [`bgp`] — the iBGP speaker: codec, FSM, RIB, Adj-RIB-Out, graceful-restart timers and
//!   the RIB task's decisions (`router`), all pure; and the tokio driver, which pushes learned
//!   routes to the daemon on a watch channel.
//! - [`bfd`] — BFD (RFC 5880/5881): Control packet codec and session state machine, pure.
//! - [`daemon`] — `appliance run`: a pure core that turns liveness, learned-route and underlay
//!   changes into exactly the kernel changes, tables and BGP signals they imply; the loop that
//!   performs them; the control socket; the typed status.
//! - [`image`] — the bootable image's PID 1 and how it reads its user-data.

pub mod bfd;
pub mod bgp;
pub mod daemon;
pub mod datapath;
pub mod host;
pub mod image;
pub mod intent;
pub mod model;
pub mod provision;
pub mod workload;
