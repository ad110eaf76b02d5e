//! Failover between replicas over real TCP connections: a replica that
//! refuses, one that accepts and never answers, and a healthy one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::{Unanswered, first_answer};
use crate::routing::{Candidate, ReplicaLoad};

const PATH: &str = "/v1/chat/completions";
/// Far longer than any test here should take; a failure, not a hang.
const DEADLINE: Duration = Duration::from_secs(30);

fn candidate(id: &str, endpoint: String) -> Candidate {
    Candidate {
        replica_id: id.into(),
        deployment: "chat".into(),
        cluster: "eu-1".into(),
        endpoint,
        load: Arc::new(ReplicaLoad::new(Gauge::default(), Counter::default())),
    }
}

/// A replica that answers every request with its name.
async fn healthy(name: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(PATH, post(move || async move { name }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A replica that accepts connections, reads nothing and never answers;
/// each accepted connection is reported on the channel and held open.
async fn hanging() -> (String, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
            let _ = accepted.send(());
        }
    });
    (format!("http://{addr}"), rx)
}

/// An address nothing listens on: bound, then closed.
async fn refusing() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

fn body() -> Bytes {
    Bytes::from_static(br#"{"model": "smollm2", "stream": true}"#)
}

#[tokio::test]
async fn a_replica_that_accepts_and_never_answers_is_failed_over() {
    let (stuck, mut accepted) = hanging().await;
    let candidates = vec![
        candidate("stuck", stuck),
        candidate("good", healthy("good").await),
    ];
    let stuck_load = Arc::clone(&candidates[0].load);
    let timeout = Duration::from_millis(300);
    let mut retries = 0;
    let started = Instant::now();
    let answer = tokio::time::timeout(
        DEADLINE,
        first_answer(
            &reqwest::Client::new(),
            candidates,
            PATH,
            &body(),
            Some(timeout),
            || retries += 1,
        ),
    )
    .await
    .expect("an answer before the deadline")
    .unwrap_or_else(|failed| panic!("no answer: {failed:?}"));
    let waited = started.elapsed();

    // The stuck replica did take the connection: a hang, not a refusal.
    tokio::time::timeout(DEADLINE, accepted.recv())
        .await
        .expect("the stuck replica accepted")
        .expect("its listener runs");
    assert_eq!(answer.replica.replica_id, "good");
    assert!(
        matches!(&answer.failed[..], [Unanswered::NoHeaders { replica, after }] if replica == "stuck" && *after == timeout),
        "{:?}",
        answer.failed
    );
    assert!(waited >= timeout, "failed over after {waited:?}");
    assert_eq!(retries, 1);
    // The stuck replica's request no longer counts as in flight.
    assert_eq!(stuck_load.in_flight(), 0);
    assert_eq!(answer.replica.load.in_flight(), 1);
    let text = answer.response.text().await.unwrap();
    assert_eq!(text, "good");
}

#[tokio::test]
async fn a_refused_connection_goes_to_the_next_replica_at_once() {
    let candidates = vec![
        candidate("gone", refusing().await),
        candidate("good", healthy("good").await),
    ];
    let answer = tokio::time::timeout(
        DEADLINE,
        first_answer(
            &reqwest::Client::new(),
            candidates,
            PATH,
            &body(),
            None,
            || {},
        ),
    )
    .await
    .expect("an answer before the deadline")
    .unwrap_or_else(|failed| panic!("no answer: {failed:?}"));
    assert_eq!(answer.replica.replica_id, "good");
    assert!(
        matches!(&answer.failed[..], [Unanswered::Unreachable { replica, .. }] if replica == "gone"),
        "{:?}",
        answer.failed
    );
}

#[tokio::test]
async fn when_no_replica_answers_each_says_why_and_three_failures_eject() {
    let (stuck, _accepted) = hanging().await;
    // The same bookkeeping each round, as the routing table keeps it.
    let load = Arc::new(ReplicaLoad::new(Gauge::default(), Counter::default()));
    let timeout = Duration::from_millis(50);
    for round in 1..=3 {
        let candidates = vec![
            candidate("gone", refusing().await),
            Candidate {
                load: Arc::clone(&load),
                ..candidate("stuck", stuck.clone())
            },
        ];
        let failed = tokio::time::timeout(
            DEADLINE,
            first_answer(
                &reqwest::Client::new(),
                candidates,
                PATH,
                &body(),
                Some(timeout),
                || {},
            ),
        )
        .await
        .expect("done before the deadline")
        .err()
        .expect("no replica answers");
        let why: Vec<String> = failed.iter().map(ToString::to_string).collect();
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].starts_with("gone: "), "{why:?}");
        assert_eq!(why[1], "stuck: no response headers within 50ms");
        assert_eq!(load.ejected(Instant::now()), round == 3, "round {round}");
    }
}
