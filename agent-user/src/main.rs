//! The `agentgate` binary: parses the command line and hands off to the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use agentgate::config::{Config, LogFormat};
use agentgate::{cli, daemon};
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

/// Connections and statements allocate and free many small objects on one thread and free
/// some on another (the session writer); mimalloc does both without glibc malloc's locking and
/// consolidation passes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "agentgate",
    version,
    about = "Host enforcement point for autonomous agents"
)]
struct Args {
    /// Log format (overrides the configuration's `log_format`).
    #[arg(long, global = true, value_enum)]
    log_format: Option<Format>,
    /// Configuration file (default: /etc/agentgate/agentgate.yaml if present, else the embedded default).
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and pin the kernel hooks, then enforce and record until stopped.
    Run,
    /// Detach and unpin everything `run` installed.
    Uninstall,
    /// Run a command inside an agent's cgroup (optionally as another user).
    Exec {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        user: Option<String>,
        /// Pass on descriptors above stderr inherited from the caller, and a socket on standard
        /// input, output or error. By default they are closed, and such a socket refused: a
        /// socket opened before the cgroup was joined is not governed.
        #[arg(long)]
        keep_fds: bool,
        /// With --user, pass the caller's value of this environment variable to the command
        /// (repeatable). With --user the command starts from PATH, TERM, LANG, LC_*, TZ and
        /// the user's USER, LOGNAME, HOME and SHELL only; without, it gets the whole environment.
        #[arg(long = "env", value_name = "NAME")]
        pass_env: Vec<String>,
        /// Set by `exec` for its own child: the pid of the `exec` that waits for it.
        #[arg(long, hide = true)]
        supervisor: Option<u32>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Govern an existing cgroup (e.g. a systemd service) as an agent.
    Attach {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        cgroup: String,
    },
    /// Stop governing a cgroup added with `attach`.
    Detach {
        #[arg(long)]
        cgroup: String,
    },
    /// Exit 0 when the daemon is up and the programs are attached; print what is governed.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration file.
    CheckConfig { file: PathBuf },
    /// Read recorded sessions.
    Sessions {
        #[command(subcommand)]
        command: SessionsCmd,
    },
    /// Show the facts of a statement and the policy rule that decides it (runs nothing).
    Explain {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        target: String,
        #[arg(long)]
        json: bool,
        sql: String,
    },
    /// Statements held for human approval: list, approve, deny, watch.
    Approvals {
        #[command(subcommand)]
        command: ApprovalsCmd,
    },
    /// Give an agent a role for a limited time.
    Grant {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        role: String,
        /// How long, e.g. `30m`, `2h`.
        #[arg(long = "for")]
        duration: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Just-in-time grants: list or revoke.
    Grants {
        #[command(subcommand)]
        command: GrantsCmd,
    },
    /// Read recorded events (kernel refusals, connections without a flow record).
    Events {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ApprovalsCmd {
    /// Pending tickets (`--all`: decided ones too).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Run the held statement of a ticket.
    Approve {
        id: u64,
        /// Also let the agent run statements of the ticket's rule without review for this long.
        #[arg(long = "for")]
        duration: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        /// Refuse unless the ticket's statement hash is this one (what you reviewed).
        #[arg(long)]
        sha256: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Refuse the held statement of a ticket.
    Deny {
        id: u64,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// Print tickets and grants as they change, until interrupted.
    Watch {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GrantsCmd {
    /// Active grants (`--all`: expired and revoked too).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// End a grant now.
    Revoke {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SessionsCmd {
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// The session as a psql-like transcript.
    Replay { id: i64 },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a journal or a log file gets plain `key=value` fields.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(args: Args) -> anyhow::Result<ExitCode> {
    let log_override = args.log_format.map(|f| match f {
        Format::Text => LogFormat::Text,
        Format::Json => LogFormat::Json,
    });
    let load =
        || -> anyhow::Result<Config> { Ok(Config::load_or_default(args.config.as_deref())?) };
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")
    };
    match args.command {
        Cmd::Run => {
            let cfg = load()?;
            init_logging(log_override.unwrap_or(cfg.log_format));
            rt()?.block_on(daemon::run(cfg))?;
        }
        Cmd::Uninstall => cli::uninstall(&load()?)?,
        Cmd::Exec {
            agent,
            user,
            keep_fds,
            pass_env,
            supervisor,
            command,
        } => {
            // Before anything else is opened: every descriptor above stderr now is inherited.
            let kept = if keep_fds {
                cli::inherited_fds()?
            } else {
                cli::close_inherited_fds()?;
                Vec::new()
            };
            let request = cli::ExecRequest {
                config: args.config.as_deref(),
                agent: &agent,
                user: user.as_deref(),
                keep_fds,
                pass_env: &pass_env,
                command: &command,
            };
            match supervisor {
                None => return Ok(cli::exec(&load()?, &request, &kept)?),
                Some(pid) => cli::exec_supervised(&load()?, &request, pid)?,
            }
        }
        Cmd::Attach { agent, cgroup } => rt()?.block_on(cli::attach(&load()?, &agent, &cgroup))?,
        Cmd::Detach { cgroup } => rt()?.block_on(cli::detach(&load()?, &cgroup))?,
        Cmd::Status { json } => {
            let healthy = rt()?.block_on(cli::status(&load()?, json))?;
            return Ok(if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Cmd::CheckConfig { file } => cli::check_config(&file)?,
        Cmd::Explain {
            agent,
            target,
            json,
            sql,
        } => cli::explain(&load()?, &agent, &target, &sql, json)?,
        Cmd::Sessions { command } => {
            let cfg = load()?;
            match command {
                SessionsCmd::List { limit, json } => cli::sessions_list(&cfg, limit, json)?,
                SessionsCmd::Show { id, json } => cli::sessions_show(&cfg, id, json)?,
                SessionsCmd::Replay { id } => cli::sessions_replay(&cfg, id)?,
            }
        }
        Cmd::Events { limit, json } => cli::events_list(&load()?, limit, json)?,
        Cmd::Approvals { command } => {
            let cfg = load()?;
            let rt = rt()?;
            use cli::approvals as a;
            match command {
                ApprovalsCmd::List { all, json } => rt.block_on(a::list(&cfg, all, json))?,
                ApprovalsCmd::Approve {
                    id,
                    duration,
                    reason,
                    sha256,
                    json,
                } => rt.block_on(a::approve(
                    &cfg,
                    id,
                    sha256,
                    duration.as_deref(),
                    reason,
                    json,
                ))?,
                ApprovalsCmd::Deny { id, reason, json } => {
                    rt.block_on(a::deny(&cfg, id, reason, json))?
                }
                ApprovalsCmd::Watch { json } => rt.block_on(a::watch(&cfg, json))?,
            }
        }
        Cmd::Grant {
            agent,
            role,
            duration,
            reason,
            json,
        } => rt()?.block_on(cli::approvals::grant(
            &load()?,
            agent,
            role,
            &duration,
            reason,
            json,
        ))?,
        Cmd::Grants { command } => {
            let cfg = load()?;
            let rt = rt()?;
            match command {
                GrantsCmd::List { all, json } => {
                    rt.block_on(cli::approvals::grants_list(&cfg, all, json))?
                }
                GrantsCmd::Revoke { id, reason, json } => {
                    rt.block_on(cli::approvals::revoke(&cfg, id, reason, json))?
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
