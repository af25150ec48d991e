//! The site file as values. Pure: [`config`] parses and validates KDL into [`config::Config`]
//! with every error positioned ([`diag`]); [`key`] holds WireGuard keys.

pub mod config;
pub mod diag;
pub mod edit;
pub mod key;
pub mod workload;
