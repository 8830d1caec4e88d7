//! The subcommands behind `src/main.rs`. Each returns `Result<(), CliError>`; [`report`] is
//! the one place that prints an error and turns it into the process exit code.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::audit::checkpoint::{self, CheckpointSink, DirSink};
use crate::audit::{schema, verify};
use crate::config::{Config, ConfigErrors, ProcessEnv};
use crate::pg::PgTarget;
use crate::secret::Key32;

/// Exit code for a bad config (EX_CONFIG would be 78; the contract says 64, EX_USAGE).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Why a command did not succeed.
#[derive(Debug)]
pub enum CliError {
    /// The config has problems, every one of them listed. Exit 64, except for the commands
    /// whose contract is "2: could not run" (`audit verify`, `audit prove`, `audit export`).
    Config(PathBuf, ConfigErrors),
    /// The command could not run as asked (a bad argument, a store it could not reach). Exit 2.
    CannotRun(String),
    /// It ran and failed part-way. Exit 1.
    Failed(String),
    /// It ran and the answer is no (tamper found, receipt invalid); its output says so. Exit 1.
    No,
}

impl CliError {
    pub fn exit_code(&self, command: &str) -> i32 {
        match self {
            CliError::Config(..)
                if matches!(command, "audit verify" | "audit prove" | "audit export") =>
            {
                2
            }
            CliError::Config(..) => EXIT_BAD_CONFIG,
            CliError::CannotRun(_) => 2,
            CliError::Failed(_) | CliError::No => 1,
        }
    }
}

/// Prints what went wrong (prefixed `aegis <command>:`) and returns the exit code.
pub fn report(command: &str, result: Result<(), CliError>) -> i32 {
    let Err(e) = result else { return 0 };
    let prefix = if command.is_empty() {
        "aegis".to_string()
    } else {
        format!("aegis {command}")
    };
    match &e {
        CliError::Config(path, errs) => {
            eprintln!("{}: {} problem(s):", path.display(), errs.0.len());
            for e in &errs.0 {
                eprintln!("  - {e}");
            }
        }
        CliError::CannotRun(msg) | CliError::Failed(msg) => eprintln!("{prefix}: {msg}"),
        CliError::No => {}
    }
    e.exit_code(command)
}

fn load(path: &Path) -> Result<Config, CliError> {
    Config::load(path, &ProcessEnv).map_err(|errs| CliError::Config(path.to_path_buf(), errs))
}

/// `aegis config check`.
pub fn config_check(path: &Path) -> Result<(), CliError> {
    let cfg = load(path)?;
    for w in cfg.warnings() {
        eprintln!("{}: warning: {w}", path.display());
    }
    println!(
        "{}: ok ({} issuer(s), {} workspace(s))",
        path.display(),
        cfg.issuers.len(),
        cfg.workspaces.len()
    );
    Ok(())
}

/// `aegis serve`, step 1: the config (the runtime is built from `server.worker_threads`).
pub fn serve_config(path: &Path) -> Result<Config, CliError> {
    load(path)
}

