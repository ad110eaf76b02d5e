//! Replica logs: each local replica writes its output to a file of its own,
//! and the executor answers `<prefix>.logs.<cluster>` with a replica's last
//! lines (`flotilla logs`). On Kubernetes the answer is the pod's log.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flotilla_kit::{Bus, Shutdown};
use flotilla_proto::codec::{self, Encoding};
use flotilla_proto::v1::{ReplicaLogs, ReplicaLogsRequest};
use futures::StreamExt;

/// Lines answered when the request names no count.
pub const DEFAULT_TAIL: usize = 100;
/// The most lines one answer carries (NATS messages are small).
pub const MAX_TAIL: usize = 5_000;
/// A log file larger than this is moved to `<replica>.log.1` when the
/// replica starts again, so a restarting replica cannot fill the disk.
const ROTATE_BYTES: u64 = 16 << 20;
/// How far back from the end a tail reads at most.
const TAIL_WINDOW: u64 = 4 << 20;

/// The folder of the local replicas' log files.
#[derive(Debug, Clone)]
pub struct LogDir(PathBuf);

impl LogDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    fn path_of(&self, replica_id: &str) -> Option<PathBuf> {
        // Replica ids are DNS labels; anything else must not name a path.
        let safe = !replica_id.is_empty()
            && replica_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        safe.then(|| self.0.join(format!("{replica_id}.log")))
    }

    /// The file a starting replica writes to (appended, after a rotation
    /// when it grew large).
    pub fn open_for(&self, replica_id: &str) -> std::io::Result<std::fs::File> {
        let path = self.path_of(replica_id).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("replica id {replica_id:?} cannot name a log file"),
            )
        })?;
        std::fs::create_dir_all(&self.0)?;
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > ROTATE_BYTES) {
            std::fs::rename(&path, path.with_extension("log.1"))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    }

    /// The last `lines` lines of a replica's log; `None` when it has none.
    pub fn tail(&self, replica_id: &str, lines: usize) -> std::io::Result<Option<Vec<String>>> {
        let Some(path) = self.path_of(replica_id) else {
            return Ok(None);
        };
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(tail_of(&mut file, lines)?))
    }
}

fn tail_of(file: &mut std::fs::File, lines: usize) -> std::io::Result<Vec<String>> {
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL_WINDOW);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut all: Vec<&str> = text.lines().collect();
    // A window that starts mid-file starts mid-line: drop that part line.
    if start > 0 && !all.is_empty() {
        all.remove(0);
    }
    let from = all.len().saturating_sub(lines);
    Ok(all[from..].iter().map(|l| l.to_string()).collect())
}

/// Where the lines come from.
#[derive(Clone)]
pub enum LogSource {
    Local(LogDir),
    Kubernetes {
        client: kube::Client,
        namespace: String,
    },
}

impl LogSource {
    async fn lines(&self, replica_id: &str, tail: usize) -> Result<Vec<String>, String> {
        match self {
            LogSource::Local(dir) => match dir.tail(replica_id, tail) {
                Ok(Some(lines)) => Ok(lines),
                Ok(None) => Err(format!(
                    "no log for replica {replica_id} on this cluster (`flotilla get replicas` lists the replicas and their clusters)"
                )),
                Err(e) => Err(format!("reading the log of {replica_id}: {e}")),
            },
            LogSource::Kubernetes { client, namespace } => {
                pod_log(client, namespace, replica_id, tail).await
            }
        }
    }
}

/// The log of the replica's pod (its first, by name, when it has several:
/// a multi-node replica's leader sorts first).
async fn pod_log(
    client: &kube::Client,
    namespace: &str,
    replica_id: &str,
    tail: usize,
) -> Result<Vec<String>, String> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{ListParams, LogParams};
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let selector = format!(
        "{}={replica_id}",
        crate::backends::kubernetes::objects::LABEL_REPLICA
    );
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| format!("listing the pods of {replica_id}: {e}"))?;
    let mut names: Vec<String> = list
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    names.sort();
    let Some(name) = names.first() else {
        return Err(format!(
            "no pod of replica {replica_id} in namespace {namespace} (`kubectl get pods -n {namespace} -l {selector}`)"
        ));
    };
    let params = LogParams {
        tail_lines: Some(i64::try_from(tail).unwrap_or(i64::MAX)),
        ..LogParams::default()
    };
    let text = pods
        .logs(name, &params)
        .await
        .map_err(|e| format!("the log of pod {name}: {e}"))?;
    Ok(text.lines().map(str::to_string).collect())
}

