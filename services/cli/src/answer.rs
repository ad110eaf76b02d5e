//! Asking the fleet and waiting for the event that answers: the kit's
//! helper, shared with the gRPC control API.

pub use flotilla_kit::answer::{Answer, Pending, ask, error_reason, wait_for_answer};
