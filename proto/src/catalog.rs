//! The public bus API as data: every subject and bucket with its message
//! type, publisher and readers. `docs/subjects.md` is rendered from it and
//! a test keeps the two equal.
