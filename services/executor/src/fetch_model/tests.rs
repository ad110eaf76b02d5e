//! fetch-model against a real nats-server (started here: the workspace's
//! harness lives in the integration crate, which depends on this one).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_kit::{Bus, BusConfig};
use flotilla_proto::v1::{ModelPhase, ModelRecord};

use super::*;

/// A nats-server with JetStream on a free port, killed and its store
/// removed on drop.
struct Nats {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "flotilla-fetch-model-{name}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FLOTILLA_NATS_SERVER") {
        return path.into();
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/nats-server");
    if tools.exists() {
        return tools;
    }
    "nats-server".into()
}

fn start_nats() -> Nats {
    let dir = scratch("nats");
    let mut child = Command::new(nats_server_binary())
        .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nats-server (scripts/install-tools --test installs it)");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads the log to its end: a full pipe would stall the server.
    std::thread::spawn(move || {
        let mut port = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some((_, p)) = line.split_once("Listening for client connections on ") {
                port = p.trim().rsplit(':').next().map(str::to_string);
            }
            if line.contains("Server is ready") {
                let _ = tx.send(port.take());
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("nats-server ready within 20s")
        .expect("nats-server's client port in its log");
    Nats {
        child,
        dir,
        url: format!("nats://127.0.0.1:{port}"),
    }
}

async fn provisioned_bus(nats: &Nats) -> Bus {
    let config = BusConfig::for_url(nats.url.clone()).unwrap();
    let bus = Bus::connect(&config, "test", &CancellationToken::new())
        .await
        .unwrap();
    flotilla_kit::provision(&bus).await.unwrap();
    bus
}

/// Stores `bytes` as model `name` (one file, `model.bin`) and records it
/// ready; its digest.
async fn store_model(bus: &Bus, name: &str, bytes: &[u8]) -> String {
    let dir = scratch("upload");
    let file = dir.join("model.bin");
    std::fs::write(&file, bytes).unwrap();
    let store = bus
        .jetstream
        .get_object_store(&bus.topology.model_artifacts.name)
        .await
        .unwrap();
    let uploaded = flotilla_model_store::upload(&store, name, &file, |_, _| {})
        .await
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let record = ModelRecord {
        name: name.into(),
        digest: uploaded.digest.clone(),
        size_bytes: uploaded.size_bytes,
        parts: uploaded.parts,
        phase: ModelPhase::Ready.into(),
        ..Default::default()
    };
    RecordStore::<ModelRecord>::open(bus, &bus.topology.models.name)
        .await
        .unwrap()
        .update(name, |_| Some(record.clone()))
        .await
        .unwrap();
    uploaded.digest
}

fn args(nats: &Nats, model: &str, digest: &str, cache: &Path) -> FetchModelArgs {
    FetchModelArgs {
        bus: BusArgs {
            nats_url: nats.url.clone(),
            ..BusArgs::default()
        },
        model: model.into(),
        digest: digest.into(),
        cache_dir: cache.to_path_buf(),
        cache_budget: "1GiB".into(),
    }
}

/// Bytes that do not repeat within a part.
fn model_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test]
async fn two_pods_on_one_node_fetch_a_model_once_and_both_find_it() {
    let nats = start_nats();
    let bus = provisioned_bus(&nats).await;
    // Three parts: 8 MiB, 8 MiB and the rest.
    let bytes = model_bytes(20 << 20);
    let digest = store_model(&bus, "tiny", &bytes).await;
    let cache = scratch("cache");
    let cancel = CancellationToken::new();
    let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
    let (a, b) = (
        args(&nats, "tiny", &digest, &cache),
        args(&nats, "tiny", &digest, &cache),
    );
    let (a, b) = tokio::join!(run(&a, &cancel, &mut out_a), run(&b, &cancel, &mut out_b));
    let (a, b) = (a.unwrap(), b.unwrap());
    let (out_a, out_b) = (
        String::from_utf8(out_a).unwrap(),
        String::from_utf8(out_b).unwrap(),
    );
    // One downloaded, the other waited and found it complete.
    let (downloaded, found, log) = if a.cache_hit {
        (b, a, out_b)
    } else {
        (a, b, out_a)
    };
    assert!(found.cache_hit, "{log}");
    assert!(!downloaded.cache_hit);
    assert_eq!(downloaded.bytes_downloaded, bytes.len() as u64);
    assert_eq!(downloaded.path, found.path);
    assert_eq!(
        std::fs::read(downloaded.path.join("model.bin")).unwrap(),
        bytes
    );
    assert!(
        log.contains(&format!(
            "tiny: {0}/{0} bytes (100%), 3/3 parts",
            bytes.len()
        )),
        "{log}"
    );
    assert!(log.contains("tiny ready at "), "{log}");
    // The engine's path: the cache's layout under the mount, the path the
    // executor gives the replica without fetching the model itself.
    let hex = digest.trim_start_matches("sha256:");
    assert_eq!(downloaded.path, cache.join("models").join(hex));
    assert_eq!(
        Some(downloaded.path.clone()),
        flotilla_model_store::cache_relative_path(&digest).map(|r| cache.join(r))
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

#[tokio::test]
async fn a_model_replaced_since_the_start_is_refused_naming_both_digests() {
    let nats = start_nats();
    let bus = provisioned_bus(&nats).await;
    let stored = store_model(&bus, "tiny", &model_bytes(1 << 20)).await;
    let asked = format!("sha256:{}", "0".repeat(64));
    let cache = scratch("cache");
    let e = run(
        &args(&nats, "tiny", &asked, &cache),
        &CancellationToken::new(),
        &mut Vec::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, FetchModelError::DigestMismatch { .. }), "{e}");
    let said = e.to_string();
    assert!(said.contains(&asked) && said.contains(&stored), "{said}");
    // Nothing was fetched.
    assert!(!cache.join("models").exists());
    let e = run(
        &args(&nats, "other", &asked, &cache),
        &CancellationToken::new(),
        &mut Vec::new(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("no model named \"other\""), "{e}");
    std::fs::remove_dir_all(&cache).unwrap();
}

#[tokio::test]
async fn malformed_flags_are_refused_before_the_bus_is_reached() {
    let unreachable = FetchModelArgs {
        bus: BusArgs {
            nats_url: "nats://127.0.0.1:1".into(),
            ..BusArgs::default()
        },
        model: "tiny".into(),
        digest: "sha256:abc".into(),
        cache_dir: "/nonexistent".into(),
        cache_budget: "1GiB".into(),
    };
    let cancel = CancellationToken::new();
    let e = run(&unreachable, &cancel, &mut Vec::new())
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--digest: \"sha256:abc\" is not sha256:<64 hex digits>"
    );
    let bad_name = FetchModelArgs {
        model: "Not A Name".into(),
        digest: format!("sha256:{}", "a".repeat(64)),
        ..unreachable.clone()
    };
    let e = run(&bad_name, &cancel, &mut Vec::new()).await.unwrap_err();
    assert!(e.to_string().starts_with("--model: "), "{e}");
    let bad_budget = FetchModelArgs {
        cache_budget: "lots".into(),
        digest: format!("sha256:{}", "a".repeat(64)),
        ..unreachable
    };
    let e = run(&bad_budget, &cancel, &mut Vec::new())
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("--cache-budget: "), "{e}");
}
