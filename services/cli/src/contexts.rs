//! Contexts: named fleets in `~/.config/flotilla/config`, as kubectl keeps
//! clusters in a kubeconfig. A context holds the bus settings of one fleet,
//! secrets only by file path, so nothing secret is typed on a command line
//! or shows in `ps`. It may also name a context of the `nats` CLI
//! (`~/.config/nats/context/NAME.json`) to take the server and credentials
//! from there.
//!
//! Precedence, highest first: flags and `FLOTILLA_*` variables, the
//! context's own settings, its NATS context, the built-in defaults.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use flotilla_kit::BusArgs;
use serde::{Deserialize, Serialize};

/// The bus flags a context can set, by clap id.
pub const CONTEXT_FLAGS: &[&str] = &[
    "nats_url",
    "nats_creds",
    "nats_user",
    "nats_password",
    "nats_inbox_prefix",
    "nats_require_tls",
    "nats_tls_ca",
    "nats_tls_cert",
    "nats_tls_key",
    "subject_prefix",
];

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<FleetContext>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FleetContext {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_creds: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_user: Option<String>,
    /// A file whose content (trailing newline removed) is the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_password_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_inbox_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_require_tls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_tls_ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_tls_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_tls_key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_prefix: Option<String>,
    /// A context of the `nats` CLI to start from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_context: Option<String>,
}

/// The fields of a `nats` CLI context this reads; the rest are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NatsCliContext {
    url: String,
    creds: String,
    user: String,
    password: String,
    ca: String,
    cert: String,
    key: String,
    inbox_prefix: String,
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// The contexts, the current one marked `*`.
    GetContexts,
    /// The current context's name.
    CurrentContext,
    /// Make a context the one commands use.
    UseContext { name: String },
    /// Create or change a context from the bus flags given with it
    /// (`--nats-url`, `--nats-creds`, `--nats-user`, `--nats-tls-ca`, …).
    #[command(after_help = "Examples:
  flotilla config set-context prod --nats-url tls://nats.prod:4222 \\
      --nats-creds ~/.config/flotilla/prod.creds --nats-tls-ca ~/prod-ca.pem
  flotilla config set-context lab --nats-user cli --nats-password-file ~/.lab-password
  flotilla config set-context ngs --nats-context ngs   # the nats CLI's context")]
    SetContext(SetContextArgs),
    /// Remove a context.
    DeleteContext { name: String },
    /// The whole configuration file.
    View,
}

#[derive(Debug, Args)]
pub struct SetContextArgs {
    pub name: String,
    /// A file holding the password of --nats-user (never the password
    /// itself on the command line).
    #[arg(long)]
    pub nats_password_file: Option<PathBuf>,
    /// Start from this context of the `nats` CLI.
    #[arg(long)]
    pub nats_context: Option<String>,
    /// Make it the current context too.
    #[arg(long)]
    pub current: bool,
}

/// `$FLOTILLA_CONFIG`, else `$XDG_CONFIG_HOME/flotilla/config`, else
/// `~/.config/flotilla/config`.
pub fn config_path() -> PathBuf {
    if let Some(path) = std::env::var_os("FLOTILLA_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    config_home().join("flotilla/config")
}

fn config_home() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".config"))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The configuration at `path`; empty when there is no file.
pub fn load(path: &Path) -> anyhow::Result<Config> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if text.trim().is_empty() {
        return Ok(Config::default());
    }
    serde_yaml::from_str(&text).with_context(|| {
        format!(
            "{} is not a flotilla configuration; fix it or remove it and run `flotilla config set-context`",
            path.display()
        )
    })
}

fn save(path: &Path, config: &Config) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_yaml::to_string(config)?;
    // Written whole, then renamed: a crash leaves the old file or the new.
    let tmp = path.with_extension("tmp");
    // It names credential files; keep it to its owner like a kubeconfig.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

