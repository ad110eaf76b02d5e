//! `bench-routing`: cache-aware routing against least-in-flight and random
//! routing, same run, same load, on replicas of the shipped model with
//! automatic prefix caching.
//!
//! The workload has the shape of the shared-prefix benchmarks of the field:
//! many customers, each with a long system prompt shared by several users,
//! who ask short questions; Poisson arrivals, stepped up in rate. Each
//! replica's KV budget holds only a share of the customers' prompts, so
//! the prompts fit in the fleet's caches only if each replica specialises.
//!
//! One run starts a nats-server, `--replicas` `flotilla-runner` processes
//! (one thread each by default, so that they share the CPUs as replicas
//! share a cluster's GPUs), registers them in KV `replicas` as an executor
//! would, and starts one `flotilla-gateway` per policy in front of the
//! same replicas. Policy after policy, each with its own customers (so
//! that no policy profits from another's cache): every customer once,
//! unmeasured (a fleet that has been serving them), then each rate in
//! turn, the same requests at the same Poisson times for every policy. It prints
//! per policy and rate: requests completed, TTFT and end-to-end p50/p90,
//! output tokens per second, and the prefix-cache hit rate the runners
//! report (`usage.prompt_tokens_details.cached_tokens`).
//!
//! Then two same-run baselines: one replica with prefix caching against
//! one started with `--no-prefix-cache` (TTFT ratio on this workload), and
//! the routing decision's own cost at prompt sizes from 1 KB to 1 MB,
//! timed in-process on one thread.
//!
//! ```text
//! scripts/bench-routing            # builds, then runs with the defaults
//! ```

#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use flotilla_integration::bench::{cpu_line, free_port, wait_until};
use flotilla_integration::{NatsServer, shipped_model};
use flotilla_kit::RecordStore;
use flotilla_proto::v1::{ReplicaPhase, ReplicaStatus};
use futures::StreamExt;
use tokio::process::{Child, Command};

const MODEL: &str = "smollm2";

#[derive(Debug, Parser)]
struct Args {
    /// Runner replicas behind the gateways.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Threads of each runner's forward pass.
    #[arg(long, default_value_t = 1)]
    runner_threads: usize,
    /// Customers, each with its own long system prompt.
    #[arg(long, default_value_t = 12)]
    customers: usize,
    /// Users of each customer (they share its system prompt).
    #[arg(long, default_value_t = 4)]
    users: usize,
    /// Words of each system prompt (about 1.3 tokens each).
    #[arg(long, default_value_t = 230)]
    prefix_words: usize,
    /// Words of each question.
    #[arg(long, default_value_t = 12)]
    question_words: usize,
    /// Tokens generated per answer.
    #[arg(long, default_value_t = 12)]
    max_tokens: usize,
    /// KV budget of each replica, in prompts: the fleet's caches hold
    /// `replicas × this` customers' prompts, fewer than `customers`
    /// unless each replica keeps to its own.
    #[arg(long, default_value_t = 6.5)]
    budget_prompts: f64,
    /// Arrival rates stepped through, requests per second.
    #[arg(long, value_delimiter = ',', default_value = "0.75,1.5,2.25")]
    rates: Vec<f64>,
    /// Requests per policy and rate.
    #[arg(long, default_value_t = 48)]
    requests: usize,
    /// Policies compared, each behind its own gateway.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "random,least-in-flight,cache-aware"
    )]
    policies: Vec<String>,
    /// Skip the single-replica comparison with and without prefix caching.
    #[arg(long)]
    skip_single: bool,
    /// Only time the routing decision (no replicas).
    #[arg(long)]
    decision_only: bool,
    /// Where `flotilla-runner` and `flotilla-gateway` are; default: next to
    /// this binary.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// A small deterministic generator (xorshift64*): the same seed gives the
/// same prompts and arrival times on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

