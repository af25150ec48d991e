//! The embedded iBGP speaker. Pure parts: [`wire`] (codec). See ARCHITECTURE.md.

pub mod fsm;
pub mod rib;
pub mod speaker;
pub mod wire;
