//! `bench-models`: push and fetch throughput of a model file through the
//! JetStream object store (real nats-server, store on the same disk),
//! against a plain file copy on that disk measured in the same run.
//!
//! `cargo run -p flotilla-integration --bin bench-models [-- FILE]`; the
//! default file is the shipped SmolLM2 GGUF (scripts/install-tools).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use flotilla_integration::{NatsServer, shipped_model};
use flotilla_proto::v1;
use tokio_util::sync::CancellationToken;

const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let file = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(shipped_model);
    let size = std::fs::metadata(&file)
        .with_context(|| format!("{} (run scripts/install-tools)", file.display()))?
        .len();
    let mb = size as f64 / 1e6;
    let server = NatsServer::start().await?;
    let bus = server.provisioned_bus("bench").await?;
    let store = bus.jetstream.get_object_store("models").await?;
    // Same disk as the nats-server store.
    let scratch = server.store_dir().join("bench-scratch");
    std::fs::create_dir_all(&scratch)?;
    // Warm the page cache so every run reads the source from memory.
    std::fs::read(&file)?;

    let (mut copy, mut push, mut fetch) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let target = scratch.join(format!("copy-{round}"));
        let t = Instant::now();
        std::fs::copy(&file, &target)?;
        std::fs::File::open(&target)?.sync_all()?;
        copy.push(mb / t.elapsed().as_secs_f64());
        std::fs::remove_file(&target)?;

        let name = format!("bench-{round}");
        let t = Instant::now();
        let up = flotilla_model_store::upload(&store, &name, &file, |_, _| {}).await?;
        push.push(mb / t.elapsed().as_secs_f64());

        let record = v1::ModelRecord {
            name: name.clone(),
            digest: up.digest.clone(),
            size_bytes: up.size_bytes,
            parts: up.parts.clone(),
            ..Default::default()
        };
        let cache = flotilla_model_store::ModelCache::open(
            &scratch.join(format!("cache-{round}")),
            u64::MAX,
        )?;
        let t = Instant::now();
        let report = cache
            .fetch(&store, &record, &CancellationToken::new(), |_| {})
            .await?;
        std::fs::File::open(report.path.join(file.file_name().unwrap_or_default()))?.sync_all()?;
        fetch.push(mb / t.elapsed().as_secs_f64());
    }
    let (copy, push, fetch) = (median(copy), median(push), median(fetch));
    println!(
        "{} ({mb:.1} MB), median of {ROUNDS} rounds, nats-server store and copies on the same disk",
        file.display()
    );
    println!("{:<40} {:>10} {:>10}", "", "MB/s", "vs copy");
    println!(
        "{:<40} {:>10.0} {:>9.2}x",
        "plain file copy (baseline, + fsync)", copy, 1.0
    );
    println!(
        "{:<40} {:>10.0} {:>9.2}x",
        "push: upload (hash, parts, object store)",
        push,
        push / copy
    );
    println!(
        "{:<40} {:>10.0} {:>9.2}x",
        "fetch: cache (parts, digest check, fsync)",
        fetch,
        fetch / copy
    );
    println!(
        "goal >= 0.5x: push {}, fetch {}",
        if push / copy >= 0.5 { "met" } else { "NOT met" },
        if fetch / copy >= 0.5 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
