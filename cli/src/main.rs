//! `claw`: the OpenClaw command. `claw up` runs the whole system; the other verbs submit,
//! inspect, watch and steer tasks through a running gateway (or straight over NATS).
//!
//! When a worker runs a long task in a child process it starts this same executable with the
//! hidden first argument `__run-task`; that is handled before anything else.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "claw",
    version,
    about = "OpenClaw: an asynchronous task gateway on NATS JetStream",
    after_help = "\
Client verbs talk to the gateway at --url (env CLAW_URL), with its API token --token (env
CLAW_TOKEN) when it has tokens, or straight to NATS with --nats-url (env NATS_URL); --json
prints the raw JSON replies.

Exit codes:
  0  success; for watch and submit --watch: the task succeeded
  1  the request was refused (not found, invalid, conflict, a missing or wrong API token), or
     the watched task failed or was cancelled
  2  usage error
  3  the gateway or NATS cannot be reached or is unavailable
  130  watch interrupted by Ctrl-C (the task goes on)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything on this machine: nats-server, gateway, worker, archiver, web UI.
    Up(claw_cli::up::UpArgs),
    /// Make API tokens for the gateway's tokens file (--tokens).
    #[command(subcommand)]
    Token(claw_cli::token::TokenCommand),
    #[command(flatten)]
    Client(claw_cli::commands::Command),
}

fn main() -> anyhow::Result<ExitCode> {
    if std::env::args().nth(1).as_deref() == Some(claw_worker::child::RUN_TASK_ARG) {
        std::process::exit(claw_worker::child::run_task_main());
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Up(args) => {
            claw_proto::logs::init();
            let worker_config = claw_cli::up::worker_config(&args)?;
            // SAFETY: no other thread exists yet: the runtime starts below.
            #[allow(unsafe_code)]
            unsafe {
                claw_proto::secrets::scrub_env(&worker_config.secret_vars());
            }
            // Task programs are this process's children: none may read its memory.
            if let Err(e) = claw_proto::secrets::make_undumpable() {
                tracing::warn!(error = %e, "cannot make claw up non-dumpable");
            }
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let shutdown = claw_proto::signal::cancel_on_shutdown();
                claw_cli::up::run(args, worker_config, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(command) => Ok(ExitCode::from(claw_cli::token::run(command))),
        Command::Client(command) => {
            // SAFETY: no other thread exists yet: the runtime starts below. (A client starts
            // no programs; this only keeps its secrets out of its own `/proc/<pid>/environ`.)
            #[allow(unsafe_code)]
            unsafe {
                claw_proto::secrets::scrub_env(&["NATS_PASSWORD", "NATS_TOKEN", "CLAW_TOKEN"]);
            }
            // A client's stderr is for its one-line error; logs only when asked for.
            if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG") {
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_writer(std::io::stderr)
                    .init();
            }
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            Ok(ExitCode::from(runtime.block_on(claw_cli::commands::run(command))))
        }
    }
}
