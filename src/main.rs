//! The `aegis` binary: parses the command line and dispatches to [`aegis::cli`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: the Check path allocates small short-lived
/// buffers (protobuf strings, HTTP/2 frames, header maps), where glibc malloc cost ~16 % of
/// aegis' CPU under load (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "aegis",
    version,
    about = "Per-user identity from AI agents to Databricks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ext_authz gRPC server and the admin HTTP server.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Config commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Audit chain commands.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Create or upgrade the audit schema with an owner role.
    Migrate {
        #[arg(long)]
        config: PathBuf,
        /// Grant this (serving) role exactly what `aegis serve` needs.
        #[arg(long)]
        grant_to: Option<String>,
    },
    /// Cached Databricks token commands.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Key material.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config and report every error (exit 64 when bad).
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Re-walk the chain: exit 0 intact, 1 tamper found, 2 could not run.
    Verify {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        /// Chain to verify (default: audit.chain_id).
        #[arg(long)]
        chain: Option<String>,
        /// Checkpoint directory (default: audit.checkpoint_dir).
        #[arg(long)]
        checkpoints: Option<PathBuf>,
    },
    /// Record that a retired HMAC key signs no row after this point (an ADMIN row); verify then
    /// reports any later row under it as `retired_key`.
    RetireKey {
        #[arg(long)]
        config: PathBuf,
        /// The retired key's id (configured in audit.previous_keys).
        #[arg(long)]
        key_id: String,
    },
    /// Print the transparency log's verifier key (C2SP vkey): what auditors and witnesses
    /// are given to check checkpoints and receipts.
    Vkey {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print a receipt for a decision: its record, leaf index, inclusion proof and a signed
    /// checkpoint (JSON). Exit 0, 1 when there is no such decision or it is not checkpointed
    /// yet, 2 when it could not run.
    Prove {
        #[arg(long)]
        config: PathBuf,
        /// The decision's trace id (x-aegis-trace-id); every row with it is proven.
        #[arg(long)]
        trace_id: String,
    },
    /// Check a receipt offline with the log's public key: no database, no HMAC key. Exit 0
    /// valid, 1 invalid, 2 could not run.
    CheckReceipt {
        /// The receipt file (`aegis audit prove` output); `-` reads stdin.
        file: PathBuf,
        /// The log's verifier key (`aegis audit vkey`).
        #[arg(long)]
        public_key: String,
        /// A witness' cosignature verifier key; repeatable.
        #[arg(long = "witness")]
        witnesses: Vec<String>,
        /// Cosignatures required from those witnesses (default: all of them).
        #[arg(long)]
        quorum: Option<usize>,
    },
    /// Print the chain as JSON lines.
    Export {
        #[arg(long)]
        config: PathBuf,
        /// Only rows with seq greater than this.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Drop a user's cached tokens on every replica (within about a second), audited: every
    /// principal (issuer, subject) that maps to the user name, or the one named.
    Revoke {
        #[arg(long)]
        config: PathBuf,
        /// The Databricks user name (as `username_claim` maps it).
        #[arg(long)]
        user: String,
        /// Only this workspace (default: all).
        #[arg(long)]
        workspace: Option<String>,
        /// Only the principal of this issuer (its configured name or its `iss`); needs --subject.
        #[arg(long, requires = "subject")]
        issuer: Option<String>,
        /// Only the principal with this subject (`sub`); needs --issuer.
        #[arg(long, requires = "issuer")]
        subject: Option<String>,
        /// Also drop the user's stored U2M grant (they must consent again).
        #[arg(long)]
        consent: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print fresh keys for the audit HMAC, the cache AEAD, checkpoint signing and the console.
    Generate,
}

/// The runtime for a command: `serve` passes `server.worker_threads` (1: everything on one thread,
/// the cheapest per Check); the other commands take tokio's default, a worker per core.
fn runtime(threads: Option<usize>) -> tokio::runtime::Runtime {
    let built = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = threads {
                b.worker_threads(n);
            }
            b.enable_all().build()
        }
    };
    match built {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aegis: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    }
}

use aegis::cli::report;

fn main() {
    let cli = Cli::parse();
    // `serve` sets up logging itself, with span export when its config asks for it.
    if !matches!(cli.command, Command::Serve { .. }) {
        aegis::logging::init();
    }
    let code = match cli.command {
        Command::Config {
            command: ConfigCommand::Check { config },
        } => report("config check", aegis::cli::config_check(&config)),
        Command::Keys {
            command: KeysCommand::Generate,
        } => report("keys generate", aegis::cli::keys_generate()),
        Command::Serve { config } => match aegis::cli::serve_config(&config) {
            Ok(cfg) => report(
                "",
                runtime(Some(cfg.server.worker_threads)).block_on(aegis::cli::serve(cfg, &config)),
            ),
            Err(e) => report("serve", Err(e)),
        },
        other => {
            let runtime = runtime(None);
            runtime.block_on(async move {
                match other {
                    Command::Audit {
                        command:
                            AuditCommand::Verify {
                                config,
                                json,
                                chain,
                                checkpoints,
                            },
                    } => report(
                        "audit verify",
                        aegis::cli::audit_verify(&config, json, chain, checkpoints).await,
                    ),
                    Command::Token {
                        command:
                            TokenCommand::Revoke {
                                config,
                                user,
                                workspace,
                                issuer,
                                subject,
                                consent,
                            },
                    } => {
                        let target = aegis::cli::RevokeTarget {
                            user,
                            workspace,
                            principal: issuer.zip(subject),
                            consent,
                        };
                        report(
                            "token revoke",
                            aegis::cli::token_revoke(&config, &target).await,
                        )
                    }
                    Command::Migrate { config, grant_to } => {
                        report("migrate", aegis::cli::migrate(&config, grant_to).await)
                    }
                    Command::Audit {
                        command: AuditCommand::Export { config, since },
                    } => report(
                        "audit export",
                        aegis::cli::audit_export(&config, since).await,
                    ),
                    Command::Audit {
                        command: AuditCommand::RetireKey { config, key_id },
                    } => report(
                        "audit retire-key",
                        aegis::cli::audit_retire_key(&config, &key_id).await,
                    ),
                    Command::Audit {
                        command: AuditCommand::Vkey { config },
                    } => report("audit vkey", aegis::cli::audit_vkey(&config)),
                    Command::Audit {
                        command: AuditCommand::Prove { config, trace_id },
                    } => report(
                        "audit prove",
                        aegis::cli::audit_prove(&config, &trace_id).await,
                    ),
                    Command::Audit {
                        command:
                            AuditCommand::CheckReceipt {
                                file,
                                public_key,
                                witnesses,
                                quorum,
                            },
                    } => report(
                        "audit check-receipt",
                        aegis::cli::audit_check_receipt(&file, &public_key, &witnesses, quorum),
                    ),
                    Command::Config { .. } | Command::Keys { .. } | Command::Serve { .. } => 2,
                }
            })
        }
    };
    std::process::exit(code);
}
