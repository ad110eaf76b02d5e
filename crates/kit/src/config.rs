//! The bus flags every service takes. Each flag has a `FLOTILLA_*`
//! environment variable; [`BusArgs::validate`] fails fast, naming the flag.

use std::path::PathBuf;

use flotilla_proto::{Subjects, Topology};

/// A flag whose value cannot work, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag}: {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub reason: String,
}

impl ConfigError {
    pub fn new(flag: &'static str, reason: impl Into<String>) -> Self {
        Self {
            flag,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BusArgs {
    /// NATS server URL; several, comma-separated, for the servers of a
    /// cluster (the client picks one and moves to another when it fails).
    #[arg(
        long,
        env = "FLOTILLA_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,

    /// NATS credentials file (JWT + nkey seed).
    #[arg(long, env = "FLOTILLA_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// NATS user name (with --nats-password), as `flotilla nats-config`
    /// writes them.
    #[arg(long, env = "FLOTILLA_NATS_USER")]
    pub nats_user: Option<String>,

    /// NATS password of --nats-user.
    #[arg(long, env = "FLOTILLA_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,

    /// Subject prefix of this connection's reply inboxes. A server that
    /// gives each user its own inboxes (`flotilla nats-config` does:
    /// `_INBOX.<user>`) needs it; defaults to `_INBOX.<user>` with
    /// --nats-user, else `_INBOX`.
    #[arg(long, env = "FLOTILLA_NATS_INBOX_PREFIX")]
    pub nats_inbox_prefix: Option<String>,

    /// Refuse a NATS connection that is not TLS (also without a CA file:
    /// the server is then verified against the system's roots).
    #[arg(long, env = "FLOTILLA_NATS_REQUIRE_TLS")]
    pub nats_require_tls: bool,

    /// CA certificate (PEM) to verify the NATS server with; enables TLS.
    #[arg(long, env = "FLOTILLA_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS; needs --nats-tls-key.
    #[arg(long, env = "FLOTILLA_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,

    /// Client key (PEM) for mutual TLS; needs --nats-tls-cert.
    #[arg(long, env = "FLOTILLA_NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,

    /// First token of every subject; also names the streams and buckets.
    #[arg(long, env = "FLOTILLA_SUBJECT_PREFIX", default_value = flotilla_proto::DEFAULT_PREFIX)]
    pub subject_prefix: String,

    /// Replicas of every stream and bucket (1 for one server, 3 for a
    /// JetStream cluster).
    #[arg(long, env = "FLOTILLA_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
}

impl Default for BusArgs {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_creds: None,
            nats_user: None,
            nats_password: None,
            nats_inbox_prefix: None,
            nats_require_tls: false,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            subject_prefix: flotilla_proto::DEFAULT_PREFIX.into(),
            stream_replicas: 1,
        }
    }
}

/// Validated bus settings.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub nats_url: String,
    pub creds: Option<PathBuf>,
    /// User name and password.
    pub user_password: Option<(String, String)>,
    pub inbox_prefix: Option<String>,
    pub require_tls: bool,
    pub tls_ca: Option<PathBuf>,
    pub tls_client: Option<(PathBuf, PathBuf)>,
    pub subjects: Subjects,
    pub topology: Topology,
}

impl BusConfig {
    /// Settings for a server at `url` with every other value defaulted.
    pub fn for_url(url: impl Into<String>) -> Result<Self, ConfigError> {
        BusArgs {
            nats_url: url.into(),
            ..BusArgs::default()
        }
        .validate()
    }

    /// The same settings with another subject prefix.
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self, ConfigError> {
        self.subjects =
            Subjects::new(prefix).map_err(|e| ConfigError::new("subject-prefix", e.to_string()))?;
        self.topology = Topology::new(&self.subjects, self.topology.control.replicas);
        Ok(self)
    }
}

/// The servers of `--nats-url`: one URL, or several separated by commas
/// (the servers of a cluster, which a client fails over between). Each is
/// checked on its own, and an error names the one that is wrong.
pub fn server_addrs(nats_url: &str) -> Result<Vec<async_nats::ServerAddr>, ConfigError> {
    if nats_url.trim().is_empty() {
        return Err(ConfigError::new("nats-url", "is empty"));
    }
    let several = nats_url.contains(',');
    nats_url
        .split(',')
        .enumerate()
        .map(|(i, url)| {
            let url = url.trim();
            let which = if several {
                format!("server {} of the list, {url:?},", i + 1)
            } else {
                format!("{url:?}")
            };
            if url.is_empty() {
                return Err(ConfigError::new(
                    "nats-url",
                    format!("{which} is empty (a stray comma?)"),
                ));
            }
            let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|s| url.starts_with(s))
                || !url.contains("://");
            if !scheme_ok {
                return Err(ConfigError::new(
                    "nats-url",
                    format!("{which} must use nats://, tls://, ws:// or wss://"),
                ));
            }
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| ConfigError::new("nats-url", format!("{which} is not valid: {e}")))
        })
        .collect()
}

