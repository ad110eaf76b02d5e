//! Model artifacts on the bus.
//!
//! An artifact (a GGUF file, or a safetensors folder) is stored in object
//! store `models` as parts of at most [`PART_SIZE`], each its own object
//! named `<model>/parts/<part digest hex>` and listed with its SHA-256
//! in the model's `ModelRecord.parts`. [`upload`] stores one and returns
//! that list; [`verify_stored`] re-reads every part and checks it;
//! [`ModelCache`] is an executor's local cache: downloads parts in
//! parallel, checks each part's digest before it counts, resumes from the
//! parts it already has, and evicts the least recently used models beyond
//! its size budget.
//!
//! Digests are `sha256:<hex>`: of a part over its bytes, of an artifact
//! over every file's bytes in path order.
//!
//! This crate never decides which model goes where; it moves and checks
//! bytes.

mod cache;
mod upload;

pub use cache::{CachedModel, FetchError, FetchProgress, FetchReport, ModelCache};
pub use upload::{UploadError, Uploaded, upload, verify_stored};

/// The largest part; small enough to retry cheaply, large enough that a
/// 100 GB model has ~12,000 parts.
pub const PART_SIZE: u64 = 8 << 20;

/// NATS chunk size inside each part object.
pub const CHUNK_SIZE: usize = 512 << 10;

/// Parts moved at once in each direction.
pub const PARALLEL_PARTS: usize = 4;

/// `sha256:<hex>` of some bytes' digest.
pub fn digest_string(digest: &[u8]) -> String {
    let mut out = String::with_capacity(7 + digest.len() * 2);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The hex of a `sha256:<hex>` digest, checked.
pub fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// Where a model of `digest` lies inside a [`ModelCache`]'s folder, in
/// the layout every cache shares (the executor's, a node cache filled by
/// `flotilla-executor fetch-model`).
pub fn cache_relative_path(digest: &str) -> Option<std::path::PathBuf> {
    digest_hex(digest).map(|hex| std::path::Path::new("models").join(hex))
}

/// Object name of one part: by its content, so equal parts are stored
/// once per model and no part waits for the artifact's digest.
pub fn part_object(model: &str, part_digest_hex: &str) -> String {
    format!("{model}/parts/{part_digest_hex}")
}
