//! What the runner's suites share: the shipped model, and a runner started
//! in this process that a test talks to over HTTP.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_runner::Args;
use serde_json::Value;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The shipped SmolLM2-135M-Instruct Q4_1 GGUF, which
/// `scripts/install-tools` installs; panics saying so when it is missing.
pub fn shipped_gguf() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../.tools/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-tools",
        p.display()
    );
    p
}

/// A runner serving in this process until dropped.
pub struct Runner {
    pub base: String,
    pub client: reqwest::Client,
    _stop: DropGuard,
}

impl Runner {
    /// Serves `model` as `name` on a free port and waits until `/health`
    /// says it has loaded (503 until then).
    pub async fn start(model: &Path, name: &str, max_queue: usize, max_batch: usize) -> Self {
        let args = Args {
            model: model.to_path_buf(),
            served_model_name: Some(name.into()),
            addr: "127.0.0.1:0".parse().unwrap(),
            max_queue,
            max_batch,
            device: "cpu".into(),
            kv_block_tokens: 16,
            kv_cache_budget: "1GiB".parse().unwrap(),
            no_prefix_cache: false,
            log_format: Default::default(),
        };
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let token = stop.clone();
        tokio::spawn(async move { flotilla_runner::run(args, token, Some(tx)).await.unwrap() });
        let base = format!("http://{}", rx.await.unwrap());
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = client
                .get(format!("{base}/health"))
                .send()
                .await
                .unwrap()
                .status();
            if status == 200 {
                break;
            }
            assert_eq!(status, 503);
            assert!(Instant::now() < deadline, "model never loaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            base,
            client,
            _stop: stop.drop_guard(),
        }
    }

    /// The shipped model served as `smollm2`.
    pub async fn shipped(max_queue: usize, max_batch: usize) -> Self {
        Self::start(&shipped_gguf(), "smollm2", max_queue, max_batch).await
    }

    /// POSTs `body` as JSON to `path`: the status and the JSON answer
    /// (null when the body is not JSON).
    pub async fn post(&self, path: &str, body: impl serde::Serialize) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}
