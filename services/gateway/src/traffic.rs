//! What this gateway relayed, per replica and so per deployment version,
//! summed over a window and published as [`GatewayTraffic`] on
//! `<prefix>.traffic.<gateway>` every `--traffic-interval`: requests,
//! outcomes by class, time to first byte and duration as histograms with
//! the contract's fixed buckets, so that summaries of every gateway
//! instance add up. A window in which nothing was relayed is not
//! published.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use flotilla_kit::sync::lock;
use flotilla_kit::{Bus, now_unix_ms};
use flotilla_proto::codec::{CONTENT_TYPE, Encoding, encode};
use flotilla_proto::v1::{GatewayTraffic, ReplicaTraffic};
use tokio_util::sync::CancellationToken;

use crate::routing::Candidate;

/// Which replica served a request, as the summaries group it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrafficKey {
    pub deployment: String,
    pub model: String,
    pub replica: String,
    pub cluster: String,
}

impl TrafficKey {
    pub fn of(replica: &Candidate, model: &str) -> Self {
        Self {
            deployment: replica.deployment.clone(),
            model: model.to_string(),
            replica: replica.replica_id.clone(),
            cluster: replica.cluster.clone(),
        }
    }
}

/// The window being summed.
#[derive(Debug)]
pub struct Traffic {
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started_unix_ms: i64,
    replicas: HashMap<TrafficKey, ReplicaTraffic>,
}

impl Default for Traffic {
    fn default() -> Self {
        Self {
            window: Mutex::new(Window {
                started_unix_ms: now_unix_ms(),
                replicas: HashMap::new(),
            }),
        }
    }
}

impl Traffic {
    fn with(&self, key: &TrafficKey, change: impl FnOnce(&mut ReplicaTraffic)) {
        let mut window = lock(&self.window);
        let entry = window
            .replicas
            .entry(key.clone())
            .or_insert_with(|| ReplicaTraffic {
                deployment: key.deployment.clone(),
                model: key.model.clone(),
                template: flotilla_proto::template_of_replica(&key.replica)
                    .unwrap_or_default()
                    .to_string(),
                replica: key.replica.clone(),
                cluster: key.cluster.clone(),
                ..Default::default()
            });
        change(entry);
    }

    /// The first byte of the answer went to the client `seconds` after
    /// the request arrived.
    pub fn first_byte(&self, key: &TrafficKey, seconds: f64) {
        self.with(key, |t| {
            t.time_to_first_byte
                .get_or_insert_with(Default::default)
                .observe(seconds);
        });
    }

    /// The request ended (its last byte relayed, or the client gone) with
    /// `status`, `seconds` after it arrived.
    pub fn ended(&self, key: &TrafficKey, status: u16, seconds: f64) {
        self.with(key, |t| {
            t.requests += 1;
            match status {
                200..=299 => t.succeeded += 1,
                400..=499 => t.client_errors += 1,
                500..=599 => t.server_errors += 1,
                _ => {}
            }
            t.duration
                .get_or_insert_with(Default::default)
                .observe(seconds);
        });
    }

    /// The replica's stream broke after its first byte (continued by
    /// another replica or not).
    pub fn broken(&self, key: &TrafficKey) {
        self.with(key, |t| t.broken += 1);
    }

    /// The window so far, and a new one begun; `None` when nothing was
    /// relayed in it.
    pub fn take(&self, gateway: &str) -> Option<GatewayTraffic> {
        let now = now_unix_ms();
        let mut window = lock(&self.window);
        let started = std::mem::replace(&mut window.started_unix_ms, now);
        let replicas = std::mem::take(&mut window.replicas);
        if replicas.is_empty() {
            return None;
        }
        let mut replicas: Vec<ReplicaTraffic> = replicas.into_values().collect();
        replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
        Some(GatewayTraffic {
            gateway: gateway.to_string(),
            window_start_unix_ms: started,
            window_end_unix_ms: now,
            replicas,
        })
    }
}

/// Publishes a summary every `interval` until `shutdown`, and the last
/// one then.
pub async fn publish_every(
    traffic: std::sync::Arc<Traffic>,
    bus: Bus,
    gateway: String,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let subject = match bus.subjects.traffic(&gateway) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("no traffic summaries: {e}");
            return;
        }
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let last = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        if let Some(summary) = traffic.take(&gateway) {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(CONTENT_TYPE, Encoding::Protobuf.content_type());
            let sent = bus
                .client
                .publish_with_headers(
                    subject.clone(),
                    headers,
                    encode(&summary, Encoding::Protobuf),
                )
                .await;
            if let Err(e) = sent {
                tracing::warn!("publishing a traffic summary on {subject}: {e}");
            }
        }
        if last {
            let _ = bus.client.flush().await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(replica: &str) -> TrafficKey {
        TrafficKey {
            deployment: "chat".into(),
            model: "m".into(),
            replica: replica.into(),
            cluster: "eu-1".into(),
        }
    }

    #[test]
    fn a_window_sums_per_replica_with_its_template_and_starts_anew() {
        let traffic = Traffic::default();
        assert!(traffic.take("g1").is_none());
        let a = key("chat-1a2b3c4d-00000001");
        let b = key("chat-9f8e7d6c-00000002");
        traffic.first_byte(&a, 0.01);
        traffic.ended(&a, 200, 0.5);
        traffic.ended(&a, 429, 0.002);
        traffic.first_byte(&b, 0.3);
        traffic.ended(&b, 503, 0.3);
        traffic.broken(&b);
        let summary = traffic.take("g1").unwrap();
        assert_eq!(summary.gateway, "g1");
        assert!(summary.window_end_unix_ms >= summary.window_start_unix_ms);
        let [ra, rb] = summary.replicas.as_slice() else {
            panic!("{summary:?}")
        };
        assert_eq!(ra.template, "1a2b3c4d");
        assert_eq!((ra.requests, ra.succeeded, ra.client_errors), (2, 1, 1));
        assert_eq!(ra.time_to_first_byte.as_ref().unwrap().count(), 1);
        assert_eq!(ra.duration.as_ref().unwrap().count(), 2);
        assert_eq!(rb.template, "9f8e7d6c");
        assert_eq!((rb.requests, rb.server_errors, rb.broken), (1, 1, 1));
        assert!(traffic.take("g1").is_none(), "the window starts empty");
    }
}
