//! The embedded iBGP speaker. Pure: [`wire`] (codec), [`fsm`] (one session's state machine),
//! [`rib`] (Adj-RIB-In, best path, reflection, policy), [`setup`] (which sessions, which
//! policies). The tokio driver is [`speaker`]. See ARCHITECTURE.md.

pub mod fsm;
pub mod rib;
pub mod setup;
pub mod speaker;
pub mod wire;
