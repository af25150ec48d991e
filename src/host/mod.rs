//! The kernel edge, kept thin: [`netlink`] (devices, addresses, routes), [`tundev`]
//! (persistent tun devices), [`sysctl`], [`reconcile`] (the only place that sequences kernel
//! changes: observe → diff → apply → verify → revert), [`keyfile`] (the private key on disk),
//! [`logging`]. Every decision comes from [`crate::intent`].

pub mod keyfile;
pub mod logging;
pub mod netlink;
pub mod nft;
pub mod reconcile;
pub mod sysctl;
#[allow(unsafe_code)] // system calls without a safe wrapper; SAFETY comments inside
pub mod tundev;
