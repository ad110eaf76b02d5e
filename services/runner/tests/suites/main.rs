//! The runner's own suites, one module each, linked into one test binary
//! (one link step instead of one per suite): the OpenAI surface over HTTP,
//! continuations, the forward pass and safetensors folders against
//! candle's reference models, and the tokenizers against llama.cpp's
//! published results. They share [`support`]: the shipped model and a
//! runner started in this process.
//!
//! Select a suite by its module: `cargo test -p flotilla-runner --test
//! suites openai::`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod continuation;
mod forward;
mod openai;
mod prefix_cache;
mod safetensors;
mod support;
mod tokenizers;
