//! See `tests/codegen.rs`: the generator lives in a test so a plain build of the workspace needs no protoc.