/// `aegis serve`, step 2: runs until SIGTERM or Ctrl-C; reloads `path` on SIGHUP or a change.
pub async fn serve(cfg: Config, path: &Path) -> Result<(), CliError> {
    let telemetry = match crate::logging::init_with(cfg.tracing.as_ref()) {
        Ok(t) => t,
        Err(e) => return Err(CliError::Failed(e.to_string())),
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
    let result = crate::server::run(cfg, Some(path.to_path_buf()), shutdown).await;
    // Exported spans are flushed before the process ends (off the runtime's threads: the
    // exporter's batch task needs them to run).
    let _ = tokio::task::spawn_blocking(move || drop(telemetry)).await;
    result.map_err(|e| {
        tracing::error!(error = %e, "aegis stopped");
        CliError::Failed(e.to_string())
    })
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
pub async fn migrate(path: &Path, grant_to: Option<String>) -> Result<(), CliError> {
    let cfg = load(path)?;
    let url = cfg
        .postgres
        .migrate_url
        .as_deref()
        .unwrap_or(&cfg.postgres.url);
    let client = connect(url).await.map_err(CliError::Failed)?;
    if let Err(e) = schema::migrate(&client).await {
        return Err(CliError::Failed(e.to_string()));
    }
    if let Some(role) = grant_to {
        if let Err(e) = schema::grant_service_role(&client, &role).await {
            return Err(CliError::Failed(e.to_string()));
        }
        println!("granted {role}: SELECT, INSERT on aegis_audit; SELECT, INSERT, UPDATE on aegis_chain_head and the aegis_tlog_* tables");
    }
    println!("audit schema is at version {}", schema::SCHEMA_VERSION);
    Ok(())
}

/// `aegis audit verify`: exit 0 intact, 1 tamper found, 2 could not run.
pub async fn audit_verify(
    path: &Path,
    json: bool,
    chain: Option<String>,
    checkpoints: Option<std::path::PathBuf>,
) -> Result<(), CliError> {
    let cfg = load(path)?;
    let chain_id = chain.unwrap_or_else(|| cfg.audit.chain_id.clone());
    let client = connect(&cfg.postgres.url)
        .await
        .map_err(CliError::CannotRun)?;
    let dir = checkpoints.unwrap_or_else(|| cfg.audit.checkpoint_dir.clone());
    let found = match DirSink::new(&dir, "verify").list() {
        Ok(f) => f,
        Err(e) => {
            return Err(CliError::CannotRun(format!(
                "cannot read checkpoints in {}: {e}",
                dir.display()
            )));
        }
    };
    let notes = match DirSink::new(&dir, "verify").list_notes() {
        Ok(n) => checkpoint::notes_of(n, &chain_id),
        Err(e) => {
            return Err(CliError::CannotRun(format!(
                "cannot read checkpoint notes in {}: {e}",
                dir.display()
            )));
        }
    };
    // Another chain than the configured one has the default origin, `aegis/<chain>`.
    let origin = if chain_id == cfg.audit.chain_id {
        cfg.audit.tlog_origin.clone()
    } else {
        format!("aegis/{chain_id}")
    };
    let anchors = verify::TreeAnchors {
        vkey: crate::audit::tlog::NoteSigner::new(&origin, &cfg.audit.checkpoint_signing_key)
            .vkey(),
        notes,
    };
    let public = checkpoint::public_key(&cfg.audit.checkpoint_signing_key);
    let started = std::time::Instant::now();
    let report = match verify::verify(
        &client,
        &chain_id,
        &cfg.audit.keys(),
        &found,
        &public,
        &anchors,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            return Err(CliError::CannotRun(crate::pg::error_text(&e)));
        }
    };
    if json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                return Err(CliError::CannotRun(format!(
                    "cannot encode the report: {e}"
                )))
            }
        }
    } else if report.intact {
        println!(
            "chain {}: intact, {} rows and {} checkpoint(s) verified in {:.3}s, head {}; \
             transparency log: {} leaves, root {}, {} signed note(s) consistent",
            report.chain_id,
            report.rows,
            report.checkpoints,
            started.elapsed().as_secs_f64(),
            &report.head_mac[..16],
            report.tree_size,
            &report.tree_root[..16],
            report.notes
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
        Ok(())
    } else {
        Err(CliError::No)
    }
}

/// `aegis audit vkey`.
pub fn audit_vkey(path: &Path) -> Result<(), CliError> {
    let cfg = load(path)?;
    let signer = crate::audit::tlog::NoteSigner::new(
        &cfg.audit.tlog_origin,
        &cfg.audit.checkpoint_signing_key,
    );
    println!("{}", signer.vkey().encode());
    Ok(())
}

/// `aegis audit prove`: exit 0 with a receipt, 1 when there is nothing to prove yet, 2 when it
/// could not run.
pub async fn audit_prove(path: &Path, trace_id: &str) -> Result<(), CliError> {
    let cfg = load(path)?;
    let client = connect(&cfg.postgres.url)
        .await
        .map_err(CliError::CannotRun)?;
    let receipt = match crate::audit::receipt::prove(&client, &cfg.audit.chain_id, trace_id).await {
        Ok(r) => r,
        Err(e) => {
            return Err(CliError::Failed(e.to_string()));
        }
    };
    // Never hand out a receipt that does not check.
    let signer = crate::audit::tlog::NoteSigner::new(
        &cfg.audit.tlog_origin,
        &cfg.audit.checkpoint_signing_key,
    );
    if let Err(e) = crate::audit::receipt::check(&receipt, &signer.vkey(), &[], 0) {
        return Err(CliError::Failed(format!(
            "the receipt does not verify: {e} (run `aegis audit verify`)"
        )));
    }
    match serde_json::to_string_pretty(&receipt) {
        Ok(s) => {
            println!("{s}");
            Ok(())
        }
        Err(e) => Err(CliError::CannotRun(format!(
            "cannot encode the receipt: {e}"
        ))),
    }
}

