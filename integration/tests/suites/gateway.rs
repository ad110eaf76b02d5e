//! The gateway in front of a real runner: routing by model, API keys,
//! retry on a replica that refuses connections, streaming pass-through,
//! ejection, and the `/metrics` that count all of it.

use std::time::Duration;

use flotilla_integration::fleet;
use flotilla_kit::RecordStore;
use flotilla_proto::v1::{ReplicaPhase, ReplicaStatus};
use serde_json::{Value, json};

use crate::support::{self, poll_until};

#[tokio::test]
async fn routes_by_model_checks_keys_and_skips_a_dead_replica() {
    let (server, bus) = support::bus().await;

    // A real runner.
    let runner = support::runner("smollm2").await;
    let http = reqwest::Client::new();
    // A dead port for a replica that claims to be ready.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    // What executors write.
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, "replicas")
        .await
        .unwrap();
    for (key, id, endpoint, region) in [
        ("eu-1.dead", "dead", format!("http://{dead}"), "eu"),
        ("us-1.live", "live", runner.clone(), "us"),
    ] {
        let r = ReplicaStatus {
            replica_id: id.into(),
            cluster: key.split('.').next().unwrap().into(),
            deployment: "chat".into(),
            phase: ReplicaPhase::Ready.into(),
            endpoint,
            model: "smollm2".into(),
            region: region.into(),
            ..Default::default()
        };
        replicas.update(key, |_| Some(r.clone())).await.unwrap();
    }

    let config = flotilla_gateway::Config {
        // Its own region holds the dead replica: it is tried first.
        region: "eu".into(),
        api_keys: vec!["secret".into()],
        ..fleet::gateway_config(&support::config(&server))
    };
    let gateway = format!("http://{}", fleet::gateway(config).await);

    let chat = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 6});
    let no_key = complete(&http, &gateway, None, &chat).await;
    assert_eq!(no_key.status(), 401);
    let wrong = complete(&http, &gateway, Some("guess"), &chat).await;
    assert_eq!(wrong.status(), 401);

    let models: Value = http
        .get(format!("{gateway}/v1/models"))
        .bearer_auth("secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2");

    let answer = complete(&http, &gateway, Some("secret"), &chat).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["x-flotilla-replica"],
        "live",
        "the dead replica was not skipped"
    );
    let body: Value = answer.json().await.unwrap();
    assert!(!support::text(&body).is_empty(), "{body}");

    let mut unknown = chat.clone();
    unknown["model"] = json!("gpt-9");
    let r = complete(&http, &gateway, Some("secret"), &unknown).await;
    assert_eq!(r.status(), 404);

    let mut streaming = chat.clone();
    streaming["stream"] = json!(true);
    let r = complete(&http, &gateway, Some("secret"), &streaming).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = r.text().await.unwrap();
    assert!(
        text.contains("chat.completion.chunk") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );

    // The runner refuses an empty conversation at once: a 4xx that it
    // served. This third refused connection ejects the dead replica...
    let empty = json!({"model": "smollm2", "messages": []});
    for _ in 0..2 {
        let r = complete(&http, &gateway, Some("secret"), &empty).await;
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["x-flotilla-replica"], "live");
        r.bytes().await.unwrap();
    }

    // ...so the last request went straight to the live one.
    let metrics = scrape(&http, &gateway).await;
    let served = |status: &str| {
        sample(
            &metrics,
            "flotilla_gateway_request_duration_seconds_count",
            &[
                ("model", "smollm2"),
                ("cluster", "us-1"),
                ("status", status),
            ],
        )
    };
    assert_eq!(served("2xx"), 2.0, "{metrics}");
    assert_eq!(served("4xx"), 2.0, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "flotilla_gateway_request_duration_seconds_count",
            &[("model", ""), ("cluster", ""), ("status", "4xx")],
        ),
        1.0,
        "the unknown model: {metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "flotilla_gateway_request_duration_seconds_count",
            &[("cluster", "eu-1")],
        ),
        0.0,
        "the dead replica served nothing: {metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "flotilla_gateway_time_to_first_byte_seconds_count",
            &[("model", "smollm2"), ("cluster", "us-1")],
        ),
        4.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "flotilla_gateway_retries_total",
            &[("model", "smollm2")]
        ),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "flotilla_gateway_ejections_total",
            &[("replica", "dead"), ("cluster", "eu-1")],
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "flotilla_gateway_ejections_total",
            &[("replica", "live")]
        ),
        0.0,
        "{metrics}"
    );

    // Nothing stays in flight once every answer has been read; the count
    // drops when the server lets go of the relayed body.
    poll_until(
        Duration::from_secs(5),
        "zero requests in flight to either replica",
        || async {
            let metrics = scrape(&http, &gateway).await;
            let live = sample(
                &metrics,
                "flotilla_gateway_replica_in_flight",
                &[
                    ("replica", "live"),
                    ("cluster", "us-1"),
                    ("model", "smollm2"),
                ],
            );
            let dead = sample(
                &metrics,
                "flotilla_gateway_replica_in_flight",
                &[("replica", "dead")],
            );
            (live == 0.0 && dead == 0.0 && metrics.contains("replica=\"live\"")).then_some(())
        },
    )
    .await;
}

