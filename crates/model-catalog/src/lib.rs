//! The model catalog: which models Flotilla knows how to serve, how much GPU
//! memory one replica of a model needs, and how many GPUs of a given kind
//! that replica takes.
//!
//! This crate owns three things, all plain data and pure functions:
//!
//! - the preset table ([`presets`], [`preset`]): published architecture
//!   figures, artifact formats, quantizations and runtimes per model;
//! - the one memory formula ([`replica_memory`]): weights + KV cache +
//!   runtime overhead for a [`ServingProfile`];
//! - the sizing rule ([`size_replica`], [`size_preset`]): the smallest
//!   tensor-parallel degree that fits a node of a [`GpuType`], else the
//!   fewest pipeline stages (nodes) of the widest degree a node holds, or
//!   a [`SizingError`] that says in numbers why nothing does.
//!
//! It never does I/O: no files, no network, no clock, no async. Callers
//! (placement, the CLI) hand it figures and get figures back, so every answer
//! can be reproduced in a unit test.
//!
//! Start reading at [`replica_memory`], then [`size_replica`]; the table
//! lives in [`catalog`].

pub mod catalog;
pub mod memory;
pub mod precision;
pub mod sizing;

pub use catalog::{ModelShape, Preset, preset, presets};
pub use memory::{
    GIB, MIB, MIN_RUNTIME_OVERHEAD_BYTES, MemoryEstimate, RUNTIME_OVERHEAD_PERCENT, ServingProfile,
    gib, replica_memory,
};
pub use precision::{ArtifactFormat, Precision, Runtime};
pub use sizing::{
    GpuType, MAX_PIPELINE_STAGES, ReplicaSizing, SizingError, USABLE_GPU_MEMORY_FRACTION,
    size_preset, size_replica, stage_tensor_parallel,
};