/// `aegis audit check-receipt`: exit 0 valid, 1 invalid, 2 could not run.
pub fn audit_check_receipt(
    file: &Path,
    public_key: &str,
    witnesses: &[String],
    quorum: Option<usize>,
) -> Result<(), CliError> {
    use crate::audit::tlog::{Vkey, TYPE_COSIGNATURE_V1, TYPE_ED25519};
    let log = match Vkey::parse(public_key) {
        Ok(k) if k.kind == TYPE_ED25519 => k,
        Ok(_) => {
            return Err(CliError::CannotRun(
                "--public-key is not an Ed25519 note key (type 0x01)".into(),
            ));
        }
        Err(e) => {
            return Err(CliError::CannotRun(format!("--public-key: {e}")));
        }
    };
    let mut wkeys = Vec::new();
    for w in witnesses {
        match Vkey::parse(w) {
            Ok(k) if k.kind == TYPE_COSIGNATURE_V1 => wkeys.push(k),
            Ok(_) => {
                return Err(CliError::CannotRun(format!(
                    "--witness {w}: not a cosignature key (type 0x04)"
                )));
            }
            Err(e) => {
                return Err(CliError::CannotRun(format!("--witness {w}: {e}")));
            }
        }
    }
    let quorum = quorum.unwrap_or(wkeys.len());
    if quorum > wkeys.len() {
        return Err(CliError::CannotRun(format!(
            "--quorum {quorum} is more than the {} witnesses given",
            wkeys.len()
        )));
    }
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        if std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).is_err() {
            return Err(CliError::CannotRun("cannot read stdin".into()));
        }
        s
    } else {
        match std::fs::read_to_string(file) {
            Ok(s) => s,
            Err(e) => {
                return Err(CliError::CannotRun(format!("{}: {e}", file.display())));
            }
        }
    };
    let receipt: crate::audit::receipt::Receipt = match serde_json::from_str(&text) {
        Ok(r) => r,
        Err(e) => {
            println!("receipt INVALID: not a receipt ({e})");
            return Err(CliError::No);
        }
    };
    match crate::audit::receipt::check(&receipt, &log, &wkeys, quorum) {
        Ok(c) => {
            let witnessed: Vec<String> = c.cosigned_by.iter().map(|(n, _)| n.clone()).collect();
            println!(
                "receipt valid: {} decision(s) in log {} at tree size {}{}",
                c.records.len(),
                c.origin,
                c.tree_size,
                if witnessed.is_empty() {
                    String::new()
                } else {
                    format!(", cosigned by {}", witnessed.join(", "))
                }
            );
            for r in &c.records {
                println!(
                    "  seq {} {} {} reason={} user={} agent={} workspace={} {} {} trace={}",
                    r.seq,
                    r.ts_unix_micros,
                    r.decision,
                    r.reason,
                    r.user_name,
                    r.agent,
                    r.workspace,
                    r.method,
                    r.path,
                    r.trace_id
                );
            }
            Ok(())
        }
        Err(e) => {
            println!("receipt INVALID: {e}");
            Err(CliError::No)
        }
    }
}

/// `aegis audit export`.
pub async fn audit_export(path: &Path, since: u64) -> Result<(), CliError> {
    let cfg = load(path)?;
    let client = connect(&cfg.postgres.url)
        .await
        .map_err(CliError::CannotRun)?;
    let mut out = std::io::BufWriter::new(std::io::stdout());
    match verify::export(&client, &cfg.audit.chain_id, since, &mut out).await {
        Ok(_) => {
            use std::io::Write;
            out.flush()
                .map_err(|e| CliError::CannotRun(format!("cannot write the export: {e}")))
        }
        Err(e) => Err(CliError::CannotRun(e.to_string())),
    }
}