/// A chat completion through the gateway, with `key` as the bearer token
/// when given.
async fn complete(
    http: &reqwest::Client,
    gateway: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut request = http.post(format!("{gateway}/v1/chat/completions"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.json(body).send().await.unwrap()
}

async fn scrape(http: &reqwest::Client, gateway: &str) -> String {
    let r = http
        .get(format!("{gateway}/metrics"))
        .bearer_auth("secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// The sum of the samples of `name` whose labels include all of `labels`
/// (0 when none): Prometheus text, one sample per line.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            if !(rest.is_empty() || rest.starts_with('{')) {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Two real runners behind a cache-aware gateway: a second request that
/// shares a long system prompt with the first meets it on the same
/// replica and is served from that replica's prefix cache; bumping the
/// replica's `restarts` in KV (a restarted runner has an empty cache)
/// empties what the gateway predicts it holds.
#[tokio::test]
async fn cache_aware_routing_meets_the_prefix_and_forgets_a_restarted_replica() {
    let (server, bus) = support::bus().await;
    let first = support::runner("smollm2").await;
    let second = support::runner("smollm2").await;
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, "replicas")
        .await
        .unwrap();
    let record = |id: &str, endpoint: &str, restarts: u32| ReplicaStatus {
        replica_id: id.into(),
        cluster: "local".into(),
        deployment: "chat".into(),
        phase: ReplicaPhase::Ready.into(),
        endpoint: endpoint.into(),
        model: "smollm2".into(),
        region: "local".into(),
        restarts,
        ..Default::default()
    };
    for (id, endpoint) in [("r-1", &first), ("r-2", &second)] {
        let r = record(id, endpoint, 0);
        replicas
            .update(&format!("local.{id}"), |_| Some(r.clone()))
            .await
            .unwrap();
    }
    let config = flotilla_gateway::Config {
        region: "local".into(),
        api_keys: vec!["secret".into()],
        ..fleet::gateway_config(&support::config(&server))
    };
    assert_eq!(
        config.routing,
        flotilla_gateway::routing::Policy::CacheAware
    );
    let gateway = format!("http://{}", fleet::gateway(config).await);
    let http = reqwest::Client::new();
    poll_until(
        Duration::from_secs(20),
        "both replicas routable",
        || async {
            let m: Value = http
                .get(format!("{gateway}/v1/models"))
                .bearer_auth("secret")
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (m["data"][0]["id"] == "smollm2").then_some(())
        },
    )
    .await;

    let system = "You answer questions about the fleet's shipping policy. ".repeat(40);
    let ask = |question: &str| {
        json!({"model": "smollm2", "temperature": 0, "max_tokens": 3, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ]})
    };
    let answer = complete(&http, &gateway, Some("secret"), &ask("Where is my parcel?")).await;
    assert_eq!(answer.status(), 200);
    let holder = answer.headers()["x-flotilla-replica"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = answer.json().await.unwrap();
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "a fresh runner had nothing cached: {body}"
    );

    let answer = complete(&http, &gateway, Some("secret"), &ask("Can I return it?")).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["x-flotilla-replica"].to_str().unwrap(),
        holder,
        "the shared prompt went elsewhere"
    );
    let body: Value = answer.json().await.unwrap();
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached * 10 >= prompt * 8,
        "only {cached} of {prompt} prompt tokens came from the cache"
    );

    let held = sample(
        &scrape(&http, &gateway).await,
        "flotilla_gateway_prefix_blocks",
        &[("replica", holder.as_str())],
    );
    assert!(held > 0.0, "the gateway predicts nothing on {holder}");
    let endpoint = if holder == "r-1" { &first } else { &second };
    let restarted = record(&holder, endpoint, 1);
    replicas
        .update(&format!("local.{holder}"), |_| Some(restarted.clone()))
        .await
        .unwrap();
    poll_until(
        Duration::from_secs(10),
        "the restarted replica's prefixes forgotten",
        || async {
            let held = sample(
                &scrape(&http, &gateway).await,
                "flotilla_gateway_prefix_blocks",
                &[("replica", holder.as_str())],
            );
            (held == 0.0).then_some(())
        },
    )
    .await;
}

