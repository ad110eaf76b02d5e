//! TLS on both sides of the gateway: an HTTPS listener (a cluster edge
//! serving the global gateway, with client certificates required when a
//! client CA is given), and the HTTP client the global gateway reaches
//! edges with. Both take their rustls configuration from a
//! [`Reloading`], so rotated certificates apply to new connections
//! without a restart.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_kit::sync::lock;
use flotilla_tls::Reloading;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);
/// How often certificate files are checked for a rotation.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// An HTTPS listener for `axum::serve`. Handshakes run on tasks of their
/// own, so a slow or hostile client never holds up the next connection;
/// a failed one is logged and dropped.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(
        tcp: TcpListener,
        config: Arc<Reloading<rustls::ServerConfig>>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = shutdown.cancelled() => return,
                    accepted = tcp.accept() => accepted,
                };
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: the next accept
                        // may work once some connection closes.
                        tracing::warn!("accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!("TCP_NODELAY: {e}");
                }
                let acceptor = TlsAcceptor::from(config.current());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::warn!(%peer, "TLS handshake refused: {e}"),
                        Err(_) => {
                            tracing::warn!(%peer, "no TLS handshake within {HANDSHAKE_WITHIN:?}");
                        }
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept loop ended (shutdown): serve nothing more while
            // the server finishes its graceful shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The HTTP client requests leave through, rebuilt when the edge TLS
/// configuration was rotated.
pub struct HttpClient {
    tls: Option<Arc<Reloading<rustls::ClientConfig>>>,
    built: Mutex<(Option<Arc<rustls::ClientConfig>>, reqwest::Client)>,
}

fn build(tls: Option<&Arc<rustls::ClientConfig>>) -> Result<reqwest::Client, reqwest::Error> {
    let config = match tls {
        Some(config) => (**config).clone(),
        // No edge CA: plain HTTP only; an https edge is refused with an
        // unknown-issuer error, never trusted by default.
        None => rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
        .unwrap_or_else(|e| unreachable!("ring supports the default TLS versions: {e}")),
    };
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .use_preconfigured_tls(config)
        .build()
}

impl HttpClient {
    pub fn new(tls: Option<Arc<Reloading<rustls::ClientConfig>>>) -> Result<Self, reqwest::Error> {
        let current = tls.as_ref().map(|t| t.current());
        let client = build(current.as_ref())?;
        Ok(Self {
            tls,
            built: Mutex::new((current, client)),
        })
    }

    /// The client for the next request.
    pub fn get(&self) -> reqwest::Client {
        let mut built = lock(&self.built);
        if let Some(tls) = &self.tls {
            let current = tls.current();
            if built.0.as_ref().is_none_or(|b| !Arc::ptr_eq(b, &current)) {
                match build(Some(&current)) {
                    Ok(client) => built.1 = client,
                    // Keep the last client; logged once per rotation.
                    Err(e) => tracing::error!("rotated edge TLS files give no client: {e}"),
                }
                built.0 = Some(current);
            }
        }
        built.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::get;
    use flotilla_tls::Authority;

    use super::*;

    struct Files(tempfile::TempDir);

    impl Files {
        fn path(&self, name: &str) -> std::path::PathBuf {
            self.0.path().join(name)
        }
    }

    /// An edge certificate for 127.0.0.1 and a gateway client certificate,
    /// both from `ca`, under one folder.
    fn files(ca: &Authority) -> Files {
        let files = Files(tempfile::tempdir().unwrap());
        ca.write_cert(&files.path("ca.crt")).unwrap();
        ca.issue_server(&["127.0.0.1".into()])
            .unwrap()
            .write(files.0.path(), "edge")
            .unwrap();
        ca.issue_client("gateway")
            .unwrap()
            .write(files.0.path(), "gateway")
            .unwrap();
        files
    }

    async fn edge(files: &Files, shutdown: &CancellationToken) -> SocketAddr {
        let config = flotilla_tls::server_config(
            &files.path("edge.crt"),
            &files.path("edge.key"),
            Some(&files.path("ca.crt")),
        )
        .unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listener = TlsListener::new(tcp, config, shutdown.clone()).unwrap();
        let addr = axum::serve::Listener::local_addr(&listener).unwrap();
        let app = Router::new().route("/health", get(|| async { "ok" }));
        tokio::spawn(axum::serve(listener, app).into_future());
        addr
    }

    fn client(files: &Files) -> HttpClient {
        HttpClient::new(Some(
            flotilla_tls::client_config(
                &files.path("ca.crt"),
                &files.path("gateway.crt"),
                &files.path("gateway.key"),
            )
            .unwrap(),
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn an_edge_answers_a_gateway_with_a_client_certificate_and_no_one_else() {
        let shutdown = CancellationToken::new();
        let ca = Authority::generate("fleet CA").unwrap();
        let ours = files(&ca);
        let addr = edge(&ours, &shutdown).await;
        let url = format!("https://{addr}/health");

        let answer = client(&ours).get().get(&url).send().await.unwrap();
        assert_eq!(answer.text().await.unwrap(), "ok");

        // Trusts the edge but presents no certificate.
        let anonymous = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).unwrap())
            .build()
            .unwrap();
        assert!(
            anonymous.get(&url).send().await.is_err(),
            "served without a client certificate"
        );

        // A certificate of another CA.
        let theirs = files(&Authority::generate("another CA").unwrap());
        std::fs::copy(ours.path("ca.crt"), theirs.path("ca.crt")).unwrap();
        assert!(
            client(&theirs).get().get(&url).send().await.is_err(),
            "served a foreign client"
        );

        // A gateway without an edge CA trusts no edge.
        let untrusting = HttpClient::new(None).unwrap();
        assert!(untrusting.get().get(&url).send().await.is_err());
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_rotated_client_certificate_is_used_for_the_next_request() {
        let shutdown = CancellationToken::new();
        let ca = Authority::generate("fleet CA").unwrap();
        let ours = files(&ca);
        let addr = edge(&ours, &shutdown).await;
        let url = format!("https://{addr}/health");
        let tls = flotilla_tls::client_config(
            &ours.path("ca.crt"),
            &ours.path("gateway.crt"),
            &ours.path("gateway.key"),
        )
        .unwrap();
        let http = HttpClient::new(Some(Arc::clone(&tls))).unwrap();
        let before = http.get();
        assert!(before.get(&url).send().await.is_ok());

        ca.issue_client("gateway-renewed")
            .unwrap()
            .write(ours.0.path(), "gateway")
            .unwrap();
        assert!(tls.refresh().unwrap(), "the renewed files were not seen");
        let after = http.get();
        assert!(after.get(&url).send().await.is_ok());
        shutdown.cancel();
    }
}
