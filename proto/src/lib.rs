//! Flotilla's message contracts.
//!
//! This crate owns everything two services must agree on to talk over NATS:
//! the `flotilla.v1` protobuf types ([`v1`], generated from `proto/` and
//! checked in), the subject names ([`Subjects`]: no subject string is
//! formatted anywhere else), the streams, KV buckets and object stores as
//! data ([`Topology`]), and the codecs ([`codec`]): binary protobuf by
//! default, JSON when `Content-Type` says so.
//!
//! It never talks to NATS and has no async code: a service depends on it for
//! names and shapes, and on `flotilla-kit` for I/O.
//!
//! Start reading at [`Subjects`], then [`Topology::new`] and [`codec::decode`].

pub mod catalog;
pub mod codec;
pub mod json;
pub mod schema;
mod subjects;
mod topology;
pub mod traffic;

pub use codec::{Contract, DecodeError, Encoding};
pub use subjects::{
    CommandAction, ControlSubject, EventKind, EventType, InvalidName, Subjects, check_name,
    model_token,
};
pub use topology::{BucketDef, ObjectStoreDef, Retention, StreamDef, Topology};

/// The generated `flotilla.v1` protobuf types.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!("gen/flotilla.v1.rs");
}

/// The `FileDescriptorSet` of `proto/flotilla/v1` with its comments, as
/// gRPC reflection serves it and as clients without protoc load it
/// (`proto/src/gen/flotilla.v1.binpb`).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/flotilla.v1.binpb");

/// The template (version) part of a replica id, which rollout makes as
/// `<deployment>-<template>-<hash>`: what the gateway's traffic summaries
/// and the rollout's analysis group replicas by.
pub fn template_of_replica(replica_id: &str) -> Option<&str> {
    let mut parts = replica_id.rsplitn(3, '-');
    let _hash = parts.next()?;
    let template = parts.next()?;
    parts.next()?;
    Some(template)
}

/// The subject prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "flotilla";

/// The `apiVersion` of the documents this crate reads.
pub const API_VERSION: &str = "flotilla.dev/v1alpha1";
