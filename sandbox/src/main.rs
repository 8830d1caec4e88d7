//! `sandbox`: run the local Databricks workspace and dev IdP by hand, or the whole demo.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sandbox::demo::{self, DemoOptions};
use sandbox::{Sandbox, SandboxOptions};

#[derive(Parser)]
#[command(
    name = "sandbox",
    version,
    about = "Local Databricks workspace and dev IdP for aegis"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the dev IdP and the workspace; prints their URLs as one JSON line, runs until
    /// SIGINT or SIGTERM.
    Serve {
        #[arg(long, default_value = "127.0.0.1:0")]
        idp_listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:0")]
        workspace_listen: SocketAddr,
        /// Lifetime of the Databricks tokens the workspace issues, in seconds.
        #[arg(long, default_value_t = 3600)]
        token_ttl: u64,
    },
    /// Start Redis, PostgreSQL, the sandbox, aegis and Envoy, and walk through the request path.
    Demo {
        /// The aegis binary to run.
        #[arg(long)]
        aegis_bin: PathBuf,
        /// Where to put everything (emptied first); `.demo/` in the repo by default.
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Keep everything running at the end and wait for Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Serve {
            idp_listen,
            workspace_listen,
            token_ttl,
        } => serve(idp_listen, workspace_listen, token_ttl).await,
        Command::Demo {
            aegis_bin,
            work_dir,
            keep_running,
        } => {
            let mut opts = DemoOptions::new(aegis_bin);
            opts.keep_running = keep_running;
            if let Some(dir) = work_dir {
                opts.work_dir = dir;
            }
            demo::run(opts).await.map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sandbox: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(idp: SocketAddr, workspace: SocketAddr, token_ttl: u64) -> Result<(), String> {
    let opts = SandboxOptions {
        token_ttl: Duration::from_secs(token_ttl),
        ..SandboxOptions::default()
    };
    let sandbox = Sandbox::start_on(opts, idp, workspace)
        .await
        .map_err(|e| format!("starting the sandbox: {e}"))?;
    let line =
        serde_json::json!({ "idp_url": sandbox.idp_url, "workspace_url": sandbox.workspace_url });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("writing the urls: {e}"))?;
    drop(stdout);
    let waited = demo::wait_for_shutdown_signal().await;
    sandbox.shutdown().await;
    waited.map_err(|e| format!("waiting for a signal: {e}"))
}
