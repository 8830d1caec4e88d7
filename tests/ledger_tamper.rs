//! Every tamper an auditor must catch, on a chain `aegis serve` wrote with the checkpoints it
//! signed, caught by the `aegis audit verify` binary with exit 1 and the right problem kind;
//! exit 2 when verify cannot run. And an independent verifier, written here from
//! `proto/aegis/audit/v1/record.proto` and the README's MAC formula (its own protobuf encoder,
//! its own HMAC over SHA-256, sharing no code with aegis), recomputes every MAC of that chain.
//! Golden vectors pin the encoding and the MAC for good.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";

// === The independent verifier ===

mod independent {
    use sha2::{Digest, Sha256};

    /// One row, as the table holds it (`ts` as microseconds, read by SQL).
    #[derive(Clone, Debug)]
    pub struct Row {
        pub version: u32,
        pub chain_id: String,
        pub seq: u64,
        pub ts_unix_micros: i64,
        pub trace_id: String,
        pub request_id: String,
        pub decision: u32,
        pub reason: String,
        pub issuer: String,
        pub subject: String,
        pub user_name: String,
        pub agent: String,
        pub workspace: String,
        pub method: String,
        pub path: String,
        pub token_source: String,
        pub token_fingerprint: Vec<u8>,
        pub key_id: String,
        pub prev_mac: Vec<u8>,
        pub instance_id: String,
        pub actor_chain: String,
        pub statement_kind: String,
        pub statement_fingerprint: Vec<u8>,
        pub mcp_tool: String,
        pub statement_text: String,
        pub mac: Vec<u8>,
    }

    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// proto3: a scalar equal to its default is not written.
    fn uint(out: &mut Vec<u8>, field: u64, v: u64) {
        if v != 0 {
            varint(out, field << 3);
            varint(out, v);
        }
    }

    fn bytes(out: &mut Vec<u8>, field: u64, v: &[u8]) {
        if !v.is_empty() {
            varint(out, (field << 3) | 2);
            varint(out, v.len() as u64);
            out.extend_from_slice(v);
        }
    }

    /// `AuditRecord`, fields in number order (record.proto).
    pub fn encode(r: &Row) -> Vec<u8> {
        let mut o = Vec::new();
        uint(&mut o, 1, r.version as u64);
        bytes(&mut o, 2, r.chain_id.as_bytes());
        uint(&mut o, 3, r.seq);
        uint(&mut o, 4, r.ts_unix_micros as u64); // int64: two's complement as a varint
        bytes(&mut o, 5, r.trace_id.as_bytes());
        bytes(&mut o, 6, r.request_id.as_bytes());
        uint(&mut o, 7, r.decision as u64);
        bytes(&mut o, 8, r.reason.as_bytes());
        bytes(&mut o, 9, r.issuer.as_bytes());
        bytes(&mut o, 10, r.subject.as_bytes());
        bytes(&mut o, 11, r.user_name.as_bytes());
        bytes(&mut o, 12, r.agent.as_bytes());
        bytes(&mut o, 13, r.workspace.as_bytes());
        bytes(&mut o, 14, r.method.as_bytes());
        bytes(&mut o, 15, r.path.as_bytes());
        bytes(&mut o, 16, r.token_source.as_bytes());
        bytes(&mut o, 17, &r.token_fingerprint);
        bytes(&mut o, 18, r.key_id.as_bytes());
        bytes(&mut o, 19, &r.prev_mac);
        bytes(&mut o, 20, r.instance_id.as_bytes());
        bytes(&mut o, 21, r.actor_chain.as_bytes());
        bytes(&mut o, 22, r.statement_kind.as_bytes());
        bytes(&mut o, 23, &r.statement_fingerprint);
        bytes(&mut o, 24, r.mcp_tool.as_bytes());
        bytes(&mut o, 25, r.statement_text.as_bytes());
        o
    }