const WORDS: &[&str] = &[
    "account",
    "balance",
    "policy",
    "refund",
    "shipment",
    "order",
    "invoice",
    "customer",
    "service",
    "support",
    "product",
    "warranty",
    "return",
    "delivery",
    "payment",
    "credit",
    "billing",
    "address",
    "contract",
    "renewal",
    "discount",
    "coupon",
    "loyalty",
    "member",
    "premium",
    "standard",
    "express",
    "tracking",
    "package",
    "carrier",
    "warehouse",
    "stock",
    "supplier",
    "vendor",
    "catalog",
    "pricing",
    "quote",
    "estimate",
    "schedule",
    "appointment",
    "technician",
    "repair",
    "replacement",
    "device",
    "software",
    "license",
    "subscription",
    "upgrade",
    "downgrade",
    "cancel",
    "escalate",
    "manager",
    "ticket",
    "priority",
    "urgent",
    "always",
    "never",
    "politely",
    "clearly",
    "briefly",
    "verify",
    "identity",
    "before",
    "after",
    "during",
    "within",
    "business",
    "days",
    "hours",
    "region",
    "country",
    "language",
    "english",
    "french",
    "german",
    "spanish",
    "holiday",
    "weekend",
    "morning",
    "evening",
];

fn words(rng: &mut Rng, n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(WORDS[rng.below(WORDS.len())]);
    }
    out
}

/// One customer's system prompt: a name that differs from the first
/// word, then rules.
fn system_prompt(rng: &mut Rng, tag: &str, words_n: usize) -> String {
    format!(
        "You are the assistant of customer {tag}. Follow these rules: {}.",
        words(rng, words_n)
    )
}

fn spawn(binary: &Path, args: &[String], threads: usize) -> anyhow::Result<Child> {
    Command::new(binary)
        .args(args)
        .env("RUST_LOG", "warn")
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} (build it first)", binary.display()))
}

/// What one request measured; `None` fields when it failed.
#[derive(Debug, Clone, Default)]
struct Outcome {
    ok: bool,
    ttft: f64,
    e2e: f64,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    finished_at: f64,
    error: String,
}

/// Sends one streamed chat completion and reads it to the end.
async fn one_request(
    http: &reqwest::Client,
    base: &str,
    system: &str,
    question: &str,
    max_tokens: usize,
    t0: Instant,
) -> Outcome {
    let start = Instant::now();
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
    });
    let mut out = Outcome::default();
    let response = match http
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            out.error = e.to_string();
            return out;
        }
    };
    if !response.status().is_success() {
        out.error = format!(
            "{}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
        return out;
    }
    let mut stream = response.bytes_stream();
    let mut pending = Vec::<u8>::new();
    let mut first = None;
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            out.error = "the stream broke".into();
            return out;
        };
        pending.extend_from_slice(&chunk);
        while let Some(at) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..at + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data.trim() == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                    continue;
                };
                let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
                if first.is_none() && !content.is_empty() {
                    first = Some(start.elapsed().as_secs_f64());
                }
                if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
                    out.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0);
                    out.completion_tokens = usage["completion_tokens"].as_u64().unwrap_or(0);
                    out.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0);
                }
            }
        }
    }
    if !done {
        out.error = "the stream ended without [DONE]".into();
        return out;
    }
    out.ok = true;
    out.e2e = start.elapsed().as_secs_f64();
    out.ttft = first.unwrap_or(out.e2e);
    out.finished_at = t0.elapsed().as_secs_f64();
    out
}

/// One customer set: system prompts and users' questions.
struct Workload {
    prompts: Vec<String>,
}