impl Config {
    fn find(&self, name: &str) -> anyhow::Result<&FleetContext> {
        self.contexts
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| self.unknown(name))
    }

    fn unknown(&self, name: &str) -> anyhow::Error {
        if self.contexts.is_empty() {
            anyhow::anyhow!(
                "no context {name:?}: {} has none; create one with `flotilla config set-context {name} --nats-url …`",
                config_path().display()
            )
        } else {
            let names: Vec<&str> = self.contexts.iter().map(|c| c.name.as_str()).collect();
            anyhow::anyhow!(
                "no context {name:?}; the contexts are {} (`flotilla config get-contexts`)",
                names.join(", ")
            )
        }
    }
}

/// The bus settings a command runs with: `args` with every flag not given
/// (in `explicit`) taken from the chosen context, if there is one.
/// `chosen` is `--context`; without it, the file's current context.
pub fn effective(
    args: &BusArgs,
    explicit: &BTreeSet<String>,
    chosen: Option<&str>,
) -> anyhow::Result<BusArgs> {
    let path = config_path();
    let config = load(&path)?;
    let name = match chosen.or(config.current_context.as_deref()) {
        Some(name) => name,
        None => return Ok(args.clone()),
    };
    let context = config.find(name)?;
    overlay(args, explicit, context, &config_home())
        .with_context(|| format!("context {name:?} of {}", path.display()))
}

fn overlay(
    args: &BusArgs,
    explicit: &BTreeSet<String>,
    context: &FleetContext,
    config_home: &Path,
) -> anyhow::Result<BusArgs> {
    let mut out = args.clone();
    let given = |id: &str| explicit.contains(id);
    fn set<T>(slot: &mut T, given: bool, value: Option<T>) {
        if let (false, Some(v)) = (given, value) {
            *slot = v;
        }
    }
    if let Some(nats) = &context.nats_context {
        let ctx = nats_cli_context(config_home, nats)?;
        let text = |s: String| (!s.is_empty()).then_some(s);
        let path = |s: String| text(s).map(|s| expand(Path::new(&s)));
        set(&mut out.nats_url, given("nats_url"), text(ctx.url));
        set(
            &mut out.nats_creds,
            given("nats_creds"),
            path(ctx.creds).map(Some),
        );
        set(
            &mut out.nats_user,
            given("nats_user"),
            text(ctx.user).map(Some),
        );
        set(
            &mut out.nats_password,
            given("nats_password"),
            text(ctx.password).map(Some),
        );
        set(
            &mut out.nats_tls_ca,
            given("nats_tls_ca"),
            path(ctx.ca).map(Some),
        );
        set(
            &mut out.nats_tls_cert,
            given("nats_tls_cert"),
            path(ctx.cert).map(Some),
        );
        set(
            &mut out.nats_tls_key,
            given("nats_tls_key"),
            path(ctx.key).map(Some),
        );
        set(
            &mut out.nats_inbox_prefix,
            given("nats_inbox_prefix"),
            text(ctx.inbox_prefix).map(Some),
        );
    }
    let path = |p: &Option<PathBuf>| p.as_deref().map(|p| Some(expand(p)));
    set(
        &mut out.nats_url,
        given("nats_url"),
        context.nats_url.clone(),
    );
    set(
        &mut out.nats_creds,
        given("nats_creds"),
        path(&context.nats_creds),
    );
    set(
        &mut out.nats_user,
        given("nats_user"),
        context.nats_user.clone().map(Some),
    );
    if let Some(file) = &context.nats_password_file {
        let file = expand(file);
        let password = std::fs::read_to_string(&file)
            .with_context(|| format!("nats-password-file {}", file.display()))?;
        set(
            &mut out.nats_password,
            given("nats_password"),
            Some(Some(password.trim_end_matches(['\n', '\r']).to_string())),
        );
    }
    set(
        &mut out.nats_inbox_prefix,
        given("nats_inbox_prefix"),
        context.nats_inbox_prefix.clone().map(Some),
    );
    set(
        &mut out.nats_require_tls,
        given("nats_require_tls"),
        context.nats_require_tls,
    );
    set(
        &mut out.nats_tls_ca,
        given("nats_tls_ca"),
        path(&context.nats_tls_ca),
    );
    set(
        &mut out.nats_tls_cert,
        given("nats_tls_cert"),
        path(&context.nats_tls_cert),
    );
    set(
        &mut out.nats_tls_key,
        given("nats_tls_key"),
        path(&context.nats_tls_key),
    );
    set(
        &mut out.subject_prefix,
        given("subject_prefix"),
        context.subject_prefix.clone(),
    );
    Ok(out)
}