    /// HMAC-SHA256 (RFC 2104) over SHA-256 alone.
    pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let pad = |b: u8| -> Vec<u8> { k.iter().map(|x| x ^ b).collect() };
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(msg)
            .finalize();
        Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize()
            .into()
    }

    /// `HMAC-SHA256(key, "aegis.audit.v1\0" || encode(record) || prev_mac)`.
    pub fn mac(key: &[u8], r: &Row) -> [u8; 32] {
        let mut msg = b"aegis.audit.v1\0".to_vec();
        msg.extend(encode(r));
        msg.extend_from_slice(&r.prev_mac);
        hmac_sha256(key, &msg)
    }

    /// Checks a whole chain: gapless from 1, linked from 32 zero bytes, every MAC. The
    /// number of rows, or the first problem.
    pub fn check(rows: &[Row], key_of: impl Fn(&str) -> Option<Vec<u8>>) -> Result<u64, String> {
        let mut prev = vec![0u8; 32];
        for (i, r) in rows.iter().enumerate() {
            if r.seq != i as u64 + 1 {
                return Err(format!("seq {} at position {}", r.seq, i + 1));
            }
            if r.prev_mac != prev {
                return Err(format!("seq {}: broken link", r.seq));
            }
            let key = key_of(&r.key_id).ok_or(format!("seq {}: unknown key", r.seq))?;
            if mac(&key, r).as_slice() != r.mac.as_slice() {
                return Err(format!("seq {}: bad mac", r.seq));
            }
            prev = r.mac.clone();
        }
        Ok(rows.len() as u64)
    }
}

use independent::Row;

/// Every row of chain `main`, read by plain SQL (no aegis code).
async fn rows(stack: &Stack) -> Vec<Row> {
    let client = stack.postgres.connect_superuser().await.expect("superuser");
    let rows = client
        .query(
            "SELECT version, chain_id, seq, (EXTRACT(EPOCH FROM ts) * 1000000)::bigint, trace_id, \
             request_id, decision, reason, issuer, subject, user_name, agent, workspace, method, \
             path, token_source, token_fp, key_id, prev_mac, instance_id, actor_chain, mac, \
             statement_kind, statement_fp, mcp_tool, statement_text \
             FROM aegis_audit WHERE chain_id = 'main' ORDER BY seq",
            &[],
        )
        .await
        .expect("rows");
    rows.iter()
        .map(|r| Row {
            version: r.get::<_, i32>(0) as u32,
            chain_id: r.get(1),
            seq: r.get::<_, i64>(2) as u64,
            ts_unix_micros: r.get(3),
            trace_id: r.get(4),
            request_id: r.get(5),
            decision: match r.get::<_, String>(6).as_str() {
                "ALLOW" => 1,
                "DENY" => 2,
                "ADMIN" => 3,
                other => panic!("decision {other}"),
            },
            reason: r.get(7),
            issuer: r.get(8),
            subject: r.get(9),
            user_name: r.get(10),
            agent: r.get(11),
            workspace: r.get(12),
            method: r.get(13),
            path: r.get(14),
            token_source: r.get(15),
            token_fingerprint: r.get(16),
            key_id: r.get(17),
            prev_mac: r.get(18),
            instance_id: r.get(19),
            actor_chain: r.get(20),
            mac: r.get(21),
            statement_kind: r.get(22),
            statement_fingerprint: r.get(23),
            mcp_tool: r.get(24),
            statement_text: r.get(25),
        })
        .collect()
}

fn key_file(path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).expect("key file");
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .expect("base64 key")
}

// === Golden vectors ===

