//! A member cluster's NATS server: a leaf node of the hub.
//!
//! It has no JetStream of its own. It logs in to the hub's leaf node port
//! as the member's executor user, and the hub applies that user's
//! permissions to everything crossing the leaf connection: what the
//! member's clients publish reaches the hub only where the executor may
//! publish, and they receive from the hub only what the executor may
//! subscribe to (its own reply inboxes). JetStream requests cross as
//! plain requests and the hub's JetStream answers them (both sides set
//! `default_js_domain` for the global account; without it nats-server
//! drops JetStream traffic at the leaf connection, see
//! `hub::JETSTREAM_ACROSS_LEAVES`).
//!
//! # How a local client connects
//!
//! The member's executor and its cluster edge connect to the leaf's
//! [`listen`](LeafServerConfig::listen) address **without credentials**
//! (the leaf has no users), but **with the executor user's reply inbox
//! prefix**, [`LeafServerConfig::local_inbox_prefix`]
//! (`_INBOX.executor-<cluster>`): an answer from the hub travels back to
//! a subject the leaf user may receive, and no other. With the kit's
//! flags:
//!
//! ```text
//! --nats-url nats://127.0.0.1:4222 --nats-inbox-prefix _INBOX.executor-<cluster>
//! ```
//!
//! (`FLOTILLA_NATS_URL` and `FLOTILLA_NATS_INBOX_PREFIX`; see
//! [`LeafServerConfig::local_client_env`]). A client with the default
//! `_INBOX` prefix connects, but every request to the hub times out: the
//! answers are not allowed back over the leaf.

use std::fmt::Write as _;

use crate::hub::{JETSTREAM_ACROSS_LEAVES, host_port, plain_name, url_userinfo};
use crate::{AuthError, Role, User, quoted};

/// The leaf node server of one member cluster.
#[derive(Debug, Clone)]
pub struct LeafServerConfig {
    /// A name for the server's logs and monitoring (`leaf-<cluster>`).
    pub server_name: String,
    /// `host:port` the member's local clients connect to.
    pub listen: String,
    /// Port of the monitoring endpoint (`/healthz`, `/leafz`), if any.
    pub http_port: Option<u16>,
    /// `host:port` of the leaf node port of every hub server. The leaf
    /// connects to one of them and moves to another when it fails.
    pub hub_urls: Vec<String>,
    /// The user the leaf logs in to the hub as: the member's executor.
    pub user: User,
    /// CA certificate (PEM) to verify the hub's leaf node port with, as
    /// this server sees it; set when that port uses TLS.
    pub hub_ca_file: Option<String>,
}

impl LeafServerConfig {
    /// The leaf of member cluster `cluster`, logging in as its executor
    /// with `password` (the executor's, from `flotilla nats-config`).
    pub fn member(
        cluster: &str,
        password: impl Into<String>,
        listen: impl Into<String>,
        hub_urls: Vec<String>,
    ) -> Result<Self, AuthError> {
        Ok(Self {
            server_name: format!("leaf-{cluster}"),
            listen: listen.into(),
            http_port: None,
            hub_urls,
            user: User {
                role: Role::executor(cluster)?,
                password: password.into(),
            },
            hub_ca_file: None,
        })
    }

    /// The reply inbox prefix every local client must use (see the module
    /// documentation): the leaf user's.
    pub fn local_inbox_prefix(&self) -> String {
        self.user.role.inbox_prefix()
    }

    /// The URL a client on the same host connects to (a wildcard listen
    /// address becomes loopback).
    pub fn local_url(&self) -> String {
        let (host, port) = self
            .listen
            .rsplit_once(':')
            .unwrap_or((self.listen.as_str(), "4222"));
        let host = match host {
            "0.0.0.0" | "" => "127.0.0.1",
            "[::]" => "[::1]",
            h => h,
        };
        format!("nats://{host}:{port}")
    }

    /// The environment of a local client (the executor, the edge):
    /// `FLOTILLA_NATS_URL` and `FLOTILLA_NATS_INBOX_PREFIX`, and no
    /// credentials.
    pub fn local_client_env(&self) -> Vec<(String, String)> {
        vec![
            ("FLOTILLA_NATS_URL".into(), self.local_url()),
            (
                "FLOTILLA_NATS_INBOX_PREFIX".into(),
                self.local_inbox_prefix(),
            ),
        ]
    }
}