/// `~/…` as the home directory's.
fn expand(path: &Path) -> PathBuf {
    match path.strip_prefix("~") {
        Ok(rest) => home().join(rest),
        Err(_) => path.to_path_buf(),
    }
}

/// A context of the `nats` CLI, from `$XDG_CONFIG_HOME/nats/context`.
fn nats_cli_context(config_home: &Path, name: &str) -> anyhow::Result<NatsCliContext> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        bail!("nats-context {name:?} is not a context name");
    }
    let path = config_home
        .join("nats/context")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "nats-context {name:?}: cannot read {} (`nats context ls` lists the nats CLI's contexts)",
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("nats-context {name:?}: {}", path.display()))
}

/// A path stored in the file: absolute, and existing, so a typo shows now
/// rather than when the context is used.
fn stored_path(flag: &str, path: &Path) -> anyhow::Result<PathBuf> {
    let path = expand(path);
    let absolute =
        std::path::absolute(&path).with_context(|| format!("--{flag} {}", path.display()))?;
    if !absolute.is_file() {
        bail!("--{flag} {}: no such file", absolute.display());
    }
    Ok(absolute)
}

pub fn run(
    action: ConfigAction,
    bus: &BusArgs,
    explicit: &BTreeSet<String>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let path = config_path();
    let mut config = load(&path)?;
    match action {
        ConfigAction::GetContexts => {
            let rows: Vec<Vec<String>> = config
                .contexts
                .iter()
                .map(|c| {
                    let current = config.current_context.as_deref() == Some(c.name.as_str());
                    vec![
                        if current { "*" } else { "" }.to_string(),
                        c.name.clone(),
                        c.nats_url
                            .clone()
                            .or_else(|| {
                                c.nats_context
                                    .as_ref()
                                    .map(|n| format!("(nats context {n})"))
                            })
                            .unwrap_or_else(|| "-".into()),
                        c.subject_prefix.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            if rows.is_empty() {
                writeln!(
                    out,
                    "(no contexts in {}; `flotilla config set-context NAME --nats-url …` adds one)",
                    path.display()
                )?;
            } else {
                write!(
                    out,
                    "{}",
                    crate::table::render(&["CURRENT", "NAME", "NATS-URL", "PREFIX"], &rows)
                )?;
            }
        }
        ConfigAction::CurrentContext => match &config.current_context {
            Some(name) => writeln!(out, "{name}")?,
            None => bail!(
                "no current context in {}; `flotilla config use-context NAME` sets one",
                path.display()
            ),
        },
        ConfigAction::UseContext { name } => {
            config.find(&name)?;
            config.current_context = Some(name.clone());
            save(&path, &config)?;
            writeln!(out, "Switched to context \"{name}\".")?;
        }
        ConfigAction::DeleteContext { name } => {
            config.find(&name)?;
            config.contexts.retain(|c| c.name != name);
            if config.current_context.as_deref() == Some(name.as_str()) {
                config.current_context = None;
            }
            save(&path, &config)?;
            writeln!(out, "deleted context {name} from {}", path.display())?;
        }
        ConfigAction::View => write!(out, "{}", serde_yaml::to_string(&config)?)?,
        ConfigAction::SetContext(args) => {
            if explicit.contains("nats_password") {
                bail!(
                    "--nats-password: a context keeps no password; write it to a file (mode 600) and pass --nats-password-file FILE"
                );
            }
            if args.name.is_empty() {
                bail!("a context needs a name");
            }
            let given = |id: &str| explicit.contains(id);
            let existed = config.contexts.iter().any(|c| c.name == args.name);
            if !existed {
                config.contexts.push(FleetContext {
                    name: args.name.clone(),
                    ..Default::default()
                });
            }
            let Some(context) = config.contexts.iter_mut().find(|c| c.name == args.name) else {
                bail!("context {} vanished", args.name);
            };
            if given("nats_url") {
                flotilla_kit::config::server_addrs(&bus.nats_url)?;
                context.nats_url = Some(bus.nats_url.clone());
            }
            let file = |flag: &str, p: &Option<PathBuf>| -> anyhow::Result<Option<PathBuf>> {
                p.as_deref().map(|p| stored_path(flag, p)).transpose()
            };
            if given("nats_creds") {
                context.nats_creds = file("nats-creds", &bus.nats_creds)?;
            }
            if given("nats_user") {
                context.nats_user = bus.nats_user.clone();
            }
            if let Some(p) = &args.nats_password_file {
                context.nats_password_file = Some(stored_path("nats-password-file", p)?);
            }
            if given("nats_inbox_prefix") {
                context.nats_inbox_prefix = bus.nats_inbox_prefix.clone();
            }
            if given("nats_require_tls") {
                context.nats_require_tls = Some(bus.nats_require_tls);
            }
            if given("nats_tls_ca") {
                context.nats_tls_ca = file("nats-tls-ca", &bus.nats_tls_ca)?;
            }
            if given("nats_tls_cert") {
                context.nats_tls_cert = file("nats-tls-cert", &bus.nats_tls_cert)?;
            }
            if given("nats_tls_key") {
                context.nats_tls_key = file("nats-tls-key", &bus.nats_tls_key)?;
            }
            if given("subject_prefix") {
                flotilla_proto::Subjects::new(&bus.subject_prefix)
                    .map_err(|e| anyhow::anyhow!("--subject-prefix: {e}"))?;
                context.subject_prefix = Some(bus.subject_prefix.clone());
            }
            if let Some(n) = &args.nats_context {
                nats_cli_context(&config_home(), n)?;
                context.nats_context = Some(n.clone());
            }
            if args.current || config.current_context.is_none() {
                config.current_context = Some(args.name.clone());
            }
            save(&path, &config)?;
            let verb = if existed { "modified" } else { "created" };
            writeln!(
                out,
                "Context \"{}\" {verb} in {}.",
                args.name,
                path.display()
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explicit(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_beat_the_context_which_beats_its_nats_context() {
        let dir = tempfile::tempdir().unwrap();
        let nats = dir.path().join("nats/context");
        std::fs::create_dir_all(&nats).unwrap();
        std::fs::write(
            nats.join("lab.json"),
            r#"{"description": "lab", "url": "nats://lab:4222", "user": "ops",
                "password": "from-nats", "ca": "/etc/lab-ca.pem", "jetstream_domain": ""}"#,
        )
        .unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "s3cret\n").unwrap();
        let context = FleetContext {
            name: "lab".into(),
            nats_context: Some("lab".into()),
            nats_password_file: Some(password),
            subject_prefix: Some("lab".into()),
            ..Default::default()
        };
        let args = BusArgs::default();
        let got = overlay(&args, &explicit(&[]), &context, dir.path()).unwrap();
        assert_eq!(got.nats_url, "nats://lab:4222");
        assert_eq!(got.nats_user.as_deref(), Some("ops"));
        assert_eq!(got.nats_password.as_deref(), Some("s3cret"));
        assert_eq!(
            got.nats_tls_ca.as_deref(),
            Some(Path::new("/etc/lab-ca.pem"))
        );
        assert_eq!(got.subject_prefix, "lab");

        let flagged = BusArgs {
            nats_url: "nats://flag:4222".into(),
            ..BusArgs::default()
        };
        let got = overlay(&flagged, &explicit(&["nats_url"]), &context, dir.path()).unwrap();
        assert_eq!(got.nats_url, "nats://flag:4222");

        let missing = FleetContext {
            nats_context: Some("nope".into()),
            ..context
        };
        let err = format!(
            "{:#}",
            overlay(&args, &explicit(&[]), &missing, dir.path()).unwrap_err()
        );
        assert!(
            err.contains("nats-context \"nope\"") && err.contains("nats context ls"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(&path, "contexts:\n  - name: a\n    nats-ulr: nats://x\n").unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("nats-ulr") && err.contains("config"), "{err}");
        assert_eq!(load(&dir.path().join("absent")).unwrap(), Config::default());
    }
}
