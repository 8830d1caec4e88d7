//! The audit chain against a real PostgreSQL: every tamper an auditor worries about is caught,
//! replicas share one chain without forking, a crash mid-batch loses no allowed decision, the
//! serving role needs no DDL, and TLS to Postgres is verified.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aegis::audit::checkpoint::{self, Checkpoint, CheckpointSink, Checkpointer, DirSink};
use aegis::audit::record::AuditRecord;
use aegis::audit::verify::{self, VerifyReport};
use aegis::audit::{AuditChain, Draft, Verdict, WriterOptions};
use aegis::pg::PgTarget;
use aegis::secret::Key32;
use sandbox::stack::PostgresServer;

struct Chain {
    id: String,
    writer: Arc<AuditChain>,
    keys: HashMap<String, Key32>,
    hmac: Key32,
    signing: Key32,
    cp_dir: tempfile::TempDir,
    target: PgTarget,
}

fn draft(i: usize, user: &str) -> Draft {
    Draft {
        ts: SystemTime::now(),
        trace_id: format!("{i:032x}"),
        request_id: format!("req-{i}"),
        verdict: if i % 5 == 4 {
            Verdict::Deny
        } else {
            Verdict::Allow
        },
        reason: if i % 5 == 4 {
            "path_blocked".into()
        } else {
            String::new()
        },
        issuer: "https://idp.example.com".into(),
        subject: format!("u-{user}"),
        user_name: format!("{user}@example.com"),
        agent: "copilot".into(),
        workspace: "prod".into(),
        method: "POST".into(),
        path: "/api/2.0/sql/statements".into(),
        token_source: "federation".into(),
        token_fp: vec![1, 2, 3, 4, 5, 6, 7, 8],
        actor_chain: String::new(),
        // The guardrail fields travel through the chain like every other.
        statement_kind: "query".into(),
        statement_fp: vec![i as u8; 32],
        mcp_tool: if i % 3 == 0 {
            "execute_sql".into()
        } else {
            String::new()
        },
        statement_text: if i % 5 == 0 {
            format!("SELECT {i} FROM t")
        } else {
            String::new()
        },
    }
}