/// `aegis keys generate`: fresh keys, one `name = base64` line each.
pub fn keys_generate() -> Result<(), CliError> {
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
    Ok(())
}

/// What `aegis token revoke` revokes.
pub struct RevokeTarget {
    /// The Databricks user name.
    pub user: String,
    /// One workspace, or all.
    pub workspace: Option<String>,
    /// One principal: (issuer name or `iss`, subject); None: every principal of the user name.
    pub principal: Option<(String, String)>,
    /// Also delete the U2M grants (the user must consent again).
    pub consent: bool,
}

/// `aegis token revoke`: drops the cached Databricks tokens of every principal that maps to a
/// user name (or of one principal) on every replica (Redis + the events channel each replica
/// follows), discards or deletes their U2M grants, and records the action in the audit chain.
/// Grants go first: a request racing the revocation can then only refresh, never re-serve.
pub async fn token_revoke(path: &Path, target: &RevokeTarget) -> Result<(), CliError> {
    use crate::redis::RedisLink;
    let user = target.user.as_str();
    let consent = target.consent;
    let cfg = load(path)?;
    let workspaces: Vec<&crate::config::WorkspaceConfig> = match &target.workspace {
        Some(w) => match cfg.workspace(w) {
            Some(ws) => vec![ws],
            None => {
                return Err(CliError::CannotRun(format!(
                    "no workspace named {w:?} in the config"
                )));
            }
        },
        None => cfg.workspaces.iter().collect(),
    };
    let narrow: Option<(String, String)> = match &target.principal {
        None => None,
        Some((issuer, subject)) => {
            match cfg
                .issuers
                .iter()
                .find(|i| i.name == *issuer || i.issuer == *issuer)
            {
                Some(i) => Some((i.issuer.clone(), subject.clone())),
                None => {
                    return Err(CliError::CannotRun(format!(
                        "no issuer named {issuer:?} in the config (give its name or its iss)"
                    )));
                }
            }
        }
    };
    let narrow_ref = narrow.as_ref().map(|(i, s)| (i.as_str(), s.as_str()));

    // 1. U2M grants: deleted (--consent) or their access tokens discarded, before any cache is
    //    dropped.
    let u2m: Vec<&str> = workspaces
        .iter()
        .filter(|w| w.token_source == crate::config::TokenSourceKind::U2m)
        .map(|w| w.name.as_str())
        .collect();
    if !u2m.is_empty() {
        let done = async {
            let client = connect(&cfg.postgres.url).await?;
            let mut n = 0;
            for w in &u2m {
                n += if consent {
                    crate::broker::u2m::forget(&client, w, user, narrow_ref).await
                } else {
                    crate::broker::u2m::discard_access(&client, w, user, narrow_ref).await
                }
                .map_err(|e| crate::pg::error_text(&e))?;
            }
            Ok::<u64, String>(n)
        }
        .await;
        match done {
            Ok(n) if consent => println!("dropped {n} stored U2M grant(s) of {user}"),
            Ok(n) => println!("discarded the access token of {n} stored U2M grant(s) of {user}"),
            Err(e) => {
                return Err(CliError::Failed(format!(
                    "the U2M grants could not be changed; nothing was revoked: {e}"
                )));
            }
        }
    }

    // 2. Cached tokens, on every replica.
    let link = match RedisLink::from_config(&cfg.redis) {
        Ok(l) => l,
        Err(_) => {
            return Err(CliError::CannotRun("invalid redis url".into()));
        }
    };
    let monitor = tokio::spawn(link.clone().monitor());
    let start = std::time::Instant::now();
    while !link.healthy() {
        if start.elapsed() > std::time::Duration::from_secs(5) {
            monitor.abort();
            return Err(CliError::Failed(
                "redis is unreachable; cached tokens were not revoked".into(),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut principals = Vec::new();
    for w in &workspaces {
        match crate::broker::revoke_everywhere(&link, &w.name, user, narrow_ref).await {
            Ok(r) => principals.push(r.principals.len()),
            Err(e) => {
                monitor.abort();
                return Err(CliError::Failed(format!("{}: {e}", w.name)));
            }
        }
    }
    monitor.abort();

    // Record it: an operator action in the same chain as the decisions it affects.
    let chain = match admin_chain(&cfg) {
        Ok(c) => c,
        Err(e) => {
            return Err(CliError::Failed(format!("revoked, but not audited: {e}")));
        }
    };
    let mut failed = Vec::new();
    for (w, n) in workspaces.iter().map(|w| &w.name).zip(principals) {
        let draft = crate::audit::Draft {
            reason: if consent {
                "token_and_consent_revoked".into()
            } else {
                "token_revoked".into()
            },
            // issuer/subject name who acted, as in every row (the CLI has no signed-in
            // principal); the principal revoked, when narrowed to one, is in the path.
            user_name: user.to_string(),
            workspace: w.clone(),
            method: "REVOKE".into(),
            path: match &narrow {
                Some((issuer, subject)) => {
                    format!("aegis token revoke --issuer {issuer} --subject {subject}")
                }
                None => "aegis token revoke".into(),
            },
            ..admin_draft()
        };
        match append_admin(&chain, draft).await {
            Ok(seq) => println!("revoked {user} in {w}: {n} principal(s) (audit seq {seq})"),
            Err(e) => failed.push(format!("revoked {user} in {w}, but not audited: {e}")),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(failed.join("; ")))
    }
}

/// A writer on the configured chain for an operator command's `ADMIN` rows.
fn admin_chain(cfg: &Config) -> Result<Arc<crate::audit::AuditChain>, String> {
    let target = PgTarget::parse(&cfg.postgres.url)?;
    Ok(crate::audit::AuditChain::start(
        target,
        cfg.audit.chain_id.clone(),
        cfg.audit.key_id.clone(),
        cfg.audit.hmac_key.clone(),
        cfg.server.instance_id.clone(),
        crate::audit::WriterOptions {
            migrate_on_start: false,
            ..Default::default()
        },
    ))
}

/// An `ADMIN` row from the CLI, to fill in.
fn admin_draft() -> crate::audit::Draft {
    crate::audit::Draft {
        ts: std::time::SystemTime::now(),
        trace_id: crate::authz::TraceId::random().as_str().to_string(),
        verdict: crate::audit::Verdict::Admin,
        agent: "aegis-cli".into(),
        ..Default::default()
    }
}

/// Appends one `ADMIN` row, waiting (at most 10 s) for the writer to load the head.
async fn append_admin(
    chain: &crate::audit::AuditChain,
    draft: crate::audit::Draft,
) -> Result<u64, String> {
    let appended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match chain.append(draft.clone()).await {
                Ok(seq) => return Ok(seq),
                Err(crate::audit::AuditError::Store(_)) if !chain.head_loaded() => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    appended.unwrap_or_else(|_| Err("the audit store did not answer".into()))
}

/// `aegis audit retire-key`: records in the chain that `key_id` signs no row after this one.
/// From then on `aegis audit verify` reports a row under that key as `retired_key`, even
/// though the key is still configured (in `audit.previous_keys`) so older rows keep verifying.
pub async fn audit_retire_key(path: &Path, key_id: &str) -> Result<(), CliError> {
    let cfg = load(path)?;
    if key_id == cfg.audit.key_id {
        return Err(CliError::CannotRun(format!(
            "{key_id:?} is the signing key (audit.key_id); rotate to a new key first"
        )));
    }
    if !cfg.audit.keys().contains_key(key_id) {
        return Err(CliError::CannotRun(format!(
            "no key {key_id:?} in audit.previous_keys; configure it so its rows keep verifying"
        )));
    }
    let chain = admin_chain(&cfg).map_err(CliError::CannotRun)?;
    let draft = crate::audit::Draft {
        reason: crate::audit::verify::KEY_RETIRED.into(),
        method: "RETIRE_KEY".into(),
        path: key_id.to_string(),
        ..admin_draft()
    };
    match append_admin(&chain, draft).await {
        Ok(seq) => {
            println!("key {key_id} retired at seq {seq}: rows after it under {key_id} are tamper");
            Ok(())
        }
        Err(e) => Err(CliError::Failed(format!("not recorded: {e}"))),
    }
}
