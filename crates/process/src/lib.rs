//! What every Flotilla process sets up before anything else: logging
//! ([`logging`]) and shutdown on SIGTERM/SIGINT ([`shutdown`]).
//!
//! Invariant: no bus. The runner links this crate and not `flotilla-kit`,
//! so an inference replica carries no NATS client.

pub mod logging;
pub mod shutdown;

pub use shutdown::{Shutdown, shutdown_on_signals};
