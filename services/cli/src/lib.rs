//! The `flotilla` command line. Each subcommand is a module; they talk to
//! the fleet only through the bus, like every other client.

pub mod answer;
pub mod chat;
pub mod clusters;
pub mod contexts;
pub mod deployments;
pub mod fleet;
pub mod get;
pub mod isolated;
pub mod jsonpath;
pub mod kv;
pub mod logs;
pub mod models;
pub mod nats_config;
pub mod preview;
pub mod ready;
pub mod rollouts;
pub mod table;
mod up;
pub mod watch;

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use flotilla_kit::logging::LogFormat;
use flotilla_kit::{Bus, BusArgs, Shutdown};

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Place, roll out and serve LLM inference across GPU clusters"
)]
pub struct Cli {
    #[command(flatten)]
    pub bus: BusArgs,

    /// Log format.
    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// The context of the configuration file (`flotilla config
    /// get-contexts`) to take the bus settings from; default: its current
    /// context. Flags given on the line win over the context.
    #[arg(long, env = "FLOTILLA_CONTEXT", global = true)]
    pub context: Option<String>,

    /// The bus flags given on the line or by environment, not defaulted.
    #[arg(skip)]
    pub explicit: std::collections::BTreeSet<String>,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line's grammar, with the bus flags global: they may
    /// stand anywhere on the line (`flotilla get clusters --nats-url …`),
    /// as kubectl's do. Not global in `BusArgs` itself, because services
    /// share it and the executor's `simulate` flattens a copy of its own,
    /// which a global flag of the same name would clash with.
    pub fn grammar() -> clap::Command {
        let bus = BusArgs::augment_args(clap::Command::new("bus"));
        let ids: Vec<clap::Id> = bus.get_arguments().map(|a| a.get_id().clone()).collect();
        Self::command().mut_args(|arg| {
            if ids.contains(arg.get_id()) {
                arg.global(true)
            } else {
                arg
            }
        })
    }