async fn wait_loaded(w: &AuditChain) {
    let start = Instant::now();
    while !w.head_loaded() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the chain head never loaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Chain {
    async fn new(pg: &PostgresServer, id: &str) -> Chain {
        let hmac = Key32::generate();
        let signing = Key32::generate();
        let target = PgTarget::parse(&pg.url()).unwrap();
        let writer = AuditChain::start(
            target.clone(),
            id.to_string(),
            "k1".into(),
            hmac.clone(),
            "test".into(),
            WriterOptions::default(),
        );
        wait_loaded(&writer).await;
        let mut keys = HashMap::new();
        keys.insert("k1".to_string(), hmac.clone());
        Chain {
            id: id.to_string(),
            writer,
            keys,
            hmac,
            signing,
            cp_dir: tempfile::tempdir().unwrap(),
            target,
        }
    }

    async fn append(&self, n: usize) {
        let futs: Vec<_> = (0..n)
            .map(|i| self.writer.append(draft(i, "alice")))
            .collect();
        for r in futures_util::future::join_all(futs).await {
            r.expect("append");
        }
    }

    fn sink(&self) -> DirSink {
        DirSink::new(self.cp_dir.path(), "test")
    }

    async fn checkpoint(&self) -> Checkpoint {
        let cp = Checkpointer::new(
            self.target.clone(),
            self.id.clone(),
            self.keys.clone(),
            self.signing.clone(),
            Arc::new(self.sink()),
            "test",
            tlog_settings(&self.id),
        );
        cp.run_once()
            .await
            .expect("checkpoint")
            .expect("a new head to sign")
    }

    async fn verify(&self, pg: &PostgresServer) -> VerifyReport {
        let client = pg.connect_superuser().await.unwrap();
        let found = self.sink().list().unwrap();
        let anchors = verify::TreeAnchors {
            vkey: aegis::audit::tlog::NoteSigner::new(&format!("aegis/{}", self.id), &self.signing)
                .vkey(),
            notes: self.sink().list_notes().unwrap(),
        };
        verify::verify(
            &client,
            &self.id,
            &self.keys,
            &found,
            &checkpoint::public_key(&self.signing),
            &anchors,
        )
        .await
        .unwrap()
    }
}

/// The transparency-log settings of a test checkpointer: origin `aegis/<chain>`, no witness.
fn tlog_settings(chain: &str) -> aegis::audit::checkpoint::TlogSettings {
    aegis::audit::checkpoint::TlogSettings {
        origin: format!("aegis/{chain}"),
        witnesses: Vec::new(),
        quorum: 0,
        witness_timeout: std::time::Duration::from_secs(1),
        http: reqwest::Client::new(),
    }
}

/// Runs SQL as a superuser with the append-only triggers switched off: what a DBA, or an
/// attacker with the database's superuser, can do.
async fn tamper(pg: &PostgresServer, sql: &str) {
    pg.batch_execute(&format!(
        "SET session_replication_role = replica; {sql}; SET session_replication_role = origin;"
    ))
    .await
    .unwrap_or_else(|e| panic!("tamper sql failed: {e}\n{sql}"));
}

fn assert_caught(report: &VerifyReport, seq: u64, problem: &str, case: &str) {
    assert!(!report.intact, "{case}: not detected: {report:?}");
    assert_eq!(
        report.problem.as_deref(),
        Some(problem),
        "{case}: {report:?}"
    );
    assert_eq!(report.first_bad_seq, Some(seq), "{case}: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tamper_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PostgresServer::start(dir.path())
        .await
        .expect("postgres starts");

    // Intact, with checkpoints.
    let c = Chain::new(&pg, "intact").await;
    c.append(7).await;
    c.checkpoint().await;
    c.append(3).await;
    c.checkpoint().await;
    let r = c.verify(&pg).await;
    assert!(r.intact, "{r:?}");
    assert_eq!((r.rows, r.checkpoints), (10, 2));

    // A modified field.
    let c = Chain::new(&pg, "modified").await;
    c.append(6).await;
    tamper(&pg, "UPDATE aegis_audit SET user_name = 'mallory@example.com' WHERE chain_id = 'modified' AND seq = 3").await;
    assert_caught(&c.verify(&pg).await, 3, "bad_mac", "modified field");

    // A deleted middle row.
    let c = Chain::new(&pg, "middle").await;
    c.append(6).await;
    tamper(
        &pg,
        "DELETE FROM aegis_audit WHERE chain_id = 'middle' AND seq = 3",
    )
    .await;
    assert_caught(&c.verify(&pg).await, 3, "gap", "deleted middle row");

    // Deleted tail rows after a checkpoint, with the head row "fixed" to match.
    let c = Chain::new(&pg, "tail").await;
    c.append(6).await;
    c.checkpoint().await;
    tamper(
        &pg,
        "DELETE FROM aegis_audit WHERE chain_id = 'tail' AND seq > 4; \
         UPDATE aegis_chain_head SET size = 4, head_mac = (SELECT mac FROM aegis_audit WHERE chain_id = 'tail' AND seq = 4) WHERE chain_id = 'tail'",
    )
    .await;
    assert_caught(&c.verify(&pg).await, 5, "truncated", "deleted tail rows");

    // A swapped pair.
    let c = Chain::new(&pg, "swap").await;
    c.append(6).await;
    tamper(
        &pg,
        "UPDATE aegis_audit SET seq = 1000 WHERE chain_id = 'swap' AND seq = 2; \
         UPDATE aegis_audit SET seq = 2 WHERE chain_id = 'swap' AND seq = 3; \
         UPDATE aegis_audit SET seq = 3 WHERE chain_id = 'swap' AND seq = 1000",
    )
    .await;
    let r = c.verify(&pg).await;
    assert!(
        !r.intact && r.first_bad_seq == Some(2),
        "swapped pair: {r:?}"
    );

    // An inserted forged row (the attacker has no HMAC key).
    let c = Chain::new(&pg, "forged").await;
    c.append(5).await;
    tamper(
        &pg,
        "INSERT INTO aegis_audit SELECT chain_id, 6, ts, 'f0f0', request_id, 'ALLOW', '', issuer, \
         subject, 'mallory@example.com', agent, workspace, method, path, token_source, token_fp, \
         key_id, instance_id, version, mac, decode(repeat('ab', 32), 'hex'), actor_chain \
         FROM aegis_audit WHERE chain_id = 'forged' AND seq = 5; \
         UPDATE aegis_chain_head SET size = 6, head_mac = decode(repeat('ab', 32), 'hex') WHERE chain_id = 'forged'",
    )
    .await;
    assert_caught(&c.verify(&pg).await, 6, "bad_mac", "inserted forged row");

    // The whole table rolled back to an earlier dump.
    let c = Chain::new(&pg, "rollback").await;
    c.append(3).await;
    pg.batch_execute(
        "CREATE TABLE dump_rows AS SELECT * FROM aegis_audit WHERE chain_id = 'rollback'; \
         CREATE TABLE dump_head AS SELECT * FROM aegis_chain_head WHERE chain_id = 'rollback'",
    )
    .await
    .unwrap();
    c.append(4).await;
    c.checkpoint().await;
    tamper(
        &pg,
        "DELETE FROM aegis_audit WHERE chain_id = 'rollback'; \
         INSERT INTO aegis_audit SELECT * FROM dump_rows; \
         DELETE FROM aegis_chain_head WHERE chain_id = 'rollback'; \
         INSERT INTO aegis_chain_head SELECT * FROM dump_head",
    )
    .await;
    assert_caught(&c.verify(&pg).await, 4, "truncated", "rollback to a dump");

    // A consistent rewrite by someone holding the HMAC key contradicts the signed checkpoint.
    let c = Chain::new(&pg, "rewrite").await;
    c.append(5).await;
    c.checkpoint().await;
    rewrite_as_key_holder(&pg, &c, 2, "mallory@example.com").await;
    let r = c.verify(&pg).await;
    assert_caught(&r, 5, "checkpoint_mismatch", "rewrite by a key holder");

    // A forged checkpoint (signed by another key) is refused.
    let c = Chain::new(&pg, "forgedcp").await;
    c.append(4).await;
    let head = c.checkpoint().await.head_mac;
    let forged = Checkpoint::sign("forgedcp", 9, head, 1, "test", &Key32::generate());
    c.sink().write(&forged).unwrap();
    assert_caught(
        &c.verify(&pg).await,
        9,
        "forged_checkpoint",
        "forged checkpoint",
    );

    // An unreadable checkpoint file is tampering too, never skipped.
    let c = Chain::new(&pg, "junkcp").await;
    c.append(2).await;
    c.checkpoint().await;
    std::fs::write(
        c.cp_dir.path().join("checkpoint-junkcp-x.json"),
        "{not json",
    )
    .unwrap();
    let r = c.verify(&pg).await;
    assert_eq!(r.problem.as_deref(), Some("forged_checkpoint"), "{r:?}");

    // Two checkpoints with the same size and different heads.
    let c = Chain::new(&pg, "fork").await;
    c.append(4).await;
    let real = c.checkpoint().await;
    let other = Checkpoint::sign(
        "fork",
        real.size,
        [9u8; 32],
        real.ts + 1,
        "test",
        &c.signing,
    );
    c.sink().write(&other).unwrap();
    assert_caught(
        &c.verify(&pg).await,
        4,
        "conflicting_checkpoints",
        "two heads for one size",
    );

    // The checkpointer itself refuses to sign a chain that contradicts its last checkpoint.
    let c = Chain::new(&pg, "refuse").await;
    c.append(4).await;
    c.checkpoint().await;
    c.append(2).await;
    tamper(
        &pg,
        "UPDATE aegis_audit SET path = '/x' WHERE chain_id = 'refuse' AND seq = 5",
    )
    .await;
    let cp = Checkpointer::new(
        c.target.clone(),
        c.id.clone(),
        c.keys.clone(),
        c.signing.clone(),
        Arc::new(c.sink()),
        "test",
        tlog_settings(&c.id),
    );
    let err = cp
        .run_once()
        .await
        .expect_err("signed an inconsistent chain");
    assert!(err.to_string().contains("seq 5"), "{err}");

    // Key rotation: rows made with a retired key keep verifying when the key is configured.
    let c = Chain::new(&pg, "rotate").await;
    c.append(3).await;
    let old = c.keys.clone();
    let new_key = Key32::generate();
    let w2 = AuditChain::start(
        c.target.clone(),
        "rotate".into(),
        "k2".into(),
        new_key.clone(),
        "test".into(),
        WriterOptions::default(),
    );
    wait_loaded(&w2).await;
    for i in 0..3 {
        w2.append(draft(i, "bob")).await.unwrap();
    }
    let mut both = old.clone();
    both.insert("k2".into(), new_key);
    let client = pg.connect_superuser().await.unwrap();
    let public = checkpoint::public_key(&c.signing);
    let anchors = verify::TreeAnchors {
        vkey: aegis::audit::tlog::NoteSigner::new("aegis/rotate", &c.signing).vkey(),
        notes: Vec::new(),
    };
    let r = verify::verify(&client, "rotate", &both, &[], &public, &anchors)
        .await
        .unwrap();
    assert!(r.intact && r.rows == 6, "{r:?}");
    let r = verify::verify(&client, "rotate", &old, &[], &public, &anchors)
        .await
        .unwrap();
    assert_caught(&r, 4, "unknown_key", "rotation without the new key");
}

/// Rewrites the chain from `from_seq` with a changed user, recomputing every MAC with the key,
/// and moves the head: consistent by HMAC, caught only by a checkpoint.
async fn rewrite_as_key_holder(pg: &PostgresServer, c: &Chain, from_seq: i64, user: &str) {
    let client = pg.connect_superuser().await.unwrap();
    let rows = client
        .query(
            "SELECT seq, ts, trace_id, request_id, decision, reason, issuer, subject, user_name, \
             agent, workspace, method, path, token_source, token_fp, key_id, instance_id, version, \
             prev_mac, mac, chain_id, actor_chain, statement_kind, statement_fp, mcp_tool, \
             statement_text FROM aegis_audit WHERE chain_id = $1 ORDER BY seq",
            &[&c.id],
        )
        .await
        .unwrap();
    let mut prev: Vec<u8> = Vec::new();
    let mut sql = String::from("SET session_replication_role = replica;");
    for row in &rows {
        let (mut rec, mac): (AuditRecord, Vec<u8>) = verify::record_of(row).unwrap();
        if (rec.seq as i64) < from_seq {
            prev = mac;
            continue;
        }
        rec.user_name = user.to_string();
        rec.prev_mac = prev.clone();
        let new_mac = rec.mac(c.hmac.expose());
        sql.push_str(&format!(
            "UPDATE aegis_audit SET user_name = '{user}', prev_mac = '\\x{}', mac = '\\x{}' WHERE chain_id = '{}' AND seq = {};",
            hex::encode(&rec.prev_mac),
            hex::encode(new_mac),
            c.id,
            rec.seq
        ));
        prev = new_mac.to_vec();
    }
    sql.push_str(&format!(
        "UPDATE aegis_chain_head SET head_mac = '\\x{}' WHERE chain_id = '{}'; SET session_replication_role = origin;",
        hex::encode(&prev),
        c.id
    ));
    client.batch_execute(&sql).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_share_one_chain_without_fork_or_gap() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PostgresServer::start(dir.path())
        .await
        .expect("postgres starts");
    let a = Chain::new(&pg, "shared").await;
    let b = AuditChain::start(
        a.target.clone(),
        "shared".into(),
        "k1".into(),
        a.hmac.clone(),
        "replica-b".into(),
        WriterOptions::default(),
    );
    wait_loaded(&b).await;
    // Waves of concurrent appends, so each writer keeps batches in flight (pipelined) while the
    // other moves the head under them, again and again.
    let (waves, per_wave) = (30, 20);
    let per_writer = waves * per_wave;
    let writes = |w: Arc<AuditChain>, user: &'static str| async move {
        let mut out = Vec::with_capacity(per_writer);
        for wave in 0..waves {
            let futs: Vec<_> = (0..per_wave)
                .map(|i| w.append(draft(wave * per_wave + i, user)))
                .collect();
            out.extend(futures_util::future::join_all(futs).await);
        }
        out
    };
    let ta = tokio::spawn(writes(a.writer.clone(), "alice"));
    let tb = tokio::spawn(writes(b.clone(), "bob"));
    let mut seqs: Vec<u64> = Vec::new();
    for r in ta.await.unwrap().into_iter().chain(tb.await.unwrap()) {
        seqs.push(r.expect("append"));
    }
    seqs.sort_unstable();
    assert!(
        a.writer.head_moves() + b.head_moves() > 0,
        "the writers never raced for the head: the test proves nothing"
    );
    let want: Vec<u64> = (1..=(2 * per_writer) as u64).collect();
    assert_eq!(seqs, want, "seqs handed out are not exactly 1..=N");
    a.checkpoint().await;
    let r = a.verify(&pg).await;
    assert!(r.intact, "{r:?}");
    assert_eq!(r.rows, 2 * per_writer as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_mid_batch_loses_no_acknowledged_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut pg = PostgresServer::start(dir.path())
        .await
        .expect("postgres starts");
    let c = Chain::new(&pg, "crash").await;
    c.append(10).await;

    // Appends keep flowing while the postmaster is SIGKILLed.
    let writer = c.writer.clone();
    let load = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut failed = 0usize;
        let start = Instant::now();
        let mut i = 1000;
        while start.elapsed() < Duration::from_secs(3) {
            let futs: Vec<_> = (0..20)
                .map(|k| writer.append(draft(i + k, "carol")))
                .collect();
            for (k, r) in futures_util::future::join_all(futs)
                .await
                .into_iter()
                .enumerate()
            {
                match r {
                    Ok(_) => acked.push(format!("{:032x}", i + k)),
                    Err(_) => failed += 1,
                }
            }
            i += 20;
        }
        (acked, failed)
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    pg.kill();
    let (acked, failed) = load.await.unwrap();
    assert!(failed > 0, "the kill did not interrupt any append");
    pg.start_again().await.expect("postgres restarts");

    // Every acknowledged append (an allow would have gone through) is in the table.
    let rows = pg
        .query_json("SELECT trace_id FROM aegis_audit WHERE chain_id = 'crash'")
        .await
        .unwrap();
    let present: std::collections::HashSet<String> = rows
        .iter()
        .map(|r| r["trace_id"].as_str().unwrap().to_string())
        .collect();
    for t in &acked {
        assert!(
            present.contains(t),
            "acknowledged row {t} is missing after the crash"
        );
    }

    // The writer reconnects by itself and the chain still verifies.
    let start = Instant::now();
    loop {
        if c.writer.append(draft(99_999, "alice")).await.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the writer never recovered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = c.verify(&pg).await;
    assert!(r.intact, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_role_needs_no_ddl_and_cannot_rewrite_history() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PostgresServer::start(dir.path())
        .await
        .expect("postgres starts");
    pg.batch_execute("CREATE ROLE aegis_svc LOGIN")
        .await
        .unwrap();

    // The owner migrates and grants; the service role then serves with migrate_on_start off.
    let owner = PgTarget::parse(&pg.superuser_url()).unwrap();
    let owner_client = owner.connect(Duration::from_secs(5), "test").await.unwrap();
    aegis::audit::schema::migrate(&owner_client).await.unwrap();
    aegis::audit::schema::grant_service_role(&owner_client, "aegis_svc")
        .await
        .unwrap();

    let svc_url = pg.url().replacen("aegis@", "aegis_svc@", 1);
    let svc = PgTarget::parse(&svc_url).unwrap();
    let w = AuditChain::start(
        svc.clone(),
        "svc".into(),
        "k1".into(),
        Key32::generate(),
        "test".into(),
        WriterOptions {
            migrate_on_start: false,
            ..WriterOptions::default()
        },
    );
    wait_loaded(&w).await;
    for i in 0..3 {
        w.append(draft(i, "alice")).await.unwrap();
    }
    let client = svc.connect(Duration::from_secs(5), "test").await.unwrap();
    for sql in [
        "UPDATE aegis_audit SET user_name = 'x'",
        "DELETE FROM aegis_audit",
        "TRUNCATE aegis_audit",
        "CREATE TABLE evil (x int)",
        "DROP TABLE aegis_audit",
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        let code = err.as_db_error().map(|d| d.code().code().to_string());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err:?}");
    }

    // Without a schema and without migrate rights, the writer refuses to become ready.
    let fresh = tempfile::tempdir().unwrap();
    let pg2 = PostgresServer::start(fresh.path())
        .await
        .expect("postgres starts");
    pg2.batch_execute("CREATE ROLE aegis_svc LOGIN")
        .await
        .unwrap();
    let w = AuditChain::start(
        PgTarget::parse(&pg2.url().replacen("aegis@", "aegis_svc@", 1)).unwrap(),
        "svc".into(),
        "k1".into(),
        Key32::generate(),
        "test".into(),
        WriterOptions {
            migrate_on_start: false,
            ..WriterOptions::default()
        },
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!w.head_loaded(), "a writer became ready without a schema");
    assert!(w.append(draft(0, "alice")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PostgresServer::start(dir.path())
        .await
        .expect("postgres starts");

    // A self-made CA and a server certificate for 127.0.0.1.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "aegis test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let server = server_params.signed_by(&server_key, &issuer).unwrap();

    let data = pg.data_dir();
    std::fs::write(data.join("server.crt"), server.pem()).unwrap();
    std::fs::write(data.join("server.key"), server_key.serialize_pem()).unwrap();
    let owner = std::fs::metadata(&data).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for f in ["server.crt", "server.key"] {
        let p = data.join(f);
        std::os::unix::fs::chown(&p, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    pg.batch_execute("ALTER SYSTEM SET ssl = on").await.unwrap();
    pg.execute("SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        ca_file.display()
    );
    let tls = PgTarget::parse(&url).unwrap();
    let client = tls
        .connect(Duration::from_secs(5), "test")
        .await
        .expect("tls connect");
    let on: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(on, "the session is not encrypted");

    let w = AuditChain::start(
        tls,
        "tls".into(),
        "k1".into(),
        Key32::generate(),
        "test".into(),
        WriterOptions::default(),
    );
    wait_loaded(&w).await;
    w.append(draft(0, "alice")).await.expect("append over tls");

    // A certificate from another CA is refused.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = other_params.self_signed(&other_key).unwrap();
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.pem()).unwrap();
    let bad = PgTarget::parse(&format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        other_file.display()
    ))
    .unwrap();
    assert!(bad.connect(Duration::from_secs(5), "test").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_clock_is_not_ready_until_it_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PostgresServer::start(dir.path())
        .await
        .expect("postgres starts");
    // The database's `now()` as the aegis role sees it is an hour ahead of this host's.
    pg.batch_execute(
        "CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql \
         AS $$ SELECT pg_catalog.now() + interval '1 hour' $$; \
         ALTER ROLE aegis SET search_path = public, pg_catalog;",
    )
    .await
    .unwrap();
    let w = AuditChain::start(
        PgTarget::parse(&pg.url()).unwrap(),
        "skew".into(),
        "k1".into(),
        Key32::generate(),
        "test".into(),
        WriterOptions::default(),
    );
    // Control: the same database with a tolerance above the skew serves, so the refusal
    // below is the skew and nothing else.
    let tolerant = AuditChain::start(
        PgTarget::parse(&pg.url()).unwrap(),
        "skew".into(),
        "k1".into(),
        Key32::generate(),
        "test".into(),
        WriterOptions {
            max_clock_skew: Duration::from_secs(7200),
            ..WriterOptions::default()
        },
    );
    wait_loaded(&tolerant).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!w.head_loaded(), "ready with a clock an hour off");
    assert!(w.append(draft(0, "alice")).await.is_err());

    // Clocks agree again: the writer becomes ready by itself.
    pg.batch_execute(
        "CREATE OR REPLACE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql \
         AS $$ SELECT pg_catalog.now() $$",
    )
    .await
    .unwrap();
    wait_loaded(&w).await;
    w.append(draft(1, "alice"))
        .await
        .expect("append after the fix");
}
