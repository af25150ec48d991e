//! The embedded iBGP speaker. Pure: [`wire`] (codec), [`fsm`] (one session's state machine),
//! [`rib`] (Adj-RIB-In, best path, reflection, policy), [`adj_rib_out`] (what each peer was
//! told), [`restart`] (graceful-restart timers), [`router`] (the RIB task's decisions, built
//! from those), [`setup`] (which sessions, which policies), [`pace`] (rate limits). The tokio driver is [`speaker`].
//! See ARCHITECTURE.md.

pub mod adj_rib_out;
pub mod fsm;
pub mod pace;
pub mod restart;
pub mod rib;
pub mod router;
pub mod setup;
pub mod speaker;
pub mod wire;