/// Answers log requests for this cluster's replicas until shutdown.
pub async fn serve(
    bus: Bus,
    cluster: String,
    source: LogSource,
    shutdown: Shutdown,
) -> Result<(), flotilla_kit::KitError> {
    let subject = bus
        .subjects
        .replica_logs(&cluster)
        .map_err(flotilla_kit::KitError::from)?;
    // A queue group: during a restart two instances may both listen, and
    // one answer is enough.
    let mut requests = bus
        .client
        .queue_subscribe(subject.clone(), "executor".to_string())
        .await
        .map_err(|source| flotilla_kit::KitError::Subscribe { subject, source })?;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = requests.next() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let Some(reply) = message.reply.clone() else {
            tracing::debug!("a log request without a reply subject: nothing to answer");
            continue;
        };
        let content_type = message
            .headers
            .as_ref()
            .and_then(|h| h.get(codec::CONTENT_TYPE))
            .map(|v| v.as_str().to_string());
        let answer =
            match codec::decode::<ReplicaLogsRequest>(content_type.as_deref(), &message.payload) {
                Err(e) => ReplicaLogs {
                    cluster: cluster.clone(),
                    error: e.to_string(),
                    ..Default::default()
                },
                Ok(request) => {
                    let tail = match request.tail_lines {
                        0 => DEFAULT_TAIL,
                        n => (n as usize).min(MAX_TAIL),
                    };
                    match source.lines(&request.replica_id, tail).await {
                        Ok(lines) => ReplicaLogs {
                            replica_id: request.replica_id,
                            cluster: cluster.clone(),
                            lines,
                            error: String::new(),
                        },
                        Err(error) => ReplicaLogs {
                            replica_id: request.replica_id,
                            cluster: cluster.clone(),
                            lines: Vec::new(),
                            error,
                        },
                    }
                }
            };
        if let Err(e) = bus
            .client
            .publish(reply, codec::encode(&answer, Encoding::Protobuf))
            .await
        {
            tracing::warn!("answering a log request: {e}");
        }
    }
    Ok(())
}

/// The log folder of an executor whose model cache is `cache_dir`: beside
/// it, so each simulated cluster of a machine has its own.
pub fn dir_for(cache_dir: &Path) -> LogDir {
    LogDir::new(cache_dir.join("replica-logs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_rotates_and_refuses_paths() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogDir::new(dir.path());
        {
            use std::io::Write;
            let mut f = logs.open_for("chat-0").unwrap();
            for i in 0..10 {
                writeln!(f, "line {i}").unwrap();
            }
        }
        assert_eq!(
            logs.tail("chat-0", 3).unwrap().unwrap(),
            ["line 7", "line 8", "line 9"]
        );
        assert_eq!(logs.tail("chat-0", 50).unwrap().unwrap().len(), 10);
        assert_eq!(logs.tail("other", 3).unwrap(), None);
        assert_eq!(logs.tail("../etc/passwd", 3).unwrap(), None);
        assert!(logs.open_for("../x").is_err());
    }

    /// Against kube's mock API: the replica's pods are found by its label,
    /// the first by name is asked for its last lines.
    #[tokio::test]
    async fn a_kubernetes_replica_s_log_is_its_first_pod_s() {
        use http_body_util::{BodyExt, Full};
        type Body =
            http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, std::convert::Infallible>;
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<Body>>();
        let client = kube::Client::new(service, "default");
        let server = tokio::spawn(async move {
            let mut asked = Vec::new();
            for _ in 0..2 {
                let (request, respond) = handle.next_request().await.expect("a request");
                let uri = request.uri().to_string();
                let body = if uri.contains("/log") {
                    "loading\nserving\n".to_string()
                } else {
                    serde_json::json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                        "items": [
                            {"metadata": {"name": "chat-0-worker", "namespace": "flotilla"}},
                            {"metadata": {"name": "chat-0-leader", "namespace": "flotilla"}}]})
                    .to_string()
                };
                asked.push(uri);
                respond.send_response(
                    http::Response::builder()
                        .body(Full::new(bytes::Bytes::from(body)).boxed_unsync())
                        .unwrap(),
                );
            }
            asked
        });
        let lines = pod_log(&client, "flotilla", "chat-0", 2).await.unwrap();
        assert_eq!(lines, ["loading", "serving"]);
        let asked = server.await.unwrap();
        assert!(
            asked[0].starts_with("/api/v1/namespaces/flotilla/pods?")
                && asked[0].contains("labelSelector=flotilla.dev%2Freplica%3Dchat-0"),
            "{asked:?}"
        );
        assert!(
            asked[1].starts_with("/api/v1/namespaces/flotilla/pods/chat-0-leader/log?")
                && asked[1].contains("tailLines=2"),
            "{asked:?}"
        );
    }
}
