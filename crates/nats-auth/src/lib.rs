//! NATS server authorization for a Flotilla fleet.
//!
//! One NATS user per control service, one per executor (per cluster) and
//! one for the operator, each allowed to publish and subscribe only what
//! its part of the bus needs ([`permissions`]), all derived from the
//! contracts crate so they cannot drift from the subjects the services
//! use. [`render_server_config`] writes a complete nats-server
//! configuration (JetStream, users, optional TLS); [`dev_tls`] makes a
//! throw-away CA with server and client certificates for tests and
//! single-host installs. `flotilla nats-config` is the command line over
//! this crate.
//!
//! A multi-cluster fleet runs its hub as a NATS cluster ([`hub`]: routes
//! between the hub's servers, a leaf node port for the members) and one
//! leaf node server per member cluster ([`leaf`]), which logs in to the
//! hub as that cluster's executor and so is confined exactly as the
//! executor is.
//!
//! Start reading at [`permissions`].

mod dev_tls;
pub mod hub;
pub mod leaf;
mod permissions;

use std::fmt::Write as _;

use flotilla_proto::{Subjects, Topology};
use rand::Rng;

pub use dev_tls::{DevTls, dev_tls};
pub use hub::{
    FleetUsers, HubCluster, HubServerConfig, LeafnodeListen, RouteCredentials,
    render_hub_server_config,
};
pub use leaf::{LeafServerConfig, render_leaf_server_config};
pub use permissions::{Permissions, Role, executor_consumers, permissions};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cluster {0:?}: {1}")]
    Cluster(String, #[source] flotilla_proto::InvalidName),
    #[error("{0} must not contain '\"', '\\\\' or a line break")]
    Unquotable(String),
    #[error("certificate generation failed: {0}")]
    Tls(#[source] rcgen::Error),
    #[error("hashing a password failed: {0}")]
    Hash(#[source] bcrypt::BcryptError),
    #[error("{field} {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// bcrypt cost of the hashes in the server configuration: what nats-server
/// documents as its minimum, checked once per client connection.
const BCRYPT_COST: u32 = 11;

/// The form nats-server stores: a bcrypt hash (`$2a$`), so the server's
/// configuration does not reveal the passwords.
pub fn password_hash(password: &str) -> Result<String, AuthError> {
    bcrypt::hash_with_result(password, BCRYPT_COST)
        .map(|h| h.format_for_version(bcrypt::Version::TwoA))
        .map_err(AuthError::Hash)
}

/// One user of the server and its secret.
#[derive(Debug, Clone)]
pub struct User {
    pub role: Role,
    pub password: String,
}

impl User {
    /// A user with a fresh random password (32 alphanumerics).
    pub fn generated(role: Role) -> Self {
        Self {
            role,
            password: generate_password(),
        }
    }
}

pub fn generate_password() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// Paths as the server will see them.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_file: String,
    pub key_file: String,
    /// CA that signed the clients' certificates.
    pub ca_file: Option<String>,
    /// Require every client to present a certificate signed by `ca_file`.
    pub verify_clients: bool,
}

/// Everything the generated server configuration says.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub subjects: Subjects,
    pub topology: Topology,
    pub users: Vec<User>,
    /// `host:port` for clients.
    pub listen: String,
    /// JetStream store folder.
    pub store_dir: String,
    /// Port of the monitoring endpoint (`/healthz`), if any.
    pub http_port: Option<u16>,
    pub tls: Option<ServerTls>,
}

/// The users of a fleet: every control service, one executor per
/// cluster, and the operator.
pub fn fleet_roles(clusters: &[String]) -> Result<Vec<Role>, AuthError> {
    let mut roles: Vec<Role> = Role::CONTROL.to_vec();
    for c in clusters {
        let role = Role::executor(c)?;
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    roles.push(Role::Admin);
    Ok(roles)
}

fn quoted(value: &str) -> Result<String, AuthError> {
    if value.contains(['"', '\\', '\n', '\r']) {
        return Err(AuthError::Unquotable(value.to_string()));
    }
    // Quoted, so the parser takes `$JS...` literally, not as a variable.
    Ok(format!("\"{value}\""))
}

fn list(values: &[String]) -> Result<String, AuthError> {
    let items = values
        .iter()
        .map(|v| quoted(v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(format!("[{}]", items.join(", ")))
}

/// A complete nats-server configuration.
pub fn render_server_config(config: &ServerConfig) -> Result<String, AuthError> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by `flotilla nats-config` from the bus contracts (subject prefix \
         {:?}).\n# Regenerate it, rather than editing it, after adding a cluster.",
        config.subjects.prefix()
    );
    let _ = writeln!(out, "listen: {}", quoted(&config.listen)?);
    if let Some(port) = config.http_port {
        let _ = writeln!(out, "http_port: {port}");
    }
    let _ = writeln!(
        out,
        "jetstream {{\n  store_dir: {}\n}}",
        quoted(&config.store_dir)?
    );
    if let Some(tls) = &config.tls {
        out.push_str(&render_tls(tls, "")?);
    }
    out.push_str(&render_authorization(config)?);
    Ok(out)
}

/// A `tls { ... }` block, each line prefixed with `indent`.
fn render_tls(tls: &ServerTls, indent: &str) -> Result<String, AuthError> {
    let mut out = String::new();
    let _ = writeln!(out, "{indent}tls {{");
    let _ = writeln!(out, "{indent}  cert_file: {}", quoted(&tls.cert_file)?);
    let _ = writeln!(out, "{indent}  key_file: {}", quoted(&tls.key_file)?);
    if let Some(ca) = &tls.ca_file {
        let _ = writeln!(out, "{indent}  ca_file: {}", quoted(ca)?);
    }
    let _ = writeln!(out, "{indent}  verify: {}", tls.verify_clients);
    let _ = writeln!(out, "{indent}  timeout: 5\n{indent}}}");
    Ok(out)
}

/// Only the `authorization { users = [...] }` block, to `include` into a
/// server configuration managed elsewhere (the official NATS Helm chart).
pub fn render_authorization(config: &ServerConfig) -> Result<String, AuthError> {
    render_users(&config.subjects, &config.topology, &config.users)
}

fn render_users(
    subjects: &Subjects,
    topology: &Topology,
    users: &[User],
) -> Result<String, AuthError> {
    let mut out = String::new();
    let _ = writeln!(out, "authorization {{\n  users = [");
    for user in users {
        let p = permissions(&user.role, subjects, topology);
        let _ = writeln!(out, "    {{");
        let _ = writeln!(out, "      user: {}", quoted(&user.role.user())?);
        let _ = writeln!(
            out,
            "      password: {}",
            quoted(&password_hash(&user.password)?)?
        );
        let _ = writeln!(out, "      permissions: {{");
        let _ = writeln!(out, "        publish: {{ allow: {} }}", list(&p.publish)?);
        let _ = writeln!(
            out,
            "        subscribe: {{ allow: {} }}",
            list(&p.subscribe)?
        );
        if p.allow_responses {
            let _ = writeln!(out, "        allow_responses: true");
        }
        let _ = writeln!(out, "      }}\n    }}");
    }
    let _ = writeln!(out, "  ]\n}}");
    Ok(out)
}

/// The environment a service needs to log in as `user`, in `KEY=value`
/// lines (a Docker `env_file`, a Kubernetes secret's data).
pub fn user_env(user: &User) -> Vec<(String, String)> {
    vec![
        ("FLOTILLA_NATS_USER".into(), user.role.user()),
        ("FLOTILLA_NATS_PASSWORD".into(), user.password.clone()),
        (
            "FLOTILLA_NATS_INBOX_PREFIX".into(),
            user.role.inbox_prefix(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_user_with_quoted_subjects() {
        let subjects = Subjects::default();
        let topology = Topology::new(&subjects, 1);
        let users: Vec<User> = fleet_roles(&["a".into(), "b".into()])
            .unwrap()
            .into_iter()
            .map(User::generated)
            .collect();
        let conf = render_server_config(&ServerConfig {
            subjects,
            topology,
            users: users.clone(),
            listen: "0.0.0.0:4222".into(),
            store_dir: "/data".into(),
            http_port: Some(8222),
            tls: None,
        })
        .unwrap();
        for user in [
            "inventory",
            "placement",
            "rollout",
            "model-provisioner",
            "gateway",
            "executor-a",
            "executor-b",
            "admin",
        ] {
            assert!(conf.contains(&format!("user: \"{user}\"")), "{user}");
        }
        assert!(conf.contains("\"$KV.replicas.a.>\""));
        // Passwords are stored as bcrypt hashes only.
        let hash = conf
            .lines()
            .find_map(|l| l.trim().strip_prefix("password: \""))
            .unwrap()
            .trim_end_matches('"');
        assert!(hash.starts_with("$2a$11$"), "{hash}");
        assert!(bcrypt::verify(&users[0].password, hash).unwrap());
        for user in &users {
            assert!(!conf.contains(&user.password), "a password in clear");
        }
        assert!(!conf.contains(" $JS"), "every subject is quoted");
    }

    #[test]
    fn refuses_values_that_would_break_the_file() {
        assert!(quoted("a\"b").is_err());
        assert!(fleet_roles(&["not a name".into()]).is_err());
    }
}
