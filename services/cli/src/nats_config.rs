//! `flotilla nats-config`: writes a nats-server configuration (and its
//! `authorization` block alone, `auth.conf`) in which each
//! service and each cluster's executor has its own user, allowed only its
//! own subjects (see `flotilla-nats-auth`), and one env file per user.
//!
//! Passwords already in `<out>/users/` are kept, so adding a cluster and
//! regenerating does not log the running services out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use flotilla_kit::BusArgs;
use flotilla_nats_auth::{
    ServerConfig, ServerTls, User, dev_tls, fleet_roles, render_authorization,
    render_server_config, user_env,
};

#[derive(Debug, Clone, clap::Args)]
pub struct NatsConfigArgs {
    /// A member cluster whose executor gets a user (repeat the flag).
    #[arg(long = "cluster", value_name = "NAME")]
    pub clusters: Vec<String>,

    /// Folder to write `nats-server.conf` and `users/<user>.env` into.
    #[arg(long, default_value = "nats-config")]
    pub out: PathBuf,

    /// Address the server listens on for clients.
    #[arg(long, default_value = "0.0.0.0:4222")]
    pub listen: String,

    /// JetStream store folder, as the server sees it.
    #[arg(long, default_value = "/data")]
    pub store_dir: String,

    /// Monitoring port (`/healthz`); 0 for none.
    #[arg(long, default_value_t = 8222)]
    pub http_port: u16,

    /// Server certificate (PEM), as the server sees it; enables TLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<String>,

    /// Server key (PEM), as the server sees it.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<String>,

    /// CA (PEM) of client certificates, as the server sees it.
    #[arg(long)]
    pub tls_ca: Option<String>,

    /// Require a client certificate signed by --tls-ca (mutual TLS).
    #[arg(long, requires = "tls_ca")]
    pub tls_verify: bool,

    /// Also make a development CA with server and client certificates in
    /// `<out>/tls/` and use them (for one host or a test, not production).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub dev_tls: bool,

    /// Names (DNS or IP) the development server certificate is valid for.
    #[arg(long = "dev-tls-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "nats".to_string()])]
    pub dev_tls_names: Vec<String>,

    /// Where the server finds `<out>/tls/` (a mount path in a container);
    /// the absolute path of `<out>/tls` by default.
    #[arg(long)]
    pub dev_tls_server_dir: Option<String>,
}

/// Passwords of users written earlier, by user name.
fn existing_passwords(users_dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(users_dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let mut user = None;
        let mut password = None;
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("FLOTILLA_NATS_USER=") {
                user = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("FLOTILLA_NATS_PASSWORD=") {
                password = Some(v.to_string());
            }
        }
        if let (Some(u), Some(p)) = (user, password) {
            out.insert(u, p);
        }
    }
    out
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes the configuration; returns the path of `nats-server.conf`.
pub fn run(bus: &BusArgs, args: &NatsConfigArgs) -> anyhow::Result<PathBuf> {
    let bus = bus.validate()?;
    let users_dir = args.out.join("users");
    std::fs::create_dir_all(&users_dir)
        .with_context(|| format!("creating {}", users_dir.display()))?;
    let known = existing_passwords(&users_dir);
    let users: Vec<User> = fleet_roles(&args.clusters)?
        .into_iter()
        .map(|role| match known.get(&role.user()) {
            Some(password) => User {
                role,
                password: password.clone(),
            },
            None => User::generated(role),
        })
        .collect();

    let tls = if args.dev_tls {
        let dir = args.out.join("tls");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = dev_tls(&args.dev_tls_names, "flotilla")?;
        for (name, pem) in [
            ("ca.pem", &files.ca_cert),
            ("server.pem", &files.server_cert),
            ("server-key.pem", &files.server_key),
            ("client.pem", &files.client_cert),
            ("client-key.pem", &files.client_key),
        ] {
            write(&dir.join(name), pem)?;
        }
        let server_dir = match &args.dev_tls_server_dir {
            Some(d) => d.clone(),
            None => std::path::absolute(&dir)
                .with_context(|| format!("resolving {}", dir.display()))?
                .display()
                .to_string(),
        };
        Some(ServerTls {
            cert_file: format!("{server_dir}/server.pem"),
            key_file: format!("{server_dir}/server-key.pem"),
            ca_file: Some(format!("{server_dir}/ca.pem")),
            verify_clients: args.tls_verify,
        })
    } else {
        match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTls {
                cert_file: cert.clone(),
                key_file: key.clone(),
                ca_file: args.tls_ca.clone(),
                verify_clients: args.tls_verify,
            }),
            _ => None,
        }
    };

    let server = ServerConfig {
        subjects: bus.subjects.clone(),
        topology: bus.topology.clone(),
        users: users.clone(),
        listen: args.listen.clone(),
        store_dir: args.store_dir.clone(),
        http_port: (args.http_port != 0).then_some(args.http_port),
        tls,
    };
    let conf_path = args.out.join("nats-server.conf");
    write(&conf_path, &render_server_config(&server)?)?;
    write(&args.out.join("auth.conf"), &render_authorization(&server)?)?;
    for user in &users {
        let env: String = user_env(user)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        write(&users_dir.join(format!("{}.env", user.role.user())), &env)?;
    }
    Ok(conf_path)
}