/// What the gateway relayed, summed per replica and published on
/// `<prefix>.traffic.<gateway>`: each request counted once by outcome,
/// with its time to first byte and duration, under the replica's template.
#[tokio::test]
async fn traffic_summaries_count_every_request_by_replica_version_and_outcome() {
    use flotilla_proto::v1::{GatewayTraffic, LatencyHistogram};
    use futures::StreamExt;

    let (server, bus) = support::bus().await;
    let runner = support::runner("smollm2").await;
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, "replicas")
        .await
        .unwrap();
    // An id as rollout makes them: `<deployment>-<template>-<hash>`.
    let id = "chat-aaaa1111-0000beef";
    let record = ReplicaStatus {
        replica_id: id.into(),
        cluster: "eu-1".into(),
        deployment: "chat".into(),
        phase: ReplicaPhase::Ready.into(),
        endpoint: runner.clone(),
        model: "smollm2".into(),
        ..Default::default()
    };
    replicas
        .update(&format!("eu-1.{id}"), |_| Some(record.clone()))
        .await
        .unwrap();
    let mut summaries = bus.client.subscribe("flotilla.traffic.*").await.unwrap();
    let config = flotilla_gateway::Config {
        gateway_id: "gw-test".into(),
        traffic_interval: Duration::from_millis(200),
        ..fleet::gateway_config(&support::config(&server))
    };
    let gateway = format!("http://{}", fleet::gateway(config).await);
    let http = reqwest::Client::new();

    // Two whole answers, one streamed, one refused by the replica (400).
    let chat = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 4});
    let first = poll_until(
        Duration::from_secs(30),
        "the gateway sees the replica",
        || async {
            let r = complete(&http, &gateway, None, &chat).await;
            (r.status() == 200).then_some(r)
        },
    )
    .await;
    first.bytes().await.unwrap();
    let second = complete(&http, &gateway, None, &chat).await;
    assert_eq!(second.status(), 200);
    second.bytes().await.unwrap();
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let third = complete(&http, &gateway, None, &streamed).await;
    assert_eq!(third.status(), 200);
    assert!(
        String::from_utf8(third.bytes().await.unwrap().to_vec())
            .unwrap()
            .contains("[DONE]")
    );
    let mut bad = chat.clone();
    bad["temperature"] = json!(-1);
    let fourth = complete(&http, &gateway, None, &bad).await;
    assert_eq!(fourth.status(), 400);
    fourth.bytes().await.unwrap();

    // Summed over the windows they fell in.
    let mut total = flotilla_proto::v1::ReplicaTraffic::default();
    let mut ttfb = LatencyHistogram::default();
    let mut duration = LatencyHistogram::default();
    tokio::time::timeout(Duration::from_secs(30), async {
        while total.requests < 4 {
            let msg = summaries.next().await.expect("the subscription ended");
            assert_eq!(msg.subject.as_str(), "flotilla.traffic.gw-test");
            let summary: GatewayTraffic =
                flotilla_proto::codec::decode_protobuf(&msg.payload).unwrap();
            assert_eq!(summary.gateway, "gw-test");
            assert!(summary.window_end_unix_ms >= summary.window_start_unix_ms);
            for r in summary.replicas {
                assert_eq!(r.replica, id);
                assert_eq!(r.template, "aaaa1111");
                assert_eq!(r.deployment, "chat");
                assert_eq!(r.model, "smollm2");
                assert_eq!(r.cluster, "eu-1");
                total.requests += r.requests;
                total.succeeded += r.succeeded;
                total.client_errors += r.client_errors;
                total.server_errors += r.server_errors;
                total.broken += r.broken;
                assert!(ttfb.merge(&r.time_to_first_byte.unwrap_or_default()));
                assert!(duration.merge(&r.duration.unwrap_or_default()));
            }
        }
    })
    .await
    .expect("no summary of all four requests within 30 s");
    // The poll's first tries found no replica yet: counted nowhere.
    assert_eq!(total.requests, 4, "{total:?}");
    assert_eq!(total.succeeded, 3);
    assert_eq!(total.client_errors, 1);
    assert_eq!(total.server_errors + total.broken, 0);
    assert_eq!(ttfb.count(), 4);
    assert_eq!(duration.count(), 4);
    assert!(duration.sum_seconds >= ttfb.sum_seconds);

    // `flotilla rollout status --traffic` reads the same summaries: the
    // version being rolled out, under load while it listens.
    let rollouts = RecordStore::<flotilla_proto::v1::RolloutState>::open(&bus, "rollouts")
        .await
        .unwrap();
    let state = flotilla_proto::v1::RolloutState {
        deployment: "chat".into(),
        template: "aaaa1111".into(),
        phase: flotilla_proto::v1::RolloutPhase::Progressing.into(),
        ..Default::default()
    };
    rollouts
        .update("chat", |_| Some(state.clone()))
        .await
        .unwrap();
    let load = tokio_util::sync::CancellationToken::new();
    let loading = {
        let (load, gateway, chat) = (load.clone(), gateway.clone(), chat.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !load.is_cancelled() {
                let r = complete(&http, &gateway, None, &chat).await;
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
            }
        })
    };
    let mut out = Vec::new();
    flotilla_cli::rollouts::status(
        &bus,
        "chat",
        flotilla_cli::Output::Table,
        Some(Duration::from_secs(2)),
        &mut out,
    )
    .await
    .unwrap();
    load.cancel();
    loading.await.unwrap();
    let out = String::from_utf8(out).unwrap();
    let row = out
        .lines()
        .find(|l| l.starts_with("new"))
        .unwrap_or_else(|| panic!("no row of the new version:\n{out}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "aaaa1111", "{out}");
    assert!(cells[2].parse::<u64>().unwrap() > 0, "{out}");
    assert_eq!(cells[3], "0.0%", "{out}");
}

/// During a rollout with a traffic split, the gateway gives the new
/// version its share of the requests however many replicas each version
/// has, keeps a session on one version, and sends the new version nothing
/// once the rollout halts.
#[tokio::test]
async fn a_rollouts_traffic_split_is_honoured_whatever_the_replica_counts_and_sticky_by_session() {
    use flotilla_proto::v1::{RolloutPhase, RolloutState, TrafficSplit};

    let (server, bus) = support::bus().await;
    let runner = support::runner("smollm2").await;
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, "replicas")
        .await
        .unwrap();
    // Three replicas of the old version, one of the new.
    let old = [
        "chat-aaaa1111-00000001",
        "chat-aaaa1111-00000002",
        "chat-aaaa1111-00000003",
    ];
    let new = "chat-bbbb2222-00000004";
    for id in old.iter().chain([&new]) {
        let r = ReplicaStatus {
            replica_id: id.to_string(),
            cluster: "eu-1".into(),
            deployment: "chat".into(),
            phase: ReplicaPhase::Ready.into(),
            endpoint: runner.clone(),
            model: "smollm2".into(),
            ..Default::default()
        };
        replicas
            .update(&format!("eu-1.{id}"), |_| Some(r.clone()))
            .await
            .unwrap();
    }
    let rollouts = RecordStore::<RolloutState>::open(&bus, "rollouts")
        .await
        .unwrap();
    let split = |new_percent: u32, phase: RolloutPhase| RolloutState {
        deployment: "chat".into(),
        template: "bbbb2222".into(),
        phase: phase.into(),
        traffic: Some(TrafficSplit {
            new_template: "bbbb2222".into(),
            new_percent,
        }),
        ..Default::default()
    };
    let canary = split(10, RolloutPhase::Progressing);
    rollouts
        .update("chat", |_| Some(canary.clone()))
        .await
        .unwrap();
    let gateway = format!(
        "http://{}",
        fleet::gateway(fleet::gateway_config(&support::config(&server))).await
    );
    let http = reqwest::Client::new();
    let ask = |user: Option<String>, session: Option<&'static str>| {
        let (http, gateway) = (http.clone(), gateway.clone());
        async move {
            let mut body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 1});
            if let Some(user) = user {
                body["user"] = json!(user);
            }
            let mut request = http
                .post(format!("{gateway}/v1/chat/completions"))
                .json(&body);
            if let Some(session) = session {
                request = request.header("x-session-id", session);
            }
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            let replica = r
                .headers()
                .get("x-flotilla-replica")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            r.bytes().await.unwrap();
            (status, replica)
        }
    };
    poll_until(
        Duration::from_secs(30),
        "the gateway sees the replicas",
        || async { (ask(None, None).await.0 == 200).then_some(()) },
    )
    .await;

    // 300 users: about 10 % to the one new replica, not the 25 % the
    // replica count would give.
    let mut to_new = 0;
    for i in 0..300 {
        let (status, replica) = ask(Some(format!("user-{i}")), None).await;
        assert_eq!(status, 200);
        to_new += u32::from(replica == new);
    }
    eprintln!("the new version took {to_new} of 300 requests (configured 10 %)");
    assert!(
        (14..=46).contains(&to_new),
        "{to_new} of 300 to the new version"
    );

    // A session stays on one version.
    for session in ["conv-1", "conv-2", "conv-3"] {
        let mut versions = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let (_, replica) = ask(None, Some(session)).await;
            versions.insert(
                flotilla_proto::template_of_replica(&replica)
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(versions.len(), 1, "{session} went to {versions:?}");
    }

    // Halted: the old version takes everything.
    let halted = split(0, RolloutPhase::Halted);
    rollouts
        .update("chat", |_| Some(halted.clone()))
        .await
        .unwrap();
    poll_until(
        Duration::from_secs(10),
        "the gateway sees the halt",
        || async {
            // Among 100 users, some drew the new version before the halt.
            let mut any_new = false;
            for i in 0..100 {
                any_new |= ask(Some(format!("user-{i}")), None).await.1 == new;
            }
            (!any_new).then_some(())
        },
    )
    .await;
}
