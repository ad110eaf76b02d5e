//! The hub's servers: a NATS cluster whose JetStream holds every stream,
//! bucket and object store (with `--stream-replicas 3` on a cluster of
//! three), and whose leaf node port the member clusters' leaf servers
//! ([`crate::leaf`]) connect to.
//!
//! Every server of the hub gets its own file from
//! [`render_hub_server_config`]: the same cluster name and routes, its
//! own `server_name`, store and ports. A route to the server itself is
//! allowed (nats-server ignores it), so one route list serves them all.
//!
//! Leaf connections log in with the fleet's users (the `authorization`
//! block also applies to the leaf node port when that has none of its
//! own): a member's leaf server uses its executor's user, so what the
//! member may publish and receive over the leaf is exactly what its
//! executor may.

use std::fmt::Write as _;

use flotilla_proto::{Subjects, Topology};

use crate::{AuthError, ServerTls, User, quoted, render_tls, render_users};

/// nats-server denies the JetStream API, `$KV.>` and `$OBJ.>` across the
/// leaf connection of an ordinary account (here the global one, `$G`)
/// unless both sides share their system account, which would hand the
/// member the whole server. This option, on the hub and on the leaf, lets
/// the global account's JetStream traffic cross to the hub's JetStream;
/// each leaf's user still limits what crosses. nats-server logs it as a
/// backwards-compatibility option at start; a JetStream domain on the hub,
/// with clients of the leaves using it, is the way once it is removed.
pub(crate) const JETSTREAM_ACROSS_LEAVES: &str = "# The leaves' clients use the hub's JetStream: the global account's\n\
# JetStream traffic crosses leaf connections (within the leaf user's\n\
# permissions).\n\
default_js_domain: {\"$G\": \"\"}\n";

/// The fleet's users and what they may do; the hub's `authorization`.
#[derive(Debug, Clone)]
pub struct FleetUsers {
    pub subjects: Subjects,
    pub topology: Topology,
    pub users: Vec<User>,
}

/// The cluster the hub's servers form.
#[derive(Debug, Clone)]
pub struct HubCluster {
    /// The cluster's name, the same on every server (`flotilla-hub`).
    pub name: String,
    /// `host:port` this server accepts routes from the others on.
    pub listen: String,
    /// `host:port` of every server's cluster port (this one's may be
    /// among them).
    pub routes: Vec<String>,
    /// User and password the servers log in to each other's cluster port
    /// with. Without them anyone who reaches that port may join the
    /// cluster, so it must then be reachable by the hub's servers only.
    pub credentials: Option<RouteCredentials>,
}

/// The login between the hub's servers (the same on all of them).
#[derive(Debug, Clone)]
pub struct RouteCredentials {
    pub user: String,
    pub password: String,
}

/// Where member clusters' leaf servers connect.
#[derive(Debug, Clone)]
pub struct LeafnodeListen {
    /// `host:port` (nats-server's default port for leaf nodes is 7422).
    pub listen: String,
    /// TLS on the leaf node port (the leaf then needs the CA,
    /// [`crate::LeafServerConfig::hub_ca_file`]).
    pub tls: Option<ServerTls>,
}

/// One server of the hub.
#[derive(Debug, Clone)]
pub struct HubServerConfig {
    /// Unique in the cluster (`hub-1`); JetStream names its peers by it.
    pub server_name: String,
    /// `host:port` for clients (the control services, the operator).
    pub listen: String,
    /// Port of the monitoring endpoint (`/healthz`, `/jsz`), if any.
    pub http_port: Option<u16>,
    /// This server's own JetStream store folder.
    pub store_dir: String,
    /// TLS on the client port.
    pub tls: Option<ServerTls>,
    pub cluster: HubCluster,
    pub leafnodes: LeafnodeListen,
    /// The fleet's users. `None` writes no `authorization` block: every
    /// client and leaf may do everything (tests, a closed network).
    pub authorization: Option<FleetUsers>,
}

/// `value` as `host:port`, for `field` in an error; the host may be a
/// bracketed IPv6 address.
pub(crate) fn host_port(field: &'static str, value: &str) -> Result<String, AuthError> {
    let invalid = |reason| AuthError::Invalid {
        field,
        value: value.to_string(),
        reason,
    };
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| invalid("is not host:port"))?;
    if host.is_empty() || host.contains(['/', '@', ' ', '\t', '"', '\\', '\n', '\r']) {
        return Err(invalid("has no valid host before the port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(value.to_string()),
        _ => Err(invalid("has no port number in 1..=65535")),
    }
}

/// A name nats-server takes as one token (server and cluster names).
pub(crate) fn plain_name(field: &'static str, value: &str) -> Result<String, AuthError> {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if ok {
        Ok(value.to_string())
    } else {
        Err(AuthError::Invalid {
            field,
            value: value.to_string(),
            reason: "must be letters, digits, '-' or '_'",
        })
    }
}

/// `user:password@` for a URL, each part percent-encoded except the
/// characters RFC 3986 leaves unreserved.
pub(crate) fn url_userinfo(user: &str, password: &str) -> String {
    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }
    format!("{}:{}@", encode(user), encode(password))
}