    /// Parses this process's arguments with [`grammar`](Self::grammar);
    /// on an error or `--help`, prints it and exits as clap does.
    pub fn parse_line() -> Self {
        Self::try_parse_line(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    pub fn try_parse_line<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut grammar = Self::grammar();
        let mut matches = grammar.try_get_matches_from_mut(args)?;
        // Which bus flags were given (on the line or by environment) rather
        // than defaulted. A global flag given after a subcommand is only
        // marked so in that subcommand's matches; read before parsing
        // takes the values out.
        let mut explicit = std::collections::BTreeSet::new();
        let mut level = Some(&matches);
        while let Some(m) = level {
            for id in contexts::CONTEXT_FLAGS {
                let given = m.try_get_raw(id).ok().flatten().is_some()
                    && m.value_source(id)
                        .is_some_and(|s| s != clap::parser::ValueSource::DefaultValue);
                if given {
                    explicit.insert(id.to_string());
                }
            }
            level = m.subcommand().map(|(_, sub)| sub);
        }
        let mut cli =
            Self::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut grammar))?;
        cli.explicit = explicit;
        Ok(cli)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local fleet on this machine until Ctrl-C.
    #[command(after_help = "Examples:
  flotilla up                          # two clusters serving the shipped SmolLM2
  flotilla up --no-deploy              # the fleet, nothing deployed
  flotilla up --isolated               # each cluster on a network of its own (root)
  flotilla chat 'Say hi'               # then, from another shell")]
    Up(up::UpArgs),
    /// List things in the fleet: `flotilla get KIND [NAME…]`.
    Get(get::GetArgs),
    /// Create or change deployments from YAML or JSON documents.
    #[command(after_help = "Examples:
  flotilla apply -f examples/chat-small.yaml --wait --timeout 5m
  flotilla apply -f deployments/ --dry-run=server     # where would they go?
  flotilla get deploy chat-small -o yaml | flotilla apply -f -")]
    Apply(ApplyArgs),
    /// Show what `apply -f` would change in each deployment (exit 1 when
    /// something would change, 0 when nothing would).
    #[command(after_help = "Examples:
  flotilla diff -f examples/chat-small.yaml
  flotilla diff -f deployments/ && echo 'nothing to apply'")]
    Diff {
        /// A file, a directory of them, or `-` for standard input.
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
    },
    /// Delete deployments by name or by the documents that made them; their
    /// replicas are released.
    #[command(after_help = "Examples:
  flotilla delete deployment chat-small
  flotilla delete -f examples/chat-small.yaml")]
    Delete(DeleteArgs),
    /// Set a deployment's replica count (an autoscaled one starts there and
    /// stays within its bounds).
    #[command(after_help = "Examples:
  flotilla scale deployment chat-small --replicas 4
  flotilla scale deploy chat-small --replicas 0      # keep it, run nothing")]
    Scale {
        /// `deployment` (or deploy, md).
        kind: String,
        name: String,
        #[arg(long)]
        replicas: u32,
    },
    /// Show one thing in detail.
    #[command(after_help = "Examples:
  flotilla describe deployment chat-small")]
    Describe {
        #[command(subcommand)]
        what: DescribeWhat,
    },
    /// Models: push your own.
    #[command(after_help = "Examples:
  flotilla model push ./my-model.gguf --name my-model
  flotilla model push ./my-model/ --name my-model --format safetensors
  flotilla get models")]
    Model {
        #[command(subcommand)]
        action: ModelAction,
    },
    /// Cordon or uncordon a cluster.
    #[command(after_help = "Examples:
  flotilla cluster cordon eu-1 --reason 'driver upgrade'
  flotilla cluster uncordon eu-1")]
    Cluster {
        #[command(subcommand)]
        action: clusters::ClusterAction,
    },
    /// Follow a rollout, approve its next stage, or undo it.
    #[command(after_help = "Examples:
  flotilla rollout status chat-small -w
  flotilla rollout status chat-small --traffic=30s   # new version vs old, as users meet them
  flotilla rollout approve chat-small
  flotilla rollout approve chat-small --stage rest   # ahead of time
  flotilla rollout undo chat-small")]
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
    },
    /// The fleet's events as they happen (or from `--since`).
    #[command(after_help = "Examples:
  flotilla watch
  flotilla watch --since 1h --kind deployment --name chat-small --no-follow
  flotilla watch -o json | jq .type")]
    Watch(watch::WatchArgs),
    /// Ask a model through the gateway; the answer is streamed.
    #[command(after_help = "Examples:
  flotilla chat 'What is NATS JetStream?'
  flotilla chat --model smollm2-135m-instruct --max-tokens 64 'Say hi'
  FLOTILLA_API_KEY=$(cat key) flotilla chat --gateway https://llm.example 'Hi'")]
    Chat(chat::ChatArgs),
    /// The last lines a replica wrote (a local replica's log file, or its
    /// pod's log on Kubernetes), from the executor of its cluster.
    #[command(after_help = "Examples:
  flotilla get replicas --deployment chat-small      # the replicas' names
  flotilla logs chat-small-4f2a9c-0 --tail 20")]
    Logs {
        replica: String,
        /// How many of the last lines (at most 5000).
        #[arg(long, default_value_t = 100)]
        tail: u32,
        /// The replica's cluster; by default from the replicas bucket.
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Contexts: the fleets this command line knows, in
    /// ~/.config/flotilla/config ($FLOTILLA_CONFIG), credentials by file.
    #[command(after_help = "Examples:
  flotilla config set-context prod --nats-url tls://nats.prod:4222 --nats-creds ~/prod.creds
  flotilla config use-context prod
  flotilla get clusters                       # on prod
  flotilla get clusters --context staging     # once, elsewhere")]
    Config {
        #[command(subcommand)]
        action: contexts::ConfigAction,
    },
    /// Read the fleet's KV buckets as documents (their values are protobuf).
    #[command(after_help = "Examples:
  flotilla kv keys replicas
  flotilla kv get deployments chat-small -o json
  flotilla kv get rollouts chat-small --revision 3")]
    Kv {
        #[command(subcommand)]
        action: kv::KvAction,
    },
    /// Print the JSON Schema of the deployment document (the one published
    /// as schemas/modeldeployment.schema.json).
    Schema,
    /// Print a shell completion script: `source <(flotilla completion bash)`,
    /// or write it where the shell loads completions from (zsh: a file
    /// `_flotilla` on `$fpath`; fish: `~/.config/fish/completions/flotilla.fish`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write a nats-server configuration with one user per service and per
    /// cluster's executor, each allowed only its own subjects.
    #[command(after_help = "Examples:
  flotilla nats-config --cluster eu-1 --cluster us-1 --out nats-config
  nats-server -c nats-config/nats-server.conf")]
    NatsConfig(nats_config::NatsConfigArgs),
    /// Run one cluster's executor (what `flotilla up` starts per simulated
    /// cluster); its flags follow `--`, as `flotilla-executor --help` lists.
    #[command(hide = true)]
    Executor {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Phase, stages, failures and replicas of a deployment's rollout.
    Status {
        name: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Follow it, a line per change, until it completes or halts.
        #[arg(short = 'w', long)]
        watch: bool,
        /// Also listen to the gateways' traffic summaries this long and
        /// compare the new version with the old: requests, errors, time to
        /// first byte, duration.
        #[arg(long, value_parser = humantime::parse_duration, num_args = 0..=1, require_equals = true, default_missing_value = "10s")]
        traffic: Option<Duration>,
    },
    /// Open the gate after the current stage (or, with --stage, a later
    /// one ahead of time).
    Approve {
        name: String,
        #[arg(long)]
        stage: Option<String>,
    },
    /// Return to the spec the current rollout replaced.
    Undo { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ModelAction {
    /// Upload a GGUF file or a safetensors folder; a deployment then refers
    /// to it by name and digest (`spec.model.artifact`).
    Push {
        path: std::path::PathBuf,
        #[arg(long)]
        name: String,
        /// `gguf` or `safetensors`; by default from the path.
        #[arg(long)]
        format: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A file (several documents allowed), a directory of .yaml/.yml/.json
    /// files, or `-` for standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: std::path::PathBuf,
    /// `client`: check the documents here and send nothing; `server`:
    /// placement checks them against the fleet and previews the placement,
    /// storing nothing.
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_value_t = deployments::DryRun::None, default_missing_value = "client")]
    pub dry_run: deployments::DryRun,
    /// Wait until every replica is Ready; fail (exit 1, reason on stderr)
    /// when a deployment cannot be placed or its rollout halts.
    #[arg(long, value_parser = ["ready"], num_args = 0..=1, require_equals = true, default_missing_value = "ready")]
    pub wait: Option<String>,
    /// How long to wait for placement's answer (default 10s) and, with
    /// --wait, for readiness (default 5m): `90s`, `10m`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DeleteArgs {
    #[command(subcommand)]
    pub what: Option<DeleteWhat>,
    /// Delete the deployments these documents name.
    #[arg(short = 'f', long = "filename")]
    pub file: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DeleteWhat {
    #[command(visible_aliases = ["deployments", "deploy", "md"])]
    Deployment {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DescribeWhat {
    /// Spec, placement, why each cluster was left out, recent events.
    Deployment { name: String },
}

pub async fn run(mut cli: Cli, shutdown: Shutdown) -> anyhow::Result<()> {
    // `up` runs a fleet of its own on this machine; the rest talk to the
    // fleet of the chosen context.
    let talks_to_a_fleet = !matches!(
        cli.command,
        Command::Up(_)
            | Command::Config { .. }
            | Command::Completion { .. }
            | Command::Schema
            | Command::NatsConfig(_)
            | Command::Executor { .. }
    );
    if talks_to_a_fleet {
        cli.bus = contexts::effective(&cli.bus, &cli.explicit, cli.context.as_deref())?;
    }
    match cli.command {
        Command::Up(args) => up::run(&cli.bus, args, shutdown).await,
        Command::Get(args) => {
            let bus = connect(&cli.bus, &shutdown).await?;
            get::get(&bus, &args, &mut std::io::stdout(), shutdown.clone()).await
        }
        Command::Model {
            action: ModelAction::Push { path, name, format },
        } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            models::push(
                &bus,
                &path,
                &name,
                format.as_deref(),
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            )
            .await
            .map(|_| ())
        }
        Command::Apply(args) => {
            let docs = deployments::read_documents(&args.file)?;
            if args.dry_run == deployments::DryRun::Client {
                // Nothing to ask the fleet.
                return deployments::check_here(docs, &mut std::io::stdout());
            }
            let bus = connect(&cli.bus, &shutdown).await?;
            let options = deployments::ApplyOptions {
                dry_run: args.dry_run,
                wait: args.wait.is_some(),
                timeout: args.timeout,
            };
            deployments::apply(&bus, docs, options, &mut std::io::stdout()).await
        }
        Command::Diff { file } => {
            let docs = deployments::read_documents(&file)?;
            let bus = connect(&cli.bus, &shutdown).await?;
            if deployments::diff(&bus, docs, &mut std::io::stdout()).await? {
                // kubectl's convention: 1 when there are differences.
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Delete(args) => {
            let names = match (args.what, args.file) {
                (Some(DeleteWhat::Deployment { names }), _) => names,
                (None, Some(file)) => deployments::read_documents(&file)?
                    .iter()
                    .map(|d| d.metadata.clone().unwrap_or_default().name)
                    .collect(),
                (None, None) => bail!(
                    "say what to delete: `flotilla delete deployment NAME…` or `flotilla delete -f FILE`"
                ),
            };
            let bus = connect(&cli.bus, &shutdown).await?;
            let mut failed = Vec::new();
            for name in &names {
                if let Err(e) = deployments::delete(&bus, name, &mut std::io::stdout()).await {
                    eprintln!("deployment/{name}: {e:#}");
                    failed.push(name.as_str());
                }
            }
            if !failed.is_empty() {
                bail!("not deleted: {}", failed.join(", "));
            }
            Ok(())
        }
        Command::Scale {
            kind,
            name,
            replicas,
        } => {
            if get::Kind::parse(&kind)? != get::Kind::Deployments {
                bail!("only deployments scale: `flotilla scale deployment NAME --replicas N`");
            }
            let bus = connect(&cli.bus, &shutdown).await?;
            deployments::scale(&bus, &name, replicas, &mut std::io::stdout()).await
        }
        Command::Describe {
            what: DescribeWhat::Deployment { name },
        } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            deployments::describe(&bus, &name, &mut std::io::stdout()).await
        }
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::grammar(),
                "flotilla",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Logs {
            replica,
            tail,
            cluster,
        } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            logs::logs(
                &bus,
                &replica,
                tail,
                cluster.as_deref(),
                &mut std::io::stdout(),
            )
            .await
        }
        Command::Config { action } => {
            contexts::run(action, &cli.bus, &cli.explicit, &mut std::io::stdout())
        }
        Command::Kv { action } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            kv::run(&bus, action, &mut std::io::stdout()).await
        }
        Command::Schema => {
            let schema = flotilla_proto::schema::deployment_schema()?;
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(())
        }
        Command::NatsConfig(args) => nats_config::run(&cli.bus, &args)
            .map(|conf| println!("wrote {} and users/", conf.display())),
        Command::Cluster { action } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            clusters::cordon(&bus, action, &mut std::io::stdout()).await
        }
        Command::Rollout { action } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            let out = &mut std::io::stdout();
            match action {
                RolloutAction::Status {
                    name, watch: true, ..
                } => {
                    let phase = rollouts::follow(&bus, &name, out, shutdown.clone()).await?;
                    if phase == flotilla_proto::v1::RolloutPhase::Halted {
                        bail!(
                            "the rollout of {name} halted; `flotilla rollout undo {name}` returns to the previous version"
                        );
                    }
                    Ok(())
                }
                RolloutAction::Status {
                    name,
                    output,
                    traffic,
                    ..
                } => rollouts::status(&bus, &name, output, traffic, out).await,
                RolloutAction::Approve { name, stage } => {
                    rollouts::approve(&bus, &name, stage.as_deref(), out).await
                }
                RolloutAction::Undo { name } => rollouts::undo(&bus, &name, out).await,
            }
        }
        Command::Watch(args) => {
            let bus = connect(&cli.bus, &shutdown).await?;
            watch::watch(&bus, &args, &mut std::io::stdout(), shutdown.clone())
                .await
                .map(|_| ())
        }
        Command::Executor { args } => {
            let config = fleet::executor_args(args)?.validate()?;
            flotilla_executor::run(config, shutdown)
                .await
                .map_err(|e| anyhow::anyhow!("executor: {e}"))
        }
        Command::Chat(args) => chat::chat(&args, &mut std::io::stdout()).await.map(|_| ()),
    }
}

/// A command-line client gives up quickly rather than retrying forever.
async fn connect(args: &BusArgs, shutdown: &Shutdown) -> anyhow::Result<Bus> {
    let config = args.validate()?;
    tokio::time::timeout(
        Duration::from_secs(5),
        Bus::connect(&config, "flotilla-cli", shutdown),
    )
    .await
    .with_context(|| {
        format!(
            "cannot reach NATS at {} (is the fleet up? try `flotilla up`)",
            config.nats_url
        )
    })?
    .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_given_bus_flags_are_told_from_defaults() {
        for line in [
            &["flotilla", "--nats-url", "nats://a:4222", "get", "clusters"][..],
            &["flotilla", "get", "clusters", "--nats-url", "nats://a:4222"][..],
            &[
                "flotilla",
                "config",
                "set-context",
                "x",
                "--nats-url",
                "nats://a:4222",
            ][..],
        ] {
            let cli = Cli::try_parse_line(line).unwrap();
            assert_eq!(
                cli.explicit.iter().collect::<Vec<_>>(),
                ["nats_url"],
                "{line:?}"
            );
        }
        let cli = Cli::try_parse_line(["flotilla", "get", "clusters"]).unwrap();
        assert!(cli.explicit.is_empty(), "{:?}", cli.explicit);
    }

    #[test]
    fn the_grammar_is_consistent() {
        Cli::grammar().debug_assert();
    }

    #[test]
    fn bus_flags_stand_before_or_after_the_subcommand() {
        for line in [
            &[
                "flotilla",
                "--nats-url",
                "nats://hub:4222",
                "get",
                "clusters",
            ][..],
            &[
                "flotilla",
                "get",
                "clusters",
                "--nats-url",
                "nats://hub:4222",
            ][..],
            &[
                "flotilla",
                "get",
                "--nats-url",
                "nats://hub:4222",
                "clusters",
            ][..],
        ] {
            let cli = Cli::try_parse_line(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_eq!(cli.bus.nats_url, "nats://hub:4222", "{line:?}");
            assert!(matches!(cli.command, Command::Get { .. }), "{line:?}");
        }
        let cli = Cli::try_parse_line([
            "flotilla",
            "rollout",
            "status",
            "web",
            "--subject-prefix",
            "blue",
            "--stream-replicas",
            "3",
        ])
        .unwrap();
        assert_eq!(cli.bus.subject_prefix, "blue");
        assert_eq!(cli.bus.stream_replicas, 3);
    }

    #[test]
    fn a_misspelled_flag_is_named() {
        let e = Cli::try_parse_line(["flotilla", "get", "clusters", "--nats-ur", "x"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
        let said = e.to_string();
        assert!(said.contains("--nats-ur"), "{said}");
        assert!(said.contains("--nats-url"), "a suggestion: {said}");
    }

    /// The executor's own flags pass through `flotilla executor --`
    /// untouched, global bus flags or not.
    #[test]
    fn executor_flags_after_the_separator_are_the_executors() {
        let cli = Cli::try_parse_line([
            "flotilla",
            "executor",
            "--",
            "--nats-url",
            "nats://member:4222",
            "--cluster",
            "a",
        ])
        .unwrap();
        assert_eq!(cli.bus.nats_url, "nats://127.0.0.1:4222");
        let Command::Executor { args } = cli.command else {
            panic!("not the executor");
        };
        assert_eq!(args[..2], ["--nats-url", "nats://member:4222"]);
    }

    fn completion(shell: clap_complete::Shell) -> String {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::grammar(), "flotilla", &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn completion_scripts_know_the_subcommands_and_global_flags() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let script = completion(shell);
            // Fish names a long flag without its dashes (`-l nats-url`).
            for word in ["rollout", "approve", "completion", "nats-url"] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
        }
        // Bash's offers the bus flags after a subcommand as well.
        let bash = completion(clap_complete::Shell::Bash);
        let get = bash
            .split("flotilla__subcmd__get)")
            .nth(1)
            .expect("a case for `get`");
        let case = get.split(";;").next().unwrap_or_default();
        assert!(case.contains("--nats-url"), "{case}");
        // The kinds `get` takes are offered as its positional's values.
        assert!(case.contains("deployments"), "{case}");
    }

    #[test]
    fn the_bash_script_parses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flotilla.bash");
        std::fs::write(&path, completion(clap_complete::Shell::Bash)).unwrap();
        let checked = std::process::Command::new("bash")
            .arg("-n")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            checked.status.success(),
            "{}",
            String::from_utf8_lossy(&checked.stderr)
        );
    }
}
