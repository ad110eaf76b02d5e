//! Waiting for the event that answers a request the CLI published: the
//! kit's helper, shared with the gRPC control API.

pub use flotilla_kit::answer::{Answer, error_reason, wait_for_answer};