/// A complete configuration for one server of the hub.
pub fn render_hub_server_config(config: &HubServerConfig) -> Result<String, AuthError> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# A server of the Flotilla hub, written from the bus contracts.\n\
         # Regenerate it, rather than editing it, after adding a cluster."
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
    let _ = writeln!(
        out,
        "jetstream {{\n  store_dir: {}\n}}",
        quoted(&config.store_dir)?
    );
    if let Some(tls) = &config.tls {
        out.push_str(&render_tls(tls, "")?);
    }

    let cluster = &config.cluster;
    let _ = writeln!(out, "cluster {{");
    let _ = writeln!(
        out,
        "  name: {}",
        quoted(&plain_name("cluster name", &cluster.name)?)?
    );
    let _ = writeln!(
        out,
        "  listen: {}",
        quoted(&host_port("cluster listen", &cluster.listen)?)?
    );
    let userinfo = match &cluster.credentials {
        Some(c) => {
            let _ = writeln!(
                out,
                "  authorization {{\n    user: {}\n    password: {}\n  }}",
                quoted(&c.user)?,
                quoted(&c.password)?
            );
            url_userinfo(&c.user, &c.password)
        }
        None => String::new(),
    };
    if cluster.routes.is_empty() {
        return Err(AuthError::Invalid {
            field: "routes",
            value: String::new(),
            reason: "a hub needs the cluster ports of its servers",
        });
    }
    let _ = writeln!(out, "  routes: [");
    for route in &cluster.routes {
        let route = host_port("route", route)?;
        let _ = writeln!(
            out,
            "    {}",
            quoted(&format!("nats-route://{userinfo}{route}"))?
        );
    }
    let _ = writeln!(out, "  ]\n}}");

    let _ = writeln!(out, "leafnodes {{");
    let _ = writeln!(
        out,
        "  listen: {}",
        quoted(&host_port("leafnodes listen", &config.leafnodes.listen)?)?
    );
    if let Some(tls) = &config.leafnodes.tls {
        out.push_str(&render_tls(tls, "  ")?);
    }
    let _ = writeln!(out, "}}");
    out.push_str(JETSTREAM_ACROSS_LEAVES);

    if let Some(fleet) = &config.authorization {
        out.push_str(&render_users(
            &fleet.subjects,
            &fleet.topology,
            &fleet.users,
        )?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Role, fleet_roles};

    fn hub(i: u16, authorization: Option<FleetUsers>) -> HubServerConfig {
        HubServerConfig {
            server_name: format!("hub-{i}"),
            listen: format!("127.0.0.1:{}", 4222 + i),
            http_port: None,
            store_dir: format!("/data/hub-{i}"),
            tls: None,
            cluster: HubCluster {
                name: "flotilla-hub".into(),
                listen: format!("127.0.0.1:{}", 6222 + i),
                routes: (1..=3).map(|j| format!("127.0.0.1:{}", 6222 + j)).collect(),
                credentials: None,
            },
            leafnodes: LeafnodeListen {
                listen: format!("0.0.0.0:{}", 7422 + i),
                tls: None,
            },
            authorization,
        }
    }

    #[test]
    fn a_hub_server_has_its_name_routes_and_leaf_port() {
        let conf = render_hub_server_config(&hub(2, None)).unwrap();
        assert!(conf.contains("server_name: \"hub-2\""), "{conf}");
        assert!(conf.contains("store_dir: \"/data/hub-2\""));
        assert!(conf.contains("name: \"flotilla-hub\""));
        assert!(conf.contains("listen: \"127.0.0.1:6224\""));
        for j in 1..=3 {
            assert!(conf.contains(&format!("\"nats-route://127.0.0.1:{}\"", 6222 + j)));
        }
        assert!(conf.contains("leafnodes {\n  listen: \"0.0.0.0:7424\"\n}"));
        assert!(conf.contains("default_js_domain: {\"$G\": \"\"}"));
        assert!(!conf.contains("authorization"), "open without users");
    }

    #[test]
    fn the_fleet_users_and_route_credentials_are_written() {
        let subjects = Subjects::default();
        let topology = Topology::new(&subjects, 3);
        let users = fleet_roles(&["a".into()])
            .unwrap()
            .into_iter()
            .map(User::generated)
            .collect();
        let mut config = hub(
            1,
            Some(FleetUsers {
                subjects,
                topology,
                users,
            }),
        );
        config.cluster.credentials = Some(RouteCredentials {
            user: "route".into(),
            password: "p@ss word".into(),
        });
        config.leafnodes.tls = Some(ServerTls {
            cert_file: "/tls/server.pem".into(),
            key_file: "/tls/server-key.pem".into(),
            ca_file: None,
            verify_clients: false,
        });
        let conf = render_hub_server_config(&config).unwrap();
        assert!(conf.contains(&format!(
            "user: \"{}\"",
            Role::executor("a").unwrap().user()
        )));
        assert!(conf.contains("\"nats-route://route:p%40ss%20word@127.0.0.1:6223\""));
        assert!(conf.contains("  tls {\n    cert_file: \"/tls/server.pem\""));
    }

    #[test]
    fn bad_names_and_addresses_are_refused_naming_the_field() {
        type Tweak = fn(&mut HubServerConfig);
        let cases: Vec<(Tweak, &str)> = vec![
            (|c| c.server_name = "hub 1".into(), "server_name"),
            (|c| c.cluster.name = "a.b".into(), "cluster name"),
            (|c| c.listen = "4222".into(), "listen"),
            (|c| c.cluster.listen = "host:0".into(), "cluster listen"),
            (|c| c.cluster.routes = vec!["x\":1".into()], "route"),
            (|c| c.cluster.routes.clear(), "routes"),
            (|c| c.leafnodes.listen = ":7422".into(), "leafnodes listen"),
        ];
        for (tweak, field) in cases {
            let mut c = hub(1, None);
            tweak(&mut c);
            let e = render_hub_server_config(&c).unwrap_err().to_string();
            assert!(e.starts_with(field), "{field}: {e}");
        }
    }
}