impl BusArgs {
    pub fn validate(&self) -> Result<BusConfig, ConfigError> {
        server_addrs(&self.nats_url)?;
        let existing = |flag: &'static str, p: &Option<PathBuf>| -> Result<(), ConfigError> {
            match p {
                Some(p) if !p.is_file() => Err(ConfigError::new(
                    flag,
                    format!("{} is not a readable file", p.display()),
                )),
                _ => Ok(()),
            }
        };
        existing("nats-creds", &self.nats_creds)?;
        existing("nats-tls-ca", &self.nats_tls_ca)?;
        existing("nats-tls-cert", &self.nats_tls_cert)?;
        existing("nats-tls-key", &self.nats_tls_key)?;
        let tls_client = match (&self.nats_tls_cert, &self.nats_tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "nats-tls-key",
                    "is needed with --nats-tls-cert",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "nats-tls-cert",
                    "is needed with --nats-tls-key",
                ));
            }
        };
        let user_password = match (&self.nats_user, &self.nats_password) {
            (Some(u), Some(p)) if !u.is_empty() => Some((u.clone(), p.clone())),
            (Some(_), Some(_)) => return Err(ConfigError::new("nats-user", "is empty")),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "nats-password",
                    "is needed with --nats-user",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "nats-user",
                    "is needed with --nats-password",
                ));
            }
        };
        if user_password.is_some() && self.nats_creds.is_some() {
            return Err(ConfigError::new(
                "nats-user",
                "cannot be combined with --nats-creds; choose one way to authenticate",
            ));
        }
        let inbox_prefix = match (&self.nats_inbox_prefix, &user_password) {
            (Some(p), _) => Some(p.clone()),
            (None, Some((user, _))) => Some(format!("_INBOX.{user}")),
            (None, None) => None,
        };
        if let Some(p) = &inbox_prefix {
            let bad = p.is_empty()
                || p.split('.')
                    .any(|t| t.is_empty() || t.contains(['*', '>', ' ', '\t']));
            if bad {
                return Err(ConfigError::new(
                    "nats-inbox-prefix",
                    format!("{p:?} is not a subject without wildcards"),
                ));
            }
        }
        if !(1..=5).contains(&self.stream_replicas) {
            return Err(ConfigError::new(
                "stream-replicas",
                format!("{} is outside 1..=5", self.stream_replicas),
            ));
        }
        let subjects = Subjects::new(&self.subject_prefix)
            .map_err(|e| ConfigError::new("subject-prefix", e.to_string()))?;
        let topology = Topology::new(&subjects, self.stream_replicas);
        Ok(BusConfig {
            nats_url: self.nats_url.clone(),
            creds: self.nats_creds.clone(),
            user_password,
            inbox_prefix,
            require_tls: self.nats_require_tls,
            tls_ca: self.nats_tls_ca.clone(),
            tls_client,
            subjects,
            topology,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = BusArgs::default().validate().unwrap();
        assert_eq!(c.subjects.prefix(), "flotilla");
        assert_eq!(c.nats_url, "nats://127.0.0.1:4222");
    }

    #[test]
    fn a_user_gets_its_own_inboxes() {
        let c = BusArgs {
            nats_user: Some("executor-a".into()),
            nats_password: Some("secret".into()),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(c.inbox_prefix.as_deref(), Some("_INBOX.executor-a"));
        assert_eq!(BusArgs::default().validate().unwrap().inbox_prefix, None);
    }

    #[test]
    fn several_servers_are_each_checked() {
        let addrs = server_addrs("nats://a:4222, nats://b:4223 ,c:4224").unwrap();
        let hosts: Vec<_> = addrs
            .iter()
            .map(|a| (a.host().to_string(), a.port()))
            .collect();
        assert_eq!(
            hosts,
            vec![
                ("a".to_string(), 4222),
                ("b".to_string(), 4223),
                ("c".to_string(), 4224)
            ]
        );
        for (url, names) in [
            (
                "nats://a:4222,http://b:4222",
                "server 2 of the list, \"http://b:4222\"",
            ),
            (
                "nats://a:4222,,nats://c:4222",
                "server 2 of the list, \"\", is empty",
            ),
            (
                "nats://a:4222,nats://b:99999",
                "\"nats://b:99999\", is not valid",
            ),
            ("nats://a:notaport", "\"nats://a:notaport\" is not valid"),
        ] {
            let e = BusArgs {
                nats_url: url.into(),
                ..Default::default()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("--nats-url: "), "{e}");
            assert!(e.contains(names), "{url}: {e}");
        }
    }

    #[test]
    fn errors_name_the_flag() {
        let cases: Vec<(BusArgs, &str)> = vec![
            (
                BusArgs {
                    nats_url: " ".into(),
                    ..Default::default()
                },
                "--nats-url",
            ),
            (
                BusArgs {
                    nats_url: "http://x:4222".into(),
                    ..Default::default()
                },
                "--nats-url",
            ),
            (
                BusArgs {
                    nats_creds: Some("/nonexistent/creds".into()),
                    ..Default::default()
                },
                "--nats-creds",
            ),
            (
                BusArgs {
                    subject_prefix: "a.b".into(),
                    ..Default::default()
                },
                "--subject-prefix",
            ),
            (
                BusArgs {
                    stream_replicas: 0,
                    ..Default::default()
                },
                "--stream-replicas",
            ),
            (
                BusArgs {
                    nats_tls_cert: Some("Cargo.toml".into()),
                    ..Default::default()
                },
                "--nats-tls-key",
            ),
            (
                BusArgs {
                    nats_user: Some("inventory".into()),
                    ..Default::default()
                },
                "--nats-password",
            ),
            (
                BusArgs {
                    nats_password: Some("secret".into()),
                    ..Default::default()
                },
                "--nats-user",
            ),
            (
                BusArgs {
                    nats_user: Some("inventory".into()),
                    nats_password: Some("secret".into()),
                    nats_creds: Some("Cargo.toml".into()),
                    ..Default::default()
                },
                "--nats-user",
            ),
            (
                BusArgs {
                    nats_inbox_prefix: Some("_INBOX.>".into()),
                    ..Default::default()
                },
                "--nats-inbox-prefix",
            ),
        ];
        for (args, flag) in cases {
            let e = args.validate().unwrap_err().to_string();
            assert!(e.starts_with(flag), "{e}");
        }
    }
}
