//! One HTTP client for every replica runtime. The candle runner and vLLM's
//! OpenAI server answer the same paths: `/health` (200 once serving),
//! `/v1/models` (an OpenAI model list) and `/metrics` (Prometheus text), so
//! probing, adoption and tests share this code whatever the runtime.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaClientError {
    #[error("{url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url} sent something that is not an OpenAI model list: {source}")]
    NotAModelList {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// Talks to one replica's HTTP server, given its base URL
/// (`http://host:port`).
#[derive(Debug, Clone)]
pub struct ReplicaClient {
    http: reqwest::Client,
}

impl Default for ReplicaClient {
    fn default() -> Self {
        Self::new(Duration::from_secs(2))
    }
}

#[derive(serde::Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(serde::Deserialize)]
struct ModelEntry {
    id: String,
}

impl ReplicaClient {
    /// `timeout` bounds every request: a probe must not hang on a stuck
    /// replica.
    pub fn new(timeout: Duration) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .unwrap_or_default(),
        }
    }

    async fn get(&self, base: &str, path: &str) -> Result<reqwest::Response, ReplicaClientError> {
        let url = format!("{}{path}", base.trim_end_matches('/'));
        let response =
            self.http
                .get(&url)
                .send()
                .await
                .map_err(|source| ReplicaClientError::Unreachable {
                    url: url.clone(),
                    source,
                })?;
        if !response.status().is_success() {
            return Err(ReplicaClientError::Status {
                url,
                status: response.status().as_u16(),
            });
        }
        Ok(response)
    }

    /// `Ok` when `/health` answers 2xx: the model is loaded and serving.
    pub async fn health(&self, base: &str) -> Result<(), ReplicaClientError> {
        self.get(base, "/health").await.map(|_| ())
    }

    /// The model names `/v1/models` lists.
    pub async fn models(&self, base: &str) -> Result<Vec<String>, ReplicaClientError> {
        let url = format!("{}/v1/models", base.trim_end_matches('/'));
        let list: ModelList = self
            .get(base, "/v1/models")
            .await?
            .json()
            .await
            .map_err(|source| ReplicaClientError::NotAModelList { url, source })?;
        Ok(list.data.into_iter().map(|m| m.id).collect())
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self, base: &str) -> Result<String, ReplicaClientError> {
        let url = format!("{}/metrics", base.trim_end_matches('/'));
        self.get(base, "/metrics")
            .await?
            .text()
            .await
            .map_err(|source| ReplicaClientError::Unreachable { url, source })
    }
}

/// The sum of every series of metric `name` in Prometheus text (all label
/// sets added up), or `None` when the metric is absent. Counters exposed
/// with a `_total` suffix are found by either name.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let metric = series.split('{').next().unwrap_or(series).trim();
        if (metric == name || metric.strip_suffix("_total") == Some(name))
            && let Ok(v) = value.trim().parse::<f64>()
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::metric_sum;

    #[test]
    fn metric_sum_adds_label_sets_and_ignores_comments() {
        let text = "# HELP flotilla_runner_requests Requests accepted\n\
                    # TYPE flotilla_runner_requests counter\n\
                    flotilla_runner_requests_total{endpoint=\"chat\"} 3\n\
                    flotilla_runner_requests_total{endpoint=\"completions\"} 2\n\
                    flotilla_runner_queue_depth 0\n\
                    vllm:num_requests_running{model_name=\"m\"} 4.0\n";
        assert_eq!(metric_sum(text, "flotilla_runner_requests"), Some(5.0));
        assert_eq!(metric_sum(text, "flotilla_runner_queue_depth"), Some(0.0));
        assert_eq!(metric_sum(text, "vllm:num_requests_running"), Some(4.0));
        assert_eq!(metric_sum(text, "absent"), None);
    }
}