/// A complete configuration for a member's leaf node server. It holds
/// the leaf user's password in clear (the server must send it), so keep
/// the file as secret as the executor's env file.
pub fn render_leaf_server_config(config: &LeafServerConfig) -> Result<String, AuthError> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# The leaf node server of member cluster user {:?}, written from the bus contracts.\n\
         # No JetStream here: the hub's JetStream answers requests.\n\
         # Local clients connect without credentials and with reply inbox prefix {:?}.",
        config.user.role.user(),
        config.local_inbox_prefix()
    );
    let _ = writeln!(
        out,
        "server_name: {}",
        quoted(&plain_name("server_name", &config.server_name)?)?
    );
    let _ = writeln!(
        out,
        "listen: {}",
        quoted(&host_port("listen", &config.listen)?)?
    );
    if let Some(port) = config.http_port {
        let _ = writeln!(out, "http_port: {port}");
    }
    if config.hub_urls.is_empty() {
        return Err(AuthError::Invalid {
            field: "hub_urls",
            value: String::new(),
            reason: "a leaf needs the leaf node port of at least one hub server",
        });
    }
    let userinfo = url_userinfo(&config.user.role.user(), &config.user.password);
    let _ = writeln!(out, "leafnodes {{\n  remotes [\n    {{\n      urls: [");
    for url in &config.hub_urls {
        let url = host_port("hub url", url)?;
        let _ = writeln!(
            out,
            "        {}",
            quoted(&format!("nats-leaf://{userinfo}{url}"))?
        );
    }
    let _ = writeln!(out, "      ]");
    // The hub tells its leaves every hub server's leaf address as that
    // server sees itself, which a member on another network may not reach
    // (or reach somewhere else): use the listed ones only.
    let _ = writeln!(out, "      ignore_discovered_servers: true");
    if let Some(ca) = &config.hub_ca_file {
        let _ = writeln!(
            out,
            "      tls {{\n        ca_file: {}\n      }}",
            quoted(ca)?
        );
    }
    let _ = writeln!(out, "    }}\n  ]\n}}");
    out.push_str(JETSTREAM_ACROSS_LEAVES);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf() -> LeafServerConfig {
        LeafServerConfig::member(
            "eu-1",
            "se/cret",
            "0.0.0.0:4222",
            vec!["hub-1:7422".into(), "10.0.0.2:7422".into()],
        )
        .unwrap()
    }

    #[test]
    fn a_leaf_logs_in_as_its_executor_and_has_no_jetstream() {
        let conf = render_leaf_server_config(&leaf()).unwrap();
        assert!(conf.contains("server_name: \"leaf-eu-1\""), "{conf}");
        assert!(conf.contains("listen: \"0.0.0.0:4222\""));
        assert!(conf.contains("\"nats-leaf://executor-eu-1:se%2Fcret@hub-1:7422\""));
        assert!(conf.contains("\"nats-leaf://executor-eu-1:se%2Fcret@10.0.0.2:7422\""));
        assert!(!conf.contains("jetstream {"), "no JetStream on a leaf");
        assert!(conf.contains("default_js_domain: {\"$G\": \"\"}"));
        assert!(!conf.contains("tls"));
    }

    #[test]
    fn local_clients_use_the_executor_inbox() {
        let l = leaf();
        assert_eq!(l.local_inbox_prefix(), "_INBOX.executor-eu-1");
        assert_eq!(l.local_url(), "nats://127.0.0.1:4222");
        assert_eq!(
            l.local_client_env()[1],
            (
                "FLOTILLA_NATS_INBOX_PREFIX".to_string(),
                "_INBOX.executor-eu-1".to_string()
            )
        );
    }

    #[test]
    fn the_hub_ca_is_used_for_tls() {
        let mut l = leaf();
        l.hub_ca_file = Some("/etc/flotilla/hub-ca.pem".into());
        let conf = render_leaf_server_config(&l).unwrap();
        assert!(conf.contains("tls {\n        ca_file: \"/etc/flotilla/hub-ca.pem\""));
    }

    #[test]
    fn bad_input_is_refused_naming_the_field() {
        assert!(LeafServerConfig::member("a.b", "p", "127.0.0.1:4222", vec![]).is_err());
        let mut l = leaf();
        l.hub_urls.clear();
        let e = render_leaf_server_config(&l).unwrap_err().to_string();
        assert!(e.starts_with("hub_urls"), "{e}");
        let mut l = leaf();
        l.hub_urls = vec!["nats-leaf://hub:7422".into()];
        let e = render_leaf_server_config(&l).unwrap_err().to_string();
        assert!(e.starts_with("hub url"), "{e}");
    }
}