/// What one step (policy, rate) measured.
struct Step {
    sent: usize,
    outcomes: Vec<Outcome>,
    seconds: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

impl Step {
    fn completed(&self) -> usize {
        self.outcomes.iter().filter(|o| o.ok).count()
    }
    fn sorted(&self, f: impl Fn(&Outcome) -> f64) -> Vec<f64> {
        let mut v: Vec<f64> = self.outcomes.iter().filter(|o| o.ok).map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    }
    fn output_rate(&self) -> f64 {
        let tokens: u64 = self.outcomes.iter().map(|o| o.completion_tokens).sum();
        tokens as f64 / self.seconds.max(1e-9)
    }
    fn hit_rate(&self) -> f64 {
        let prompt: u64 = self.outcomes.iter().map(|o| o.prompt_tokens).sum();
        let cached: u64 = self.outcomes.iter().map(|o| o.cached_tokens).sum();
        cached as f64 / prompt.max(1) as f64
    }
}

/// Arrival offsets (seconds) of `n` Poisson arrivals at `rate`, and the
/// (customer, user) of each.
fn schedule(
    rng: &mut Rng,
    n: usize,
    rate: f64,
    customers: usize,
    users: usize,
) -> Vec<(f64, usize, usize)> {
    let mut at = 0.0;
    (0..n)
        .map(|_| {
            at += -rng.unit().ln() / rate;
            (at, rng.below(customers), rng.below(users))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn run_step(
    http: &reqwest::Client,
    base: &str,
    workload: &Workload,
    arrivals: &[(f64, usize, usize)],
    questions: &[String],
    max_tokens: usize,
) -> Step {
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(arrivals.len());
    for (i, &(at, customer, user)) in arrivals.iter().enumerate() {
        let wait = Duration::from_secs_f64(at).saturating_sub(t0.elapsed());
        tokio::time::sleep(wait).await;
        let http = http.clone();
        let base = base.to_string();
        let system = workload.prompts[customer].clone();
        let question = format!("I am user {user}. {}", questions[i]);
        tasks.push(tokio::spawn(async move {
            one_request(&http, &base, &system, &question, max_tokens, t0).await
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.unwrap_or_default());
    }
    let seconds = outcomes
        .iter()
        .map(|o| o.finished_at)
        .fold(0.0, f64::max)
        .max(arrivals.last().map_or(0.0, |a| a.0));
    Step {
        sent: arrivals.len(),
        outcomes,
        seconds,
    }
}

/// Starts a runner; returns its process and base URL once it answers.
async fn start_runner(
    bin_dir: &Path,
    model: &Path,
    threads: usize,
    budget_tokens: usize,
    extra: &[&str],
) -> anyhow::Result<(Child, String)> {
    let addr = free_port()?;
    let mut args = vec![
        "--model".to_string(),
        model.display().to_string(),
        "--served-model-name".into(),
        MODEL.into(),
        "--addr".into(),
        addr.to_string(),
        "--kv-cache-budget".into(),
        budget_tokens.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let child = spawn(&bin_dir.join("flotilla-runner"), &args, threads)?;
    let url = format!("http://{addr}");
    wait_until(&format!("{url}/health"), "", None, Duration::from_secs(180)).await?;
    Ok((child, url))
}

fn row(policy: &str, rate: f64, s: &Step) {
    let ttft = s.sorted(|o| o.ttft);
    let e2e = s.sorted(|o| o.e2e);
    println!(
        "| {policy:<15} | {rate:>5.2} | {:>3}/{:<3} | {:>7.3} | {:>7.3} | {:>7.3} | {:>7.3} | {:>7.1} | {:>5.1} % |",
        s.completed(),
        s.sent,
        percentile(&ttft, 0.5),
        percentile(&ttft, 0.9),
        percentile(&e2e, 0.5),
        percentile(&e2e, 0.9),
        s.output_rate(),
        100.0 * s.hit_rate(),
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.replicas == 0 || args.customers == 0 || args.users == 0 || args.requests == 0 {
        bail!("--replicas, --customers, --users and --requests must be at least 1");
    }
    if args.rates.iter().any(|r| r.is_nan() || *r <= 0.0) {
        bail!("--rates: every rate must be above 0");
    }
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no folder of this binary")?
            .to_path_buf(),
    };
    let model = args.model.clone().unwrap_or_else(shipped_model);
    if !model.is_file() {
        bail!("{} missing; run scripts/install-tools", model.display());
    }
    println!("bench-routing: cpu {}", cpu_line());
    if args.decision_only {
        decision_time();
        return Ok(());
    }

    // The prompts' size in tokens, measured on a runner, sets the budget.
    let mut rng = Rng::new(args.seed);
    let probe_prompt = system_prompt(&mut rng, "probe", args.prefix_words);
    let (probe, probe_url) =
        start_runner(&bin_dir, &model, args.runner_threads, 1 << 20, &[]).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let measured = one_request(
        &http,
        &probe_url,
        &probe_prompt,
        "Hello?",
        1,
        Instant::now(),
    )
    .await;
    drop(probe);
    if !measured.ok {
        bail!("the probe request failed: {}", measured.error);
    }
    let prompt_tokens = measured.prompt_tokens as usize;
    let budget_tokens = (args.budget_prompts * prompt_tokens as f64).ceil() as usize;
    // The gateway counts a replica's cache in prompt text at 4 bytes a
    // token; this workload's words run longer, so it is told the budget
    // in its own units, as an operator would size it from the traffic.
    let bytes_per_token = probe_prompt.len() as f64 / prompt_tokens.max(1) as f64;
    let gateway_tokens = (budget_tokens as f64 * bytes_per_token / 4.0).ceil() as usize;
    println!(
        "workload: {} customers × {} users, system prompts of ~{prompt_tokens} tokens, questions of {} words, {} tokens out; {} replicas ({} thread each), KV budget {budget_tokens} tokens each ({} prompts; the fleet holds {:.0} of {} customers' prompts); gateways told {gateway_tokens} tokens at 4 bytes each ({bytes_per_token:.1} bytes a token here)",
        args.customers,
        args.users,
        args.question_words,
        args.max_tokens,
        args.replicas,
        args.runner_threads,
        args.budget_prompts,
        args.budget_prompts * args.replicas as f64,
        args.customers,
    );

    let server = NatsServer::start().await?;
    let bus = server.provisioned_bus("bench").await?;
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, "replicas").await?;
    let mut runners = Vec::new();
    for i in 0..args.replicas {
        let (child, url) =
            start_runner(&bin_dir, &model, args.runner_threads, budget_tokens, &[]).await?;
        let id = format!("bench-{i}");
        let record = ReplicaStatus {
            replica_id: id.clone(),
            cluster: "local".into(),
            deployment: "bench".into(),
            phase: ReplicaPhase::Ready.into(),
            endpoint: url,
            model: MODEL.into(),
            region: "local".into(),
            ..Default::default()
        };
        replicas
            .update(&format!("local.{id}"), |_| Some(record.clone()))
            .await?;
        runners.push(child);
    }
    let mut gateways = Vec::new();
    for policy in &args.policies {
        let addr = free_port()?;
        let child = spawn(
            &bin_dir.join("flotilla-gateway"),
            &[
                "--nats-url".into(),
                server.url(),
                "--listen".into(),
                addr.to_string(),
                "--region".into(),
                "local".into(),
                "--routing".into(),
                policy.clone(),
                "--prefix-cache-tokens".into(),
                gateway_tokens.to_string(),
            ],
            1,
        )?;
        let url = format!("http://{addr}");
        wait_until(
            &format!("{url}/v1/models"),
            MODEL,
            None,
            Duration::from_secs(30),
        )
        .await?;
        gateways.push((policy.clone(), url, child));
    }

    // Each policy's own customers, the same arrivals and questions.
    let workloads: Vec<Workload> = (0..args.policies.len())
        .map(|p| Workload {
            prompts: (0..args.customers)
                .map(|c| system_prompt(&mut rng, &format!("{p}-{c}"), args.prefix_words))
                .collect(),
        })
        .collect();
    println!();
    println!(
        "| policy          | req/s | done    | TTFT p50 | TTFT p90 | e2e p50 | e2e p90 | out tok/s | cache hits |"
    );
    println!(
        "|-----------------|-------|---------|---------|---------|---------|---------|---------|---------|"
    );
    // The same arrivals and questions at each rate for every policy.
    type Arrivals = Vec<(f64, usize, usize)>;
    let steps: Vec<(f64, Arrivals, Vec<String>)> = args
        .rates
        .iter()
        .map(|&rate| {
            let arrivals = schedule(&mut rng, args.requests, rate, args.customers, args.users);
            let questions = (0..args.requests)
                .map(|_| format!("{}?", words(&mut rng, args.question_words)))
                .collect();
            (rate, arrivals, questions)
        })
        .collect();
    let mut results: Vec<(String, f64, Step)> = Vec::new();
    for (p, (policy, url, _)) in gateways.iter().enumerate() {
        // Warm-up, unmeasured: every customer once, all at once, as a
        // fleet that has been serving them would be. The rates then go
        // up with the policy's caches as its own traffic left them.
        let warm: Vec<(f64, usize, usize)> = (0..args.customers).map(|c| (0.0, c, 0)).collect();
        let warm_questions: Vec<String> = (0..args.customers)
            .map(|c| format!("Hello from {c}?"))
            .collect();
        let warmed = run_step(
            &http,
            url,
            &workloads[p],
            &warm,
            &warm_questions,
            args.max_tokens,
        )
        .await;
        if let Some(failed) = warmed.outcomes.iter().find(|o| !o.ok) {
            bail!("{policy}: a warm-up request failed: {}", failed.error);
        }
        for (rate, arrivals, questions) in &steps {
            let step = run_step(
                &http,
                url,
                &workloads[p],
                arrivals,
                questions,
                args.max_tokens,
            )
            .await;
            row(policy, *rate, &step);
            if let Some(failed) = step.outcomes.iter().find(|o| !o.ok) {
                println!(
                    "|   first failure: {}",
                    failed.error.chars().take(160).collect::<String>()
                );
            }
            results.push((policy.clone(), *rate, step));
        }
    }
    println!();
    summarise(&results);
    drop(gateways);
    drop(runners);

    if !args.skip_single {
        single_replica(&args, &bin_dir, &model, budget_tokens, &http, &mut rng).await?;
    }
    decision_time();
    println!(
        "reproduce: scripts/bench-routing {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

/// Cache-aware against least-in-flight at the highest rate where
/// least-in-flight completed every request, and output throughput at the
/// highest rate run.
fn summarise(results: &[(String, f64, Step)]) {
    let find = |policy: &str, rate: f64| {
        results
            .iter()
            .find(|(p, r, _)| p == policy && *r == rate)
            .map(|(_, _, s)| s)
    };
    let rates: Vec<f64> = {
        let mut r: Vec<f64> = results.iter().map(|(_, r, _)| *r).collect();
        r.sort_by(f64::total_cmp);
        r.dedup();
        r
    };
    let p90 = |s: &Step| percentile(&s.sorted(|o| o.ttft), 0.9);
    let compare = |rate: f64, why: &str| {
        if let (Some(lif), Some(ca)) = (find("least-in-flight", rate), find("cache-aware", rate)) {
            println!(
                "at {rate} req/s ({why}): TTFT p90 cache-aware / least-in-flight = {:.3} / {:.3} s = {:.3} (goal ≤ 0.2)",
                p90(ca),
                p90(lif),
                p90(ca) / p90(lif)
            );
        }
    };
    // Every request answered; and keeping up as well: answers' tokens
    // came at 90 % of the rate they were asked for (the queue held).
    let completed = rates
        .iter()
        .rev()
        .find(|&&r| find("least-in-flight", r).is_some_and(|s| s.completed() == s.sent));
    let kept_up = rates.iter().rev().find(|&&r| {
        find("least-in-flight", r).is_some_and(|s| {
            let per_request = s.outcomes.iter().map(|o| o.completion_tokens).sum::<u64>() as f64
                / s.outcomes.len().max(1) as f64;
            s.completed() == s.sent && s.output_rate() >= 0.9 * per_request * r
        })
    });
    if let Some(&rate) = kept_up {
        compare(rate, "the highest rate least-in-flight kept up with");
    }
    if let Some(&rate) = completed
        && Some(&rate) != kept_up
    {
        compare(
            rate,
            "the highest rate least-in-flight answered every request, queueing",
        );
    }
    if let Some(&top) = rates.last()
        && let (Some(lif), Some(ca)) = (find("least-in-flight", top), find("cache-aware", top))
    {
        println!(
            "at {top} req/s (the highest rate run): output tok/s cache-aware / least-in-flight = {:.1} / {:.1} = {:.2}× (goal ≥ 1.5×)",
            ca.output_rate(),
            lif.output_rate(),
            ca.output_rate() / lif.output_rate().max(1e-9)
        );
    }
}

/// One replica with prefix caching against one without, the same
/// customers' requests sent to each in turn, one at a time.
async fn single_replica(
    args: &Args,
    bin_dir: &Path,
    model: &Path,
    budget_tokens: usize,
    http: &reqwest::Client,
    rng: &mut Rng,
) -> anyhow::Result<()> {
    let (_with, with_url) =
        start_runner(bin_dir, model, args.runner_threads, budget_tokens, &[]).await?;
    let (_without, without_url) = start_runner(
        bin_dir,
        model,
        args.runner_threads,
        budget_tokens,
        &["--no-prefix-cache"],
    )
    .await?;
    // As many customers as one replica's budget holds: its share of the
    // fleet's under cache-aware routing.
    let customers = (args.customers.div_ceil(args.replicas)).max(1);
    let prompts: Vec<String> = (0..customers)
        .map(|c| system_prompt(rng, &format!("single-{c}"), args.prefix_words))
        .collect();
    let n = args.requests.min(24);
    let mut ttft = [Vec::new(), Vec::new()];
    let mut hits = [0u64, 0u64];
    let mut prompt = [0u64, 0u64];
    for i in 0..n {
        let system = &prompts[i % customers];
        let question = format!("{}?", words(rng, args.question_words));
        // Alternate which goes first, so that neither always meets a
        // warmer machine.
        let order: [usize; 2] = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let url = if k == 0 { &with_url } else { &without_url };
            let o = one_request(
                http,
                url,
                system,
                &question,
                args.max_tokens,
                Instant::now(),
            )
            .await;
            if !o.ok {
                bail!("single-replica request failed: {}", o.error);
            }
            ttft[k].push(o.ttft);
            hits[k] += o.cached_tokens;
            prompt[k] += o.prompt_tokens;
        }
    }
    for t in &mut ttft {
        t.sort_by(f64::total_cmp);
    }
    println!();
    println!(
        "one replica, {n} requests one at a time over {customers} customers' prompts, with and without prefix caching (same run, alternating):"
    );
    println!("| prefix cache | TTFT p50 | TTFT p90 | cache hits |");
    println!("|--------------|----------|----------|------------|");
    for (k, name) in [(0, "on"), (1, "off")] {
        println!(
            "| {name:<12} | {:>8.3} | {:>8.3} | {:>8.1} % |",
            percentile(&ttft[k], 0.5),
            percentile(&ttft[k], 0.9),
            100.0 * hits[k] as f64 / prompt[k].max(1) as f64
        );
    }
    println!(
        "TTFT p50 ratio on/off: {:.3}",
        percentile(&ttft[0], 0.5) / percentile(&ttft[1], 0.5)
    );
    Ok(())
}

/// The routing decision's own cost at growing prompt sizes, timed
/// in-process on this one thread: hashing the prompt's blocks
/// (`PromptHashes::of`) and ordering 8 replicas by score against a warm
/// index in which one replica holds all of the prompt but its last
/// question. Parsing the body, which any gateway does to read `model`,
/// is timed apart.
fn decision_time() {
    use flotilla_gateway::prefix::{PrefixIndex, PromptHashes};
    use flotilla_gateway::routing::{Policy, Standing, decide};
    const PATH: &str = "/v1/chat/completions";
    println!();
    println!("routing decision time, one thread, 8 replicas, warm index (hash + score):");
    println!("| prompt | blocks | decision p50 | decision p99 | JSON parse p50 (apart) |");
    println!("|--------|--------|--------------|--------------|------------------------|");
    let ids: Vec<String> = (0..8).map(|i| format!("replica-{i}")).collect();
    let standings: Vec<Standing<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Standing {
            replica_id: id,
            region: "local",
            in_flight: i as i64 % 3,
            ejected: false,
            queued: 0.0,
            kv_cache_usage: 0.1,
        })
        .collect();
    let mut rng = Rng::new(11);
    for (label, bytes) in [
        ("1 KB", 1usize << 10),
        ("10 KB", 10 << 10),
        ("100 KB", 100 << 10),
        ("400 KB", 400 << 10),
        ("1 MB", 1 << 20),
    ] {
        let mut system = String::with_capacity(bytes + 16);
        while system.len() < bytes {
            system.push_str(WORDS[rng.below(WORDS.len())]);
            system.push(' ');
        }
        let body = |question: &str| {
            serde_json::to_vec(&serde_json::json!({
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                "stream": true,
            }))
            .unwrap_or_default()
        };
        // Every replica holds other prompts; replica 5 holds this one.
        let mut index = PrefixIndex::new(4 << 20);
        for (i, id) in ids.iter().enumerate() {
            for k in 0..4 {
                let other: serde_json::Value =
                    serde_json::from_slice(&body(&format!("other {i} {k}"))).unwrap_or_default();
                let mut v = other.clone();
                v["messages"][0]["content"] =
                    serde_json::Value::String(format!("{i}-{k} {system}"));
                index.record(id, PromptHashes::of(MODEL, PATH, &v).blocks());
            }
        }
        let seen: serde_json::Value =
            serde_json::from_slice(&body("an earlier question")).unwrap_or_default();
        index.record(&ids[5], PromptHashes::of(MODEL, PATH, &seen).blocks());
        let iterations = if bytes >= 400 << 10 { 200 } else { 1000 };
        let mut decisions = Vec::with_capacity(iterations);
        let mut parses = Vec::with_capacity(iterations);
        let mut blocks = 0;
        for n in 0..iterations {
            let raw = body(&format!("question number {n}?"));
            let parse_start = Instant::now();
            let request: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
            parses.push(parse_start.elapsed().as_secs_f64());
            let start = Instant::now();
            let hashes = PromptHashes::of(MODEL, PATH, &request);
            let order = decide(
                Policy::CacheAware,
                "local",
                &standings,
                &hashes,
                &index,
                None,
            );
            decisions.push(start.elapsed().as_secs_f64());
            blocks = hashes.len();
            if order.first() != Some(&5) {
                println!("|   the decision did not pick the replica holding the prompt: {order:?}");
            }
        }
        decisions.sort_by(f64::total_cmp);
        parses.sort_by(f64::total_cmp);
        println!(
            "| {label:<6} | {blocks:>6} | {:>9.1} µs | {:>9.1} µs | {:>19.1} µs |",
            1e6 * percentile(&decisions, 0.5),
            1e6 * percentile(&decisions, 0.99),
            1e6 * percentile(&parses, 0.5),
        );
    }
}
