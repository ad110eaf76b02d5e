//! `flotilla kv get|keys`: the fleet's KV buckets read as the documents they
//! hold. Values are protobuf (`nats kv get` shows bytes); this decodes each
//! with the contract its bucket is documented to hold.

use std::io::Write;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use flotilla_kit::Bus;
use flotilla_proto::codec::{self, Contract};
use flotilla_proto::{BucketDef, v1};
use futures::TryStreamExt;
use serde_json::Value;

#[derive(Debug, Subcommand)]
pub enum KvAction {
    /// One entry, decoded: `flotilla kv get deployments chat-small`.
    Get {
        /// A bucket by its role (`deployments`, `clusters`, `placements`,
        /// `rollouts`, `replicas`, `models`) or its full name.
        bucket: String,
        key: String,
        #[arg(short = 'o', long, value_enum, default_value_t = KvFormat::Yaml)]
        output: KvFormat,
        /// An earlier revision of the entry (the buckets keep 5).
        #[arg(long)]
        revision: Option<u64>,
    },
    /// The keys of a bucket, one per line.
    Keys { bucket: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvFormat {
    Json,
    Yaml,
}

/// The bucket named by its role or its full name.
fn bucket_of<'a>(bus: &'a Bus, name: &str) -> anyhow::Result<&'a BucketDef> {
    let buckets = bus.topology.buckets();
    buckets
        .iter()
        .find(|b| b.role == name || b.name == name)
        .copied()
        .ok_or_else(|| {
            let known: Vec<&str> = buckets.iter().map(|b| b.role).collect();
            anyhow::anyhow!(
                "no bucket {name:?}; the fleet's buckets are {}",
                known.join(", ")
            )
        })
}

fn value_of<M: Contract>(bytes: &[u8]) -> anyhow::Result<Value> {
    let message: M = codec::decode(None, bytes)?;
    Ok(serde_json::to_value(&message)?)
}

/// The entry's value as JSON, by the contract of its bucket.
fn decode(bucket: &BucketDef, bytes: &[u8]) -> anyhow::Result<Value> {
    match bucket.value_type {
        "ClusterRecord" => value_of::<v1::ClusterRecord>(bytes),
        "ModelDeployment" => value_of::<v1::ModelDeployment>(bytes),
        "PlacementDecision" => value_of::<v1::PlacementDecision>(bytes),
        "RolloutState" => value_of::<v1::RolloutState>(bytes),
        "ReplicaStatus" => value_of::<v1::ReplicaStatus>(bytes),
        "ModelRecord" => value_of::<v1::ModelRecord>(bytes),
        _ => Ok(Value::String(String::from_utf8_lossy(bytes).into_owned())),
    }
}

async fn open(bus: &Bus, def: &BucketDef) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    bus.jetstream
        .get_key_value(&def.name)
        .await
        .with_context(|| format!("opening bucket {}", def.name))
}

pub async fn run(bus: &Bus, action: KvAction, out: &mut impl Write) -> anyhow::Result<()> {
    match action {
        KvAction::Get {
            bucket,
            key,
            output,
            revision,
        } => {
            let def = bucket_of(bus, &bucket)?;
            let store = open(bus, def).await?;
            let entry = match revision {
                Some(r) => {
                    store
                        .history(&key)
                        .await?
                        .try_filter(|e| std::future::ready(e.revision == r))
                        .try_next()
                        .await?
                }
                None => store.entry(&key).await?,
            };
            let Some(entry) =
                entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
            else {
                let at = revision
                    .map(|r| format!(" at revision {r}"))
                    .unwrap_or_default();
                bail!(
                    "no key {key:?} in bucket {}{at}; `flotilla kv keys {}` lists them",
                    def.name,
                    def.role
                );
            };
            let value = decode(def, &entry.value)
                .with_context(|| format!("{}/{key} revision {}", def.name, entry.revision))?;
            let text = match output {
                KvFormat::Json => serde_json::to_string_pretty(&value)? + "\n",
                KvFormat::Yaml => serde_yaml::to_string(&value)?,
            };
            write!(out, "{text}")?;
        }
        KvAction::Keys { bucket } => {
            let def = bucket_of(bus, &bucket)?;
            let store = open(bus, def).await?;
            let mut keys: Vec<String> = store.keys().await?.try_collect().await?;
            keys.sort();
            for key in keys {
                writeln!(out, "{key}")?;
            }
        }
    }
    Ok(())
}
