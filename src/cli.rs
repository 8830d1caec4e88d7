//! The subcommands behind `src/main.rs`. Each returns the process exit code.

use std::path::Path;

use crate::audit::checkpoint::{self, CheckpointSink, DirSink};
use crate::audit::pg::PgTarget;
use crate::audit::{schema, verify};
use crate::config::{Config, ConfigErrors, ProcessEnv};
use crate::secret::Key32;

/// Exit code for a bad config (EX_CONFIG would be 78; the contract says 64, EX_USAGE).
pub const EXIT_BAD_CONFIG: i32 = 64;

fn load(path: &Path) -> Result<Config, ConfigErrors> {
    Config::load(path, &ProcessEnv)
}

fn print_config_errors(path: &Path, errs: &ConfigErrors) {
    eprintln!("{}: {} problem(s):", path.display(), errs.0.len());
    for e in &errs.0 {
        eprintln!("  - {e}");
    }
}

/// `aegis config check`.
pub fn config_check(path: &Path) -> i32 {
    match load(path) {
        Ok(cfg) => {
            println!(
                "{}: ok ({} issuer(s), {} workspace(s))",
                path.display(),
                cfg.issuers.len(),
                cfg.workspaces.len()
            );
            0
        }
        Err(errs) => {
            print_config_errors(path, &errs);
            EXIT_BAD_CONFIG
        }
    }
}

/// `aegis serve`.
pub async fn serve(path: &Path) -> i32 {
    let cfg = match load(path) {
        Ok(c) => c,
        Err(errs) => {
            print_config_errors(path, &errs);
            return EXIT_BAD_CONFIG;
        }
    };
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    match crate::server::run(cfg, shutdown).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "aegis stopped");
            eprintln!("aegis: {e}");
            1
        }
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let target = PgTarget::parse(url)?;
    target
        .connect(std::time::Duration::from_secs(5), "aegis-cli")
        .await
        .map_err(|e| format!("cannot connect to postgres: {e}"))
}

/// `aegis migrate`: creates or upgrades the audit schema with an owner role
/// (`postgres.migrate_url`, else `postgres.url`) and optionally grants the serving role exactly
/// what it needs (append rows, move the head).
pub async fn migrate(path: &Path, grant_to: Option<String>) -> i32 {
    let cfg = match load(path) {
        Ok(c) => c,
        Err(errs) => {
            print_config_errors(path, &errs);
            return EXIT_BAD_CONFIG;
        }
    };
    let url = cfg
        .postgres
        .migrate_url
        .as_deref()
        .unwrap_or(&cfg.postgres.url);
    let client = match connect(url).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aegis migrate: {e}");
            return 1;
        }
    };
    if let Err(e) = schema::migrate(&client).await {
        eprintln!("aegis migrate: {e}");
        return 1;
    }
    if let Some(role) = grant_to {
        if let Err(e) = schema::grant_service_role(&client, &role).await {
            eprintln!("aegis migrate: {e}");
            return 1;
        }
        println!("granted {role}: SELECT, INSERT on aegis_audit; SELECT, INSERT, UPDATE on aegis_chain_head");
    }
    println!("audit schema is at version {}", schema::SCHEMA_VERSION);
    0
}

/// `aegis audit verify`: exit 0 intact, 1 tamper found, 2 could not run.
pub async fn audit_verify(
    path: &Path,
    json: bool,
    chain: Option<String>,
    checkpoints: Option<std::path::PathBuf>,
) -> i32 {
    let cfg = match load(path) {
        Ok(c) => c,
        Err(errs) => {
            print_config_errors(path, &errs);
            return 2;
        }
    };
    let chain_id = chain.unwrap_or_else(|| cfg.audit.chain_id.clone());
    let client = match connect(&cfg.postgres.url).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aegis audit verify: {e}");
            return 2;
        }
    };
    let dir = checkpoints.unwrap_or_else(|| cfg.audit.checkpoint_dir.clone());
    let found = match DirSink::new(&dir, "verify").list() {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "aegis audit verify: cannot read checkpoints in {}: {e}",
                dir.display()
            );
            return 2;
        }
    };
    let public = checkpoint::public_key(&cfg.audit.checkpoint_signing_key);
    let started = std::time::Instant::now();
    let report = match verify::verify(&client, &chain_id, &cfg.audit.keys(), &found, &public).await
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aegis audit verify: {}", crate::audit::pg_error_text(&e));
            return 2;
        }
    };
    if json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(_) => return 2,
        }
    } else if report.intact {
        println!(
            "chain {}: intact, {} rows and {} checkpoint(s) verified in {:.3}s, head {}",
            report.chain_id,
            report.rows,
            report.checkpoints,
            started.elapsed().as_secs_f64(),
            &report.head_mac[..16]
        );
    } else {
        println!(
            "chain {}: TAMPERED at seq {}: {} ({})",
            report.chain_id,
            report.first_bad_seq.unwrap_or(0),
            report.problem.as_deref().unwrap_or("unknown"),
            report.detail.as_deref().unwrap_or("")
        );
    }
    if report.intact {
        0
    } else {
        1
    }
}

/// `aegis audit export`.
pub async fn audit_export(path: &Path, since: u64) -> i32 {
    let cfg = match load(path) {
        Ok(c) => c,
        Err(errs) => {
            print_config_errors(path, &errs);
            return 2;
        }
    };
    let client = match connect(&cfg.postgres.url).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aegis audit export: {e}");
            return 2;
        }
    };
    let mut out = std::io::BufWriter::new(std::io::stdout());
    match verify::export(&client, &cfg.audit.chain_id, since, &mut out).await {
        Ok(_) => {
            use std::io::Write;
            if out.flush().is_err() {
                return 2;
            }
            0
        }
        Err(e) => {
            eprintln!("aegis audit export: {e}");
            2
        }
    }
}

/// `aegis keys generate`: fresh keys, one `name = base64` line each.
pub fn keys_generate() -> i32 {
    println!("# write each value to its own file (see README: keys)");
    println!("audit.key      = {}", Key32::generate().to_base64());
    println!("cache.key      = {}", Key32::generate().to_base64());
    let seed = Key32::generate();
    println!("checkpoint.key = {}", seed.to_base64());
    println!("console.token  = {}", Key32::generate().to_base64());
    println!(
        "# checkpoint verification key (public, for auditors): {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            checkpoint::public_key(&seed)
        )
    );
    0
}