/// Pinned forever: a change to the encoding or the MAC breaks every chain ever written.
#[test]
fn golden_vectors() {
    let key = [0x42u8; 32];
    let first = Row {
        version: 1,
        chain_id: "main".into(),
        seq: 1,
        ts_unix_micros: 1_764_000_000_123_456,
        trace_id: "0123456789abcdef0123456789abcdef".into(),
        request_id: "req-1".into(),
        decision: 1,
        reason: String::new(),
        issuer: "https://idp.example.com".into(),
        subject: "u-alice".into(),
        user_name: "alice@example.com".into(),
        agent: "copilot".into(),
        workspace: "prod".into(),
        method: "GET".into(),
        path: "/api/2.0/preview/scim/v2/Me".into(),
        token_source: "federation".into(),
        token_fingerprint: vec![1, 2, 3, 4, 5, 6, 7, 8],
        key_id: "k1".into(),
        prev_mac: vec![0u8; 32],
        instance_id: "pod-a".into(),
        actor_chain: String::new(),
        statement_kind: String::new(),
        statement_fingerprint: Vec::new(),
        mcp_tool: String::new(),
        statement_text: String::new(),
        mac: Vec::new(),
    };
    let first_mac = independent::mac(&key, &first);
    let second = Row {
        seq: 2,
        decision: 2,
        reason: "path_blocked".into(),
        token_source: String::new(),
        token_fingerprint: Vec::new(),
        prev_mac: first_mac.to_vec(),
        actor_chain: "orchestrator > planner".into(),
        ..first.clone()
    };
    let second_mac = independent::mac(&key, &second);
    // The guardrail fields (22 to 24), set.
    let third = Row {
        seq: 3,
        reason: "statement_blocked".into(),
        prev_mac: second_mac.to_vec(),
        statement_kind: "dcl".into(),
        statement_fingerprint: vec![0xab; 32],
        mcp_tool: "execute_sql".into(),
        ..second.clone()
    };
    let third_mac = independent::mac(&key, &third);
    // The SQL text an operator chose to record (field 25), set.
    let fourth = Row {
        seq: 4,
        prev_mac: third_mac.to_vec(),
        statement_text: "GRANT SELECT ON TABLE main.sales.orders TO `mallory`".into(),
        ..third.clone()
    };
    let fourth_mac = independent::mac(&key, &fourth);
    assert_eq!(
        hex::encode(independent::encode(&first)),
        GOLDEN_FIRST_ENCODING
    );
    assert_eq!(hex::encode(first_mac), GOLDEN_FIRST_MAC);
    assert_eq!(hex::encode(second_mac), GOLDEN_SECOND_MAC);
    assert_eq!(hex::encode(third_mac), GOLDEN_THIRD_MAC);
    assert_eq!(hex::encode(fourth_mac), GOLDEN_FOURTH_MAC);
    // RFC 4231 test case 2, so the hand-written HMAC is HMAC.
    assert_eq!(
        hex::encode(independent::hmac_sha256(
            b"Jefe",
            b"what do ya want for nothing?"
        )),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );

    // And aegis computes the same.
    use aegis::audit::record::AuditRecord;
    let as_aegis = |r: &Row| AuditRecord {
        version: r.version,
        chain_id: r.chain_id.clone(),
        seq: r.seq,
        ts_unix_micros: r.ts_unix_micros,
        trace_id: r.trace_id.clone(),
        request_id: r.request_id.clone(),
        decision: r.decision as i32,
        reason: r.reason.clone(),
        issuer: r.issuer.clone(),
        subject: r.subject.clone(),
        user_name: r.user_name.clone(),
        agent: r.agent.clone(),
        workspace: r.workspace.clone(),
        method: r.method.clone(),
        path: r.path.clone(),
        token_source: r.token_source.clone(),
        token_fingerprint: r.token_fingerprint.clone(),
        key_id: r.key_id.clone(),
        prev_mac: r.prev_mac.clone(),
        instance_id: r.instance_id.clone(),
        actor_chain: r.actor_chain.clone(),
        statement_kind: r.statement_kind.clone(),
        statement_fingerprint: r.statement_fingerprint.clone(),
        mcp_tool: r.mcp_tool.clone(),
        statement_text: r.statement_text.clone(),
    };
    assert_eq!(hex::encode(as_aegis(&first).mac(&key)), GOLDEN_FIRST_MAC);
    assert_eq!(hex::encode(as_aegis(&second).mac(&key)), GOLDEN_SECOND_MAC);
    assert_eq!(hex::encode(as_aegis(&third).mac(&key)), GOLDEN_THIRD_MAC);
    assert_eq!(hex::encode(as_aegis(&fourth).mac(&key)), GOLDEN_FOURTH_MAC);
}

