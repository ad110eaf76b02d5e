//! Flotilla's cross-service suites, one module each, linked into one test
//! binary: one link step instead of one per suite, and one place for the
//! setup they share ([`support`]).
//!
//! Every test that needs the bus starts its own nats-server (see
//! `flotilla_integration::NatsServer`), so tests of different suites run side
//! by side in this one process; nothing here sets environment variables, a
//! global subscriber or a fixed port.
//!
//! Select a suite by its module: `cargo test -p flotilla-integration --test
//! suites rollouts::`. Tests that need a system from outside (a Kubernetes
//! cluster) are `#[ignore]`d with the reason and run with `-- --ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod architecture;
mod autoscaling;
mod cli;
mod control_api;
mod deploy_files;
mod drain;
mod end_to_end;
mod executor_restart;
mod failure_detection;
mod fleet_scale;
mod fleet_up;
mod gateway;
mod hub_cluster;
mod inventory;
mod isolated_fleet;
mod kit_bus;
mod migration;
mod models;
mod multi_cluster;
mod nats_security;
mod placement;
mod replicas;
mod rollouts;
mod schema;
mod support;
mod vllm_runtime;
