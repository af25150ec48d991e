//! The site's jobs on a node: the workload declared in the site file, pulled by digest,
//! unpacked onto `state`, and run in namespaces of its own beside the datapath.
//!
//! Data flow: [`crate::model::workload::Workload`] (the site file) → [`pull`] (registry or
//! drive → verified blobs → [`unpack`] into a staging root → the image) → [`run`] (cgroup v2,
//! mount/PID/UTS/IPC/cgroup/user namespaces, the node's network namespace shared) →
//! supervised by the image's PID 1 ([`supervise`]). Decisions about documents and entries are
//! pure ([`oci`], [`verify`]); the rest is a thin edge.

pub mod disk;
pub mod oci;
pub mod pull;
#[allow(unsafe_code)] // namespaces, fork, pivot_root, credentials; SAFETY comments inside
pub mod run;
#[allow(unsafe_code)] // pre_exec into the cgroup, signals, umount; SAFETY comments inside
pub mod supervise;
pub mod unpack;
pub mod verify;
