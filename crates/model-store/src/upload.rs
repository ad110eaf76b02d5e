//! Storing an artifact: split into parts, hash, put each part.

use std::path::{Path, PathBuf};

use async_nats::jetstream::object_store::{ObjectMetadata, ObjectStore};
use flotilla_proto::v1::ArtifactPart;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::{CHUNK_SIZE, PARALLEL_PARTS, PART_SIZE, digest_string, part_object};

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} has no files to upload")]
    Empty(String),
    #[error("storing {object}: {source}")]
    Store {
        object: String,
        #[source]
        source: async_nats::jetstream::object_store::PutError,
    },
    #[error("part {object}: {reason}")]
    Corrupt { object: String, reason: String },
}

/// What [`upload`] stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Uploaded {
    pub digest: String,
    pub size_bytes: u64,
    pub parts: Vec<ArtifactPart>,
}

/// The files of an artifact with their names inside it, in path order.
fn files_of(path: &Path) -> Result<Vec<(String, PathBuf, u64)>, UploadError> {
    let read_err = |p: &Path, source| UploadError::Read {
        path: p.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(|e| read_err(path, e))?;
    if meta.is_file() {
        let name = path
            .file_name()
            .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned());
        return Ok(vec![(name, path.to_path_buf(), meta.len())]);
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| read_err(&dir, e))? {
            let entry = entry.map_err(|e| read_err(&dir, e))?;
            let p = entry.path();
            let m = entry.metadata().map_err(|e| read_err(&p, e))?;
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                let rel = p
                    .strip_prefix(path)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .replace('\\', "/");
                files.push((rel, p, m.len()));
            }
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    if files.is_empty() {
        return Err(UploadError::Empty(path.display().to_string()));
    }
    Ok(files)
}

async fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, UploadError> {
    let err = |source| UploadError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(err)?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(err)?;
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    file.read_exact(&mut buf).await.map_err(err)?;
    Ok(buf)
}

/// Uploads the file or folder at `path` as model `name`. `progress` gets
/// (bytes stored, bytes in all) after each part.
pub async fn upload(
    store: &ObjectStore,
    name: &str,
    path: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<Uploaded, UploadError> {
    let files = files_of(path)?;
    let total: u64 = files.iter().map(|f| f.2).sum();

    // One sequential read: each part feeds the artifact digest and its own,
    // then goes up while the next is read (at most PARALLEL_PARTS in
    // memory). Parts are named by their own digest, so none waits for the
    // artifact's.
    let mut whole = Sha256::new();
    let mut parts = Vec::new();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut done = 0u64;
    for (file, p, len) in &files {
        let mut offset = 0u64;
        loop {
            let size = PART_SIZE.min(len - offset);
            let bytes = read_range(p, offset, size).await?;
            whole.update(&bytes);
            let digest = digest_string(&Sha256::digest(&bytes));
            let part = ArtifactPart {
                file: file.clone(),
                offset,
                size_bytes: size,
                object: part_object(name, digest.trim_start_matches("sha256:")),
                digest,
            };
            if in_flight.len() >= PARALLEL_PARTS
                && let Some(result) = in_flight.next().await
            {
                let stored: ArtifactPart = result?;
                done += stored.size_bytes;
                progress(done, total);
                parts.push(stored);
            }
            in_flight.push(put_part(store, part, bytes));
            offset += size;
            if offset >= *len {
                break;
            }
        }
    }
    while let Some(result) = in_flight.next().await {
        let stored = result?;
        done += stored.size_bytes;
        progress(done, total);
        parts.push(stored);
    }
    parts.sort_by(|a, b| a.file.cmp(&b.file).then(a.offset.cmp(&b.offset)));
    Ok(Uploaded {
        digest: digest_string(&whole.finalize()),
        size_bytes: total,
        parts,
    })
}

async fn put_part(
    store: &ObjectStore,
    part: ArtifactPart,
    bytes: Vec<u8>,
) -> Result<ArtifactPart, UploadError> {
    let meta = ObjectMetadata {
        name: part.object.clone(),
        chunk_size: Some(CHUNK_SIZE),
        ..Default::default()
    };
    store
        .put(meta, &mut bytes.as_slice())
        .await
        .map_err(|source| UploadError::Store {
            object: part.object.clone(),
            source,
        })?;
    Ok(part)
}

/// Reads every stored part back and checks its size and digest, and that
/// the parts cover each file without gaps. What the provisioner does before
/// it calls a pushed model ready.
pub async fn verify_stored(
    store: &ObjectStore,
    parts: &[ArtifactPart],
    digest: &str,
) -> Result<(), UploadError> {
    let mut whole = Sha256::new();
    let mut expected_offset: Option<(&str, u64)> = None;
    for part in parts {
        let corrupt = |reason: String| UploadError::Corrupt {
            object: part.object.clone(),
            reason,
        };
        match expected_offset {
            Some((file, offset)) if file == part.file && offset != part.offset => {
                return Err(corrupt(format!(
                    "starts at {} but the previous part ends at {offset}",
                    part.offset
                )));
            }
            Some((file, _)) if file != part.file && part.offset != 0 => {
                return Err(corrupt("the first part of a file must start at 0".into()));
            }
            None if part.offset != 0 => {
                return Err(corrupt("the first part must start at 0".into()));
            }
            _ => {}
        }
        expected_offset = Some((&part.file, part.offset + part.size_bytes));
        let mut object = store
            .get(&part.object)
            .await
            .map_err(|e| corrupt(format!("cannot read: {e}")))?;
        let mut bytes = Vec::with_capacity(usize::try_from(part.size_bytes).unwrap_or(0));
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| corrupt(format!("cannot read: {e}")))?;
        if bytes.len() as u64 != part.size_bytes {
            return Err(corrupt(format!(
                "{} bytes stored, {} listed",
                bytes.len(),
                part.size_bytes
            )));
        }
        let actual = digest_string(&Sha256::digest(&bytes));
        if actual != part.digest {
            return Err(corrupt(format!("digest {actual}, listed {}", part.digest)));
        }
        whole.update(&bytes);
    }
    let actual = digest_string(&whole.finalize());
    if actual != digest {
        return Err(UploadError::Corrupt {
            object: "(whole artifact)".into(),
            reason: format!("digest {actual}, expected {digest}"),
        });
    }
    Ok(())
}
