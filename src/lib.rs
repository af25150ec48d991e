//! `appliance`: extends a research site's network into a public cloud.
//!
//! Pure core (no I/O): [`config`] (site model and validation), [`desired`] (what one host
//! should look like), [`plan`] (diff, printable plan, revert), [`state`], [`diag`], [`key`],
//! [`userdata`] (how a booted image reads its config). The image's PID 1 is [`init`].
//! Thin edges: [`netlink`], [`sysctl`], [`tundev`] (kernel I/O), [`reconcile`] (sequencing:
//! observe → diff → apply → verify → revert), [`logging`].

pub mod bgp;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod desired;
pub mod diag;
pub mod init;
pub mod key;
pub mod liveness;
pub mod logging;
pub mod netlink;
pub mod plan;
pub mod reconcile;
pub mod state;
pub mod sysctl;
pub mod topology;
pub mod tundev;
pub mod userdata;
pub mod wg;