const GOLDEN_FIRST_ENCODING: &str = "080112046d61696e180120c0c4908b948b91032a20303132333435363738396162636465663031323334353637383961626364656632057265712d3138014a1768747470733a2f2f6964702e6578616d706c652e636f6d5207752d616c6963655a11616c696365406578616d706c652e636f6d6207636f70696c6f746a0470726f6472034745547a1b2f6170692f322e302f707265766965772f7363696d2f76322f4d6582010a66656465726174696f6e8a010801020304050607089201026b319a01200000000000000000000000000000000000000000000000000000000000000000a20105706f642d61";
const GOLDEN_FIRST_MAC: &str = "3974ab53f613c4d6c69b7ffdabad3faba8c396ef7ad7951b75ad89ec2bb460a5";
const GOLDEN_THIRD_MAC: &str = "dcee01494181fef0aad5d4574f466e17f0c6e1736a19f143749c7c046357e410";
const GOLDEN_FOURTH_MAC: &str = "e47b6701aadf7cf3e325823e0ced2c3970a802274a90f63d5fda12558161df16";
const GOLDEN_SECOND_MAC: &str = "cb1499605b91a0d4b7360bb95da6fe7892e6e1c0e806910927c40c223ab54aaf";

// === Tampering with a chain aegis serve wrote ===

/// Runs `aegis audit verify --json` with `extra` arguments; exit code and the report.
fn verify(config: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let mut args = vec!["audit", "verify", "--config", config, "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = aegis(&args);
    let report = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    (code, report, format!("{out}{err}"))
}

fn assert_caught(config: &str, problem: &str, seq: u64, case: &str) {
    let (code, report, text) = verify(config, &[]);
    assert_eq!(code, 1, "{case}: {text}");
    assert_eq!(report["intact"], false, "{case}: {text}");
    assert_eq!(report["problem"], problem, "{case}: {text}");
    assert_eq!(report["first_bad_seq"], seq, "{case}: {text}");
}

fn assert_intact(config: &str, case: &str) -> serde_json::Value {
    let (code, report, text) = verify(config, &[]);
    assert_eq!(code, 0, "{case}: {text}");
    assert_eq!(report["intact"], true, "{case}: {text}");
    report
}

/// Runs `sql` as a superuser with the append-only triggers off (a DBA, or an attacker who
/// became one).
async fn tamper(stack: &Stack, sql: &str) {
    stack
        .postgres
        .batch_execute(&format!(
            "SET session_replication_role = replica; {sql}; SET session_replication_role = origin;"
        ))
        .await
        .unwrap_or_else(|e| panic!("tamper sql failed: {e}\n{sql}"));
}

/// Saves the chain (rows, head, checkpoint files); `restore` puts it back.
struct Saved {
    checkpoints: PathBuf,
    copy: tempfile::TempDir,
}

impl Saved {
    async fn take(stack: &Stack) -> Saved {
        tamper(
            stack,
            "DROP TABLE IF EXISTS saved_rows; DROP TABLE IF EXISTS saved_head; \
             DROP TABLE IF EXISTS saved_tiles; DROP TABLE IF EXISTS saved_notes; \
             CREATE TABLE saved_rows AS SELECT * FROM aegis_audit; \
             CREATE TABLE saved_head AS SELECT * FROM aegis_chain_head; \
             CREATE TABLE saved_tiles AS SELECT * FROM aegis_tlog_tiles; \
             CREATE TABLE saved_notes AS SELECT * FROM aegis_tlog_checkpoints",
        )
        .await;
        let checkpoints = stack.work_dir().join("checkpoints");
        let copy = tempfile::tempdir().expect("tempdir");
        for e in std::fs::read_dir(&checkpoints).expect("checkpoints") {
            let e = e.expect("entry");
            std::fs::copy(e.path(), copy.path().join(e.file_name())).expect("copy");
        }
        Saved { checkpoints, copy }
    }

    async fn restore(&self, stack: &Stack) {
        tamper(
            stack,
            "DELETE FROM aegis_audit; INSERT INTO aegis_audit SELECT * FROM saved_rows; \
             DELETE FROM aegis_chain_head; INSERT INTO aegis_chain_head SELECT * FROM saved_head; \
             DELETE FROM aegis_tlog_tiles; INSERT INTO aegis_tlog_tiles SELECT * FROM saved_tiles; \
             DELETE FROM aegis_tlog_checkpoints; \
             INSERT INTO aegis_tlog_checkpoints SELECT * FROM saved_notes",
        )
        .await;
        std::fs::remove_dir_all(&self.checkpoints).expect("clear checkpoints");
        std::fs::create_dir_all(&self.checkpoints).expect("checkpoints dir");
        for e in std::fs::read_dir(self.copy.path()).expect("saved checkpoints") {
            let e = e.expect("entry");
            std::fs::copy(e.path(), self.checkpoints.join(e.file_name())).expect("copy");
        }
    }
}

/// The checkpoint files, parsed (size, path).
fn checkpoints(stack: &Stack) -> Vec<(u64, PathBuf, serde_json::Value)> {
    let mut out: Vec<_> = std::fs::read_dir(stack.work_dir().join("checkpoints"))
        .expect("checkpoints")
        .map(|e| e.expect("entry").path())
        // The transparency log's notes (note-*.txt) sit beside the JSON checkpoints.
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
            (v["size"].as_u64().expect("size"), p, v)
        })
        .collect();
    out.sort_by_key(|(s, _, _)| *s);
    out
}

