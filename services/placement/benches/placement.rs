//! Placement at fleet scale: every deployment placed from scratch over
//! 1,000 clusters, and the incremental re-plan after one cluster fails
//! (only the deployments that ran on it). The baseline printed first is
//! one pass of the filters alone over the fleet, so the figures can be read
//! as multiples of "looking at every cluster once".

#![allow(clippy::expect_used)] // bench set-up: a panic is a broken bench

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use flotilla_placement::fleet::{Availability, ClusterView, Commitments, Fleet, GpuGroup};
use flotilla_placement::scheduler::{Settings, place};
use flotilla_placement::spec::{self, DeploymentRequest};
use flotilla_proto::v1;

const CLUSTERS: usize = 1_000;
const DEPLOYMENTS: usize = 10_000;

fn fleet() -> Fleet {
    let regions = ["eu-west", "eu-north", "us-east", "us-west", "ap-south"];
    let types = [
        ("H100-80GB", 80u64, 8u32, 3.0),
        ("A100-80GB", 80, 8, 2.0),
        ("L4-24GB", 24, 4, 0.7),
        ("A10-24GB", 24, 4, 0.6),
    ];
    let clusters = (0..CLUSTERS)
        .map(|i| {
            let (model, mem, count, cost) = types[i % types.len()];
            let mut labels = BTreeMap::new();
            labels.insert("region".to_string(), regions[i % regions.len()].to_string());
            labels.insert(
                "env".to_string(),
                if i % 10 == 0 { "canary" } else { "prod" }.to_string(),
            );
            let taints = if i % 7 == 0 {
                vec![v1::Taint {
                    key: "spot".into(),
                    value: "true".into(),
                    effect: v1::TaintEffect::NoSchedule.into(),
                }]
            } else {
                vec![]
            };
            ClusterView {
                name: format!("cluster-{i:04}"),
                labels,
                taints,
                availability: Availability::Available,
                cordoned: None,
                gpus: vec![GpuGroup {
                    model: model.into(),
                    memory_bytes: mem << 30,
                    largest_free_bytes: mem << 30,
                    count: count * 8,
                    allocated: 0,
                    per_node: vec![count * 8],
                }],
                cost_per_gpu_hour: cost + (i % 13) as f64 * 0.01,
                cached_models: vec![],
            }
        })
        .collect();
    Fleet::new(clusters)
}

fn deployments() -> Vec<DeploymentRequest> {
    (0..DEPLOYMENTS)
        .map(|i| {
            let placement = match i % 4 {
                0 => r#"{"policy": "PickN", "numberOfClusters": 2, "topologySpread": [{"topologyKey": "region", "maxSkew": 1}]}"#.to_string(),
                1 => r#"{"policy": "PickN", "numberOfClusters": 3, "affinity": {"required": [{"labelSelector": {"matchLabels": {"env": "prod"}}}], "preferred": [{"weight": 60, "propertySorter": {"name": "cost.perGpuHour", "order": "Ascending"}}]}}"#.to_string(),
                2 => r#"{"policy": "PickN", "numberOfClusters": 1, "tolerations": [{"key": "spot", "operator": "Exists"}]}"#.to_string(),
                _ => format!(r#"{{"policy": "PickFixed", "clusterNames": ["cluster-{:04}", "cluster-{:04}"]}}"#, i % CLUSTERS, (i * 7 + 3) % CLUSTERS),
            };
            let (model, types) = match i % 3 {
                0 => ("smollm2-135m-instruct", r#"[]"#),
                1 => ("qwen2.5-7b-instruct", r#"["H100", "A100", "L4"]"#),
                _ => ("llama-3.1-8b-instruct", r#"["H100", "A100"]"#),
            };
            let json = format!(
                r#"{{"metadata": {{"name": "d-{i:05}"}}, "spec": {{"model": {{"preset": "{model}"}}, "runtime": "vllm", "replicas": {},
                    "resources": {{"gpu": {{"types": {types}}}}}, "placement": {placement}}}}}"#,
                1 + i % 4
            );
            let doc: v1::ModelDeployment = flotilla_proto::codec::decode_json(json.as_bytes()).expect("bench document");
            spec::validate(&doc).expect("valid bench document")
        })
        .collect()
}

/// Places every deployment in order, each seeing the GPUs the earlier ones took.
fn place_all(
    fleet: &Fleet,
    requests: &[DeploymentRequest],
) -> (Commitments, Vec<v1::PlacementDecision>) {
    let settings = Settings::default();
    let mut held = Commitments::default();
    let mut records = Vec::with_capacity(requests.len());
    for r in requests {
        let d = place(r, fleet, &held, None, &settings);
        let record = d.assignments_record(r, fleet);
        held.add(&record);
        records.push(record);
    }
    (held, records)
}

fn bench(c: &mut Criterion) {
    let fleet = fleet();
    let requests = deployments();

    // Baseline: one look at every cluster per deployment, filters only.
    let start = Instant::now();
    let mut alive = 0usize;
    for r in &requests {
        for cluster in &fleet.clusters {
            alive += usize::from(
                cluster.availability == Availability::Available
                    && cluster.labels.contains_key("region")
                    && r.replicas > 0,
            );
        }
    }
    let baseline = start.elapsed();
    black_box(alive);
    println!(
        "baseline: {DEPLOYMENTS} deployments x {CLUSTERS} clusters, one cheap check each: {baseline:?}"
    );

    let (held, records) = place_all(&fleet, &requests);
    let placed: u32 = records
        .iter()
        .flat_map(|r| &r.assignments)
        .map(|a| a.replicas)
        .sum();
    println!(
        "full placement places {placed} replicas of {} wanted",
        requests.iter().map(|r| r.replicas).sum::<u32>()
    );

    let mut group = c.benchmark_group("placement");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.bench_function("full: 10k deployments over 1k clusters", |b| {
        b.iter(|| black_box(place_all(&fleet, &requests)))
    });

    // One cluster fails: re-plan only the deployments that ran there.
    let victim = records
        .iter()
        .flat_map(|r| &r.assignments)
        .fold(BTreeMap::<&str, usize>::new(), |mut m, a| {
            *m.entry(a.cluster.as_str()).or_default() += 1;
            m
        })
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(c, _)| c.to_string())
        .expect("some cluster is used");
    let mut failed = fleet.clusters.clone();
    if let Some(c) = failed.iter_mut().find(|c| c.name == victim) {
        c.availability = Availability::Unhealthy("no heartbeat".into());
    }
    let failed = Fleet::new(failed);
    let affected: Vec<usize> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.assignments.iter().any(|a| a.cluster == victim))
        .map(|(i, _)| i)
        .collect();
    println!(
        "incremental: cluster {victim} fails, {} deployments ran on it",
        affected.len()
    );
    group.bench_function("incremental: re-plan after one cluster fails", |b| {
        b.iter(|| {
            let settings = Settings::default();
            let mut held = held.clone();
            for &i in &affected {
                held.remove(&records[i]);
                let d = place(&requests[i], &failed, &held, Some(&records[i]), &settings);
                let record = d.assignments_record(&requests[i], &failed);
                held.add(&record);
                black_box(record);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
