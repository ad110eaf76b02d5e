//! Mutual TLS between the global gateway and the cluster edges.
//!
//! The edge is the only endpoint of a member cluster reachable from
//! outside; the gateway reaches it over the WAN, so both sides prove who
//! they are: the edge with a server certificate, the gateway with a client
//! certificate, each signed by a CA the other trusts.
//!
//! - [`Authority`] issues those certificates (for `flotilla up --isolated`,
//!   tests and small installs; a production fleet uses its own PKI or
//!   cert-manager and only hands the files over).
//! - [`server_config`] and [`client_config`] read PEM files into rustls
//!   configurations held by a [`Reloading`], which follows the files:
//!   rotating a certificate (a renewed Kubernetes Secret, a new file
//!   written in place) takes effect on the next connection, without a
//!   restart. A file that no longer parses keeps the last good
//!   configuration and is logged, so a half-written rotation never takes
//!   the service down.

mod authority;
mod reload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use authority::{Authority, Issued};
pub use reload::Reloading;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("the client CA {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The one crypto provider, named rather than taken from the process
/// default, so that another crate enabling a second provider cannot make
/// building a configuration fail.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: format!("not a PEM certificate chain ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            reason: "holds no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: format!("not a PEM private key ({e})"),
    })
}

fn roots(path: &Path, pem: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in certificates(path, pem)? {
        store.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate ({e})"),
        })?;
    }
    Ok(store)
}

/// A server configuration from a certificate chain and its key, requiring
/// a client certificate signed by `client_ca` when one is given (mutual
/// TLS). Speaks HTTP/1.1.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<Reloading<rustls::ServerConfig>>, TlsError> {
    let mut files = vec![cert.to_path_buf(), key.to_path_buf()];
    files.extend(client_ca.map(Path::to_path_buf));
    Reloading::load(files, |files| {
        let [(cert_path, cert), (key_path, key), rest @ ..] = files else {
            unreachable_files()
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                what: "TLS versions",
                source,
            })?;
        let builder = match rest {
            [(ca_path, ca)] => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca_path, ca)?),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: ca_path.clone(),
                    reason: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certificates(cert_path, cert)?, private_key(key_path, key)?)
            .map_err(|source| TlsError::Rustls {
                what: "the server certificate and key",
                source,
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    })
}

/// A client configuration that trusts only `ca` and presents `cert` and
/// `key` when the server asks for a client certificate.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<Reloading<rustls::ClientConfig>>, TlsError> {
    Reloading::load(
        vec![ca.to_path_buf(), cert.to_path_buf(), key.to_path_buf()],
        |files| {
            let [(ca_path, ca), (cert_path, cert), (key_path, key)] = files else {
                unreachable_files()
            };
            let mut config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|source| TlsError::Rustls {
                    what: "TLS versions",
                    source,
                })?
                .with_root_certificates(roots(ca_path, ca)?)
                .with_client_auth_cert(certificates(cert_path, cert)?, private_key(key_path, key)?)
                .map_err(|source| TlsError::Rustls {
                    what: "the client certificate and key",
                    source,
                })?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(config)
        },
    )
}

/// The builders above are called with the files they listed, in order.
fn unreachable_files() -> ! {
    unreachable!("a TLS configuration is built from the files it listed")
}

#[cfg(test)]
mod tests;