/// Writes a checkpoint signed with the real signing key (a key holder), as aegis' v2 format.
fn write_signed_checkpoint(stack: &Stack, size: u64, head: [u8; 32], ts: i64, name: &str) {
    let seed = aegis::secret::Key32::from_bytes(
        key_file(&stack.keys_dir().join("checkpoint.key"))
            .try_into()
            .expect("32-byte seed"),
    );
    let cp = aegis::audit::checkpoint::Checkpoint::sign("main", size, head, ts, "mallory", &seed);
    std::fs::write(
        stack.work_dir().join("checkpoints").join(name),
        cp.to_json(),
    )
    .expect("write checkpoint");
}

/// Re-MACs rows from `from` on, each under its own key (a key holder rewriting history), with
/// the change `edit` applied, and moves the head to match.
async fn rewrite_from(
    stack: &Stack,
    from: u64,
    key_of: impl Fn(&str) -> Vec<u8>,
    edit: impl Fn(&mut Row),
) {
    let all = rows(stack).await;
    let mut prev = all[from as usize - 2].mac.clone();
    let mut sql = String::new();
    for r in all.iter().filter(|r| r.seq >= from) {
        let mut r = r.clone();
        edit(&mut r);
        r.prev_mac = prev.clone();
        let mac = independent::mac(&key_of(&r.key_id), &r);
        sql.push_str(&format!(
            "UPDATE aegis_audit SET user_name = '{}', key_id = '{}', prev_mac = '\\x{}', \
             mac = '\\x{}' WHERE chain_id = 'main' AND seq = {};",
            r.user_name,
            r.key_id,
            hex::encode(&r.prev_mac),
            hex::encode(mac),
            r.seq
        ));
        prev = mac.to_vec();
    }
    sql.push_str(&format!(
        "UPDATE aegis_chain_head SET head_mac = '\\x{}' WHERE chain_id = 'main'",
        hex::encode(&prev)
    ));
    tamper(stack, &sql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tamper_of_a_served_chain_is_caught_by_the_verify_binary() {
    let mut stack = start_with(StackOptions::new(AEGIS_BIN).with_config(|c| {
        c.get_mut("audit")
            .and_then(|v| v.as_table_mut())
            .expect("audit")
            .insert("checkpoint_interval".into(), "1s".into());
    }))
    .await;
    let config = stack.config_path().to_str().expect("path").to_string();
    let alice = token(&stack, "alice");
    let bob = token(&stack, "bob");

    // Traffic with the first key (k1): allows and denies, checkpointed as it goes.
    for i in 0..12 {
        let bearer = if i % 2 == 0 { &alice } else { &bob };
        let path = if i % 4 == 3 {
            "/api/2.0/token/create"
        } else {
            ME
        };
        let _ = http()
            .request(
                if path == ME {
                    reqwest::Method::GET
                } else {
                    reqwest::Method::POST
                },
                format!("{}{path}", stack.envoy_url()),
            )
            .bearer_auth(bearer)
            .send()
            .await
            .expect("request");
        if i == 5 {
            tokio::time::sleep(Duration::from_millis(1300)).await;
        }
    }
    let _ = get(&stack, ME, None).await; // a missing_credentials deny
    tokio::time::sleep(Duration::from_millis(1300)).await;

    // Rotate the HMAC key: k2 signs from now on, k1 stays configured for the old rows.
    let keys = stack.keys_dir();
    let k2 = keys.join("audit-k2.key");
    std::fs::write(
        &k2,
        base64::engine::general_purpose::STANDARD.encode([0x5au8; 32]),
    )
    .expect("write k2");
    let k1_path = keys.join("audit.key");
    stack
        .update_config(|c| {
            let audit = c
                .get_mut("audit")
                .and_then(|v| v.as_table_mut())
                .expect("audit");
            audit.insert("key_id".into(), "k2".into());
            audit.insert("hmac_key_file".into(), k2.display().to_string().into());
            let mut prev = toml::Table::new();
            prev.insert("k1".into(), k1_path.display().to_string().into());
            audit.insert("previous_keys".into(), prev.into());
        })
        .expect("config");
    stack.aegis.restart().await.expect("aegis restarts with k2");
    for _ in 0..3 {
        assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);
    }
    // The operator retires k1 once every replica signs with k2.
    let (code, out, err) = aegis(&["audit", "retire-key", "--config", &config, "--key-id", "k1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);
    // A clean stop writes a final checkpoint over the whole chain.
    stack.aegis.terminate(Duration::from_secs(15)).await;

    // === The untouched chain: intact for aegis and for the independent verifier. ===
    let report = assert_intact(&config, "the chain aegis serve wrote");
    let all = rows(&stack).await;
    let n = all.len() as u64;
    assert_eq!(report["rows"], n);
    let k1 = key_file(&k1_path);
    let k2v = key_file(&k2);
    let checked = independent::check(&all, |id| match id {
        "k1" => Some(k1.clone()),
        "k2" => Some(k2v.clone()),
        _ => None,
    })
    .expect("the independent verifier");
    assert_eq!(checked, n);
    assert!(all.iter().any(|r| r.key_id == "k1") && all.iter().any(|r| r.key_id == "k2"));
    let retired_at = all
        .iter()
        .find(|r| r.reason == "key_retired")
        .expect("the key_retired row")
        .seq;
    let cps = checkpoints(&stack);
    let (top, _, _) = cps.last().cloned().expect("checkpoints");
    assert_eq!(top, n, "the final checkpoint covers the chain");
    assert!(
        cps.len() >= 3,
        "checkpoints: {:?}",
        cps.iter().map(|c| c.0).collect::<Vec<_>>()
    );
    // A checkpoint at or after seq 3, for the rewrite case.
    let pinned = cps
        .iter()
        .map(|c| c.0)
        .find(|s| *s >= 2)
        .expect("a checkpoint >= 2");
    let saved = Saved::take(&stack).await;

    // === Row tampering ===
    tamper(
        &stack,
        "UPDATE aegis_audit SET user_name = 'mallory@example.com' WHERE seq = 3",
    )
    .await;
    assert_caught(&config, "bad_mac", 3, "a modified field");
    saved.restore(&stack).await;

    tamper(&stack, "DELETE FROM aegis_audit WHERE seq = 4").await;
    assert_caught(&config, "gap", 4, "a deleted middle row");
    saved.restore(&stack).await;

    tamper(
        &stack,
        "UPDATE aegis_audit SET seq = 1000000 WHERE seq = 4; UPDATE aegis_audit SET seq = 4 WHERE seq = 5; \
         UPDATE aegis_audit SET seq = 5 WHERE seq = 1000000",
    )
    .await;
    assert_caught(&config, "broken_link", 4, "a reordered pair");
    saved.restore(&stack).await;

    tamper(&stack, "UPDATE aegis_audit SET key_id = 'k9' WHERE seq = 6").await;
    assert_caught(&config, "unknown_key", 6, "a row under an unknown key");
    saved.restore(&stack).await;

    // An inserted forged row at the tail, with the head moved to it: no key, no valid MAC.
    let last = all.last().expect("rows").clone();
    tamper(
        &stack,
        &format!(
            "INSERT INTO aegis_audit SELECT chain_id, seq + 1, ts, 'ffffffffffffffffffffffffffffffff', \
             request_id, 'ALLOW', '', issuer, subject, 'mallory@example.com', agent, workspace, method, \
             path, token_source, token_fp, key_id, instance_id, version, mac, '\\x{}', actor_chain \
             FROM aegis_audit WHERE seq = {n}; \
             UPDATE aegis_chain_head SET size = {}, head_mac = '\\x{}'",
            "00".repeat(32),
            n + 1,
            "00".repeat(32)
        ),
    )
    .await;
    assert_caught(&config, "bad_mac", n + 1, "an inserted forged row");
    saved.restore(&stack).await;

    // A k1 holder appends a correctly MACed row after k1's retirement.
    let forged = Row {
        seq: n + 1,
        trace_id: "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee".into(),
        user_name: "mallory@example.com".into(),
        key_id: "k1".into(),
        prev_mac: last.mac.clone(),
        ..last.clone()
    };
    let forged_mac = independent::mac(&k1, &forged);
    tamper(
        &stack,
        &format!(
            "INSERT INTO aegis_audit SELECT chain_id, {seq}, ts, '{trace}', request_id, decision, reason, \
             issuer, subject, 'mallory@example.com', agent, workspace, method, path, token_source, \
             token_fp, 'k1', instance_id, version, '\\x{prev}', '\\x{mac}', actor_chain \
             FROM aegis_audit WHERE seq = {n}; \
             UPDATE aegis_chain_head SET size = {seq}, head_mac = '\\x{mac}'",
            seq = n + 1,
            trace = forged.trace_id,
            prev = hex::encode(&forged.prev_mac),
            mac = hex::encode(forged_mac),
        ),
    )
    .await;
    assert!(retired_at < n + 1);
    assert_caught(&config, "retired_key", n + 1, "a row under a retired key");
    saved.restore(&stack).await;

    // === Tail, head and rollback ===
    tamper(
        &stack,
        &format!(
            "DELETE FROM aegis_audit WHERE seq > {keep}; \
             UPDATE aegis_chain_head SET size = {keep}, head_mac = '\\x{mac}'",
            keep = n - 2,
            mac = hex::encode(&all[n as usize - 3].mac)
        ),
    )
    .await;
    assert_caught(
        &config,
        "truncated",
        n - 1,
        "deleted tail rows, head moved back",
    );
    saved.restore(&stack).await;

    tamper(&stack, "UPDATE aegis_chain_head SET size = size + 1").await;
    assert_caught(&config, "head_mismatch", n + 1, "a head row that disagrees");
    saved.restore(&stack).await;

    // A key holder rewrites history consistently (every MAC valid): the checkpoints disagree.
    rewrite_from(
        &stack,
        2,
        |id| if id == "k1" { k1.clone() } else { k2v.clone() },
        |r| r.user_name = "mallory@example.com".into(),
    )
    .await;
    assert_caught(
        &config,
        "checkpoint_mismatch",
        pinned,
        "a rewrite by a key holder",
    );
    saved.restore(&stack).await;

    // === Checkpoint tampering ===
    let (_, path, json) = cps[cps.len() / 2].clone();
    let mut bent = json.clone();
    bent["size"] = (bent["size"].as_u64().unwrap() + 1).into();
    std::fs::write(&path, bent.to_string()).expect("write");
    let (code, report, text) = verify(&config, &[]);
    assert_eq!(
        (code, report["problem"].as_str()),
        (1, Some("forged_checkpoint")),
        "{text}"
    );
    saved.restore(&stack).await;

    let head_of = |seq: u64| -> [u8; 32] { all[seq as usize - 1].mac.clone().try_into().unwrap() };
    let (size, _, json) = cps[1].clone();
    write_signed_checkpoint(
        &stack,
        size,
        [7u8; 32],
        json["ts"].as_i64().unwrap(),
        "checkpoint-main-x1.json",
    );
    assert_caught(
        &config,
        "conflicting_checkpoints",
        size,
        "two heads for one size",
    );
    saved.restore(&stack).await;

    let (small, _, _) = cps[0].clone();
    let late = cps.last().unwrap().2["ts"].as_i64().unwrap() + 60;
    write_signed_checkpoint(
        &stack,
        small,
        head_of(small),
        late,
        "checkpoint-main-x2.json",
    );
    let (code, report, text) = verify(&config, &[]);
    assert_eq!(
        (code, report["problem"].as_str()),
        (1, Some("checkpoint_rollback")),
        "{text}"
    );
    saved.restore(&stack).await;

    // === Options and the exit code for "could not run" ===
    assert_intact(&config, "restored");
    let empty = tempfile::tempdir().expect("tempdir");
    let (code, report, text) = verify(
        &config,
        &[
            "--chain",
            "main",
            "--checkpoints",
            empty.path().to_str().unwrap(),
        ],
    );
    assert_eq!(
        (code, &report["checkpoints"]),
        (0, &serde_json::json!(0)),
        "{text}"
    );
    // The tail deletion above, done thoroughly (the head row, the transparency log's tiles and
    // the notes in the database cut back too: no key is needed for any of it), against an empty
    // checkpoint directory, is not provable…
    assert!(n < 256, "the cut below edits one level-0 tile");
    // The tile is stored in strips of 16 hashes: keep the first n - 1.
    let (strip, keep) = ((n - 1) / 16, (n - 1) % 16);
    let cut_tile = if keep == 0 {
        format!("DELETE FROM aegis_tlog_tiles WHERE level = 0 AND idx = 0 AND strip >= {strip}")
    } else {
        format!(
            "DELETE FROM aegis_tlog_tiles WHERE level = 0 AND idx = 0 AND strip > {strip}; \
             UPDATE aegis_tlog_tiles SET hashes = substring(hashes FROM 1 FOR {}) \
             WHERE level = 0 AND idx = 0 AND strip = {strip}",
            keep * 32
        )
    };
    tamper(
        &stack,
        &format!(
            "DELETE FROM aegis_audit WHERE seq = {n}; \
             UPDATE aegis_chain_head SET size = {m}, tree_size = {m}, head_mac = '\\x{}'; \
             {cut_tile}; \
             DELETE FROM aegis_tlog_checkpoints WHERE size > {m}",
            hex::encode(&all[n as usize - 2].mac),
            m = n - 1,
        ),
    )
    .await;
    let (code, _, text) = verify(&config, &["--checkpoints", empty.path().to_str().unwrap()]);
    assert_eq!(
        code, 0,
        "without checkpoints a clean cut is invisible: {text}"
    );
    // …and is caught with them.
    assert_caught(&config, "truncated", n, "a clean cut of the last row");
    saved.restore(&stack).await;
    let (code, report, text) = verify(&config, &["--chain", "nosuchchain"]);
    assert_eq!(
        (code, &report["rows"]),
        (0, &serde_json::json!(0)),
        "{text}"
    );

    stack.postgres.stop().await;
    let (code, _, text) = verify(&config, &[]);
    assert_eq!(code, 2, "verify without a database: {text}");
}
