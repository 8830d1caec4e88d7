//! The transparency log as an outsider meets it: a chain `aegis serve` wrote, served on
//! `audit.tlog_listen`, checked by an independent reader written in Python from the specs
//! (tests/python/tlog_check.py: RFC 6962/9162, C2SP tlog-tiles, signed-note, tlog-cosignature)
//! with nothing but the log's public key, and cosigned by an independent witness from the same
//! file (C2SP tlog-witness). Receipts from `aegis audit prove` are checked offline by
//! `aegis audit check-receipt` and by the Python reader.

mod support;

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use support::*;

const ME: &str = "/api/2.0/preview/scim/v2/Me";

fn python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/tlog_check.py")
}

/// `tlog_check.py <args>`: (exit code, parsed JSON of stdout).
fn reader(args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(python())
        .arg(script())
        .args(args)
        .output()
        .expect("run tlog_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "tlog_check.py {args:?} printed no JSON: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), value)
}

/// The independent witness, killed on drop.
struct WitnessProc {
    child: Child,
    vkey: String,
    url: String,
}

impl WitnessProc {
    fn start(log_vkey: &str) -> WitnessProc {
        let mut child = Command::new(python())
            .arg(script())
            .args(["witness", "0", log_vkey])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the witness");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let vkey = lines.next().expect("witness vkey").expect("read");
        let port = lines.next().expect("witness port").expect("read");
        WitnessProc {
            child,
            vkey,
            url: format!("http://127.0.0.1:{}", port.trim()),
        }
    }
}

impl Drop for WitnessProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn tamper(stack: &Stack, sql: &str) {
    stack
        .postgres
        .batch_execute(&format!(
            "SET session_replication_role = replica; {sql}; SET session_replication_role = origin;"
        ))
        .await
        .unwrap_or_else(|e| panic!("tamper sql failed: {e}\n{sql}"));
}

async fn fetch_checkpoint(url: &str) -> Option<String> {
    let r = http().get(format!("{url}/checkpoint")).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.text().await.ok()
}

/// The (size, root) a checkpoint note states.
fn size_root(note: &str) -> (u64, String) {
    let mut lines = note.lines();
    let _origin = lines.next();
    let size = lines.next().expect("size").parse().expect("size number");
    (size, lines.next().expect("root").to_string())
}

async fn post_witness(url: &str, body: String) -> (u16, String) {
    let r = http()
        .post(format!("{url}/add-checkpoint"))
        .body(body)
        .send()
        .await
        .expect("witness answers");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_check_the_log_receipts_and_witnesses_with_public_data_only() {
    let tlog_port = free_port().unwrap();
    let mut stack = start_with(StackOptions::new(AEGIS_BIN).with_config(move |c| {
        let audit = c["audit"].as_table_mut().expect("audit table");
        audit.insert(
            "tlog_listen".into(),
            format!("127.0.0.1:{tlog_port}").into(),
        );
        audit.insert("tlog_origin".into(), "aegis.test/main".into());
        audit.insert("checkpoint_interval".into(), "1s".into());
    }))
    .await;
    let url = format!("http://127.0.0.1:{tlog_port}");
    let config = stack.config_path().to_str().unwrap().to_string();

    // The log's public key, from the binary.
    let (code, vkey, err) = aegis(&["audit", "vkey", "--config", &config]);
    assert_eq!(code, 0, "{err}");
    let vkey = vkey.trim().to_string();
    assert!(vkey.starts_with("aegis.test/main+"), "{vkey}");

    // The independent implementation agrees with the specs' own vectors first.
    let selftest = Command::new(python())
        .arg("-c")
        .arg(format!(
            "import sys; sys.path.insert(0, {:?}); import tlog_check as t, base64; \
             l=[bytes.fromhex(h) for h in ['', '00', '10', '2021', '3031', '40414243', \
             '5051525354555657', '606162636465666768696a6b6c6d6e6f']]; \
             assert t.mth([t.leaf_hash(x) for x in l]).hex() == \
             '5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328'; \
             k=t.parse_vkey('example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k'); \
             text, sigs = t.split_note('This is an example message.\\n\\n\\u2014 example.com/foo \
             Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\\n'); \
             assert t.verify_sig(k, text, sigs[0]) is True; \
             assert t.verify_sig(k, text.replace('example', 'exemple'), sigs[0]) is False; print('ok')",
            script().parent().unwrap()
        ))
        .output()
        .expect("python");
    assert_eq!(
        String::from_utf8_lossy(&selftest.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&selftest.stderr)
    );

    // A witness for this log; aegis restarts with it configured.
    let witness = WitnessProc::start(&vkey);
    let (wurl, wvkey) = (witness.url.clone(), witness.vkey.clone());
    stack
        .update_config(move |c| {
            let audit = c["audit"].as_table_mut().expect("audit table");
            let mut w = toml::Table::new();
            w.insert("url".into(), wurl.into());
            w.insert("vkey".into(), wvkey.into());
            audit.insert(
                "witnesses".into(),
                toml::Value::Array(vec![toml::Value::Table(w)]),
            );
            audit.insert("witness_quorum".into(), 1.into());
        })
        .expect("config");
    stack.aegis.restart().await.expect("aegis restarts");

    // Decisions: allows and a deny, with a checkpoint between them (the rollback case below
    // needs an earlier one to roll back to).
    let alice = token(&stack, "alice");
    assert_eq!(get(&stack, ME, Some(&alice)).await.status, 200);
    let first = audit_rows(&stack).await.len() as u64;
    eventually(Duration::from_secs(20), "a first checkpoint", || {
        let url = url.clone();
        async move {
            fetch_checkpoint(&url)
                .await
                .is_some_and(|n| size_root(&n).0 >= first)
        }
    })
    .await;
    let mut traces = Vec::new();
    for _ in 0..6 {
        let r = get(&stack, ME, Some(&alice)).await;
        assert_eq!(r.status, 200);
        traces.push(r.trace_id());
    }
    let denied = get(&stack, ME, None).await;
    assert_eq!(denied.status, 401);
    let rows = audit_rows(&stack).await.len() as u64;

    // A checkpoint covering them, cosigned by the witness.
    let found = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    eventually(
        Duration::from_secs(20),
        "a cosigned checkpoint of every row",
        || {
            let (url, found) = (url.clone(), found.clone());
            async move {
                match fetch_checkpoint(&url).await {
                    Some(n) if size_root(&n).0 >= rows && n.contains("witness.test/w1") => {
                        *found.lock().unwrap() = n;
                        true
                    }
                    _ => false,
                }
            }
        },
    )
    .await;
    let note = found.lock().unwrap().clone();
    let (size, _root) = size_root(&note);

    // The reader checks everything from public data and the log key alone.
    let (code, out) = reader(&[
        "check",
        &url,
        &vkey,
        "--witness",
        &witness.vkey,
        "--quorum",
        "1",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out["size"].as_u64().unwrap() >= size, "{out}");
    let (trusted_size, trusted_root) = (
        out["size"].as_u64().unwrap(),
        out["root"].as_str().unwrap().to_string(),
    );
    // Under another key, the same log is refused.
    let other =
        aegis::audit::tlog::NoteSigner::new("aegis.test/main", &aegis::secret::Key32::generate())
            .vkey()
            .encode();
    let (code, out) = reader(&["check", &url, &other]);
    assert_eq!(code, 1, "{out}");

    // === A receipt for one decision, checked offline ===
    let (code, receipt, err) = aegis(&[
        "audit",
        "prove",
        "--config",
        &config,
        "--trace-id",
        &traces[2],
    ]);
    assert_eq!(code, 0, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("receipt.json");
    std::fs::write(&file, &receipt).unwrap();
    let f = file.to_str().unwrap();
    let (code, out, err) = aegis(&[
        "audit",
        "check-receipt",
        f,
        "--public-key",
        &vkey,
        "--witness",
        &witness.vkey,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("receipt valid: 1 decision(s)")
            && out.contains(&traces[2])
            && out.contains("ALLOW"),
        "{out}"
    );
    assert!(out.contains("cosigned by witness.test/w1"), "{out}");
    let (code, out) = reader(&["receipt", f, &vkey]);
    assert_eq!(code, 0, "{out}");
    // The other key, an edited record, an edited entry, a proof for another leaf: refused.
    let (code, out, _) = aegis(&["audit", "check-receipt", f, "--public-key", &other]);
    assert_eq!(code, 1, "{out}");
    let mut r: serde_json::Value = serde_json::from_str(&receipt).unwrap();
    r["entries"][0]["record"]["user_name"] = "mallory@example.com".into();
    std::fs::write(&file, r.to_string()).unwrap();
    let (code, out, _) = aegis(&["audit", "check-receipt", f, "--public-key", &vkey]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("readable record differs"), "{out}");
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut r: serde_json::Value = serde_json::from_str(&receipt).unwrap();
    let mut entry = b64
        .decode(r["entries"][0]["entry"].as_str().unwrap())
        .unwrap();
    let at = entry
        .windows(5)
        .position(|w| w == b"alice")
        .expect("user name in the entry");
    entry[at] = b'm';
    r["entries"][0]["entry"] = b64.encode(&entry).into();
    std::fs::write(&file, r.to_string()).unwrap();
    let (code, out, _) = aegis(&["audit", "check-receipt", f, "--public-key", &vkey]);
    assert_eq!(code, 1, "{out}");
    let (code, out) = reader(&["receipt", f, &vkey]);
    assert_eq!(code, 1, "{out}");
    let mut r: serde_json::Value = serde_json::from_str(&receipt).unwrap();
    r["entries"][0]["leaf_index"] = (r["entries"][0]["leaf_index"].as_u64().unwrap() + 1).into();
    std::fs::write(&file, r.to_string()).unwrap();
    let (code, out, _) = aegis(&["audit", "check-receipt", f, "--public-key", &vkey]);
    assert_eq!(code, 1, "{out}");
    // A decision that does not exist has no receipt.
    let (code, _, err) = aegis(&[
        "audit",
        "prove",
        "--config",
        &config,
        "--trace-id",
        "no-such-trace",
    ]);
    assert_eq!(code, 1, "{err}");

    // === The witness refuses a split view, even one signed with the log's own key ===
    let seed_text = std::fs::read_to_string(stack.keys_dir().join("checkpoint.key")).unwrap();
    let seed = aegis::secret::Key32::from_base64(seed_text.trim()).expect("checkpoint key");
    let insider = aegis::audit::tlog::NoteSigner::new("aegis.test/main", &seed);
    let latest = fetch_checkpoint(&url).await.expect("checkpoint");
    let (wsize, _) = size_root(&latest);
    let forged_body =
        |size: u64, root: [u8; 32]| format!("aegis.test/main\n{size}\n{}\n", b64.encode(root));
    // Positive control: the genuine latest note, resubmitted at the witness's size, is accepted.
    let (status, text) = post_witness(&witness.url, format!("old {wsize}\n\n{latest}")).await;
    assert_eq!(status, 200, "{text}");
    // Same size, another root: 422.
    let fork = insider.sign(&forged_body(wsize, [7u8; 32]));
    let (status, text) = post_witness(&witness.url, format!("old {wsize}\n\n{fork}")).await;
    assert_eq!(status, 422, "{text}");
    // A larger tree that does not extend the cosigned one (a proof that cannot verify): 422.
    let fork = insider.sign(&forged_body(wsize + 5, [9u8; 32]));
    let (status, text) = post_witness(
        &witness.url,
        format!(
            "old {wsize}\n{}\n{}\n\n{fork}",
            b64.encode([1u8; 32]),
            b64.encode([2u8; 32])
        ),
    )
    .await;
    assert_eq!(status, 422, "{text}");
    // An old size the witness did not cosign: 409 with the size it did.
    let (status, text) = post_witness(&witness.url, format!("old 1\n\n{latest}")).await;
    assert_eq!((status, text.trim()), (409, wsize.to_string().as_str()));
    // Another origin: 404. The right origin under another key: 403.
    let stranger = aegis::audit::tlog::NoteSigner::new("aegis.test/other", &seed);
    let (status, _) = post_witness(
        &witness.url,
        format!(
            "old 0\n\n{}",
            stranger.sign("aegis.test/other\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n")
        ),
    )
    .await;
    assert_eq!(status, 404);
    let impostor =
        aegis::audit::tlog::NoteSigner::new("aegis.test/main", &aegis::secret::Key32::generate());
    let (status, _) = post_witness(
        &witness.url,
        format!(
            "old {wsize}\n\n{}",
            impostor.sign(&forged_body(wsize, [0u8; 32]))
        ),
    )
    .await;
    assert_eq!(status, 403);

    // `aegis audit verify`: intact, every note consistent.
    let (code, out, err) = aegis(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("transparency log:") && out.contains("consistent"),
        "{out}"
    );

    // === Tampering, seen from public data alone (the reader holds the trusted checkpoint) ===
    // Freeze appends so the served tree stays the trusted one.
    stack.aegis.terminate(Duration::from_secs(10)).await;
    let latest = fetch_checkpoint(&url).await;
    assert!(
        latest.is_none(),
        "the log is served by aegis; it is down now"
    );
    // Serve the log from this process (the same read-only router, no aegis process).
    let target =
        aegis::pg::PgTarget::parse(stack.config()["postgres"]["url"].as_str().unwrap()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let served = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        async move { axum::serve(listener, aegis::ledger::app(target, "main".into())).await },
    );
    let trusted = [trusted_size.to_string(), trusted_root.clone()];
    let check = |label: &'static str| {
        let served = served.clone();
        let (vkey, trusted) = (vkey.clone(), trusted.clone());
        move || {
            let (code, out) = reader(&[
                "check",
                &served,
                &vkey,
                "--trusted",
                &trusted[0],
                &trusted[1],
            ]);
            (code, out, label)
        }
    };
    let (code, out, _) = check("untouched")();
    assert_eq!(code, 0, "positive control: {out}");
    let n = trusted_size;
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "a modified row",
            "UPDATE aegis_audit SET user_name = 'mallory@example.com' WHERE seq = 3".into(),
            "UPDATE aegis_audit SET user_name = (SELECT user_name FROM saved WHERE saved.seq = 3) WHERE seq = 3".into(),
            "do not hash to the checkpoint's root",
        ),
        (
            "a deleted row",
            "DELETE FROM aegis_audit WHERE seq = 3".into(),
            "INSERT INTO aegis_audit SELECT * FROM saved WHERE seq = 3".into(),
            "entry bundle 0",
        ),
        (
            "two rows reordered",
            "UPDATE aegis_audit SET seq = 1000003 WHERE seq = 3; UPDATE aegis_audit SET seq = 3 WHERE seq = 4; UPDATE aegis_audit SET seq = 4 WHERE seq = 1000003".into(),
            "DELETE FROM aegis_audit; INSERT INTO aegis_audit SELECT * FROM saved".into(),
            "do not hash to the checkpoint's root",
        ),
        (
            "an inserted row",
            format!(
                "UPDATE aegis_audit SET seq = seq + 1000000 WHERE seq >= 3; \
                 UPDATE aegis_audit SET seq = seq - 999999 WHERE seq > 1000000; \
                 CREATE TEMP TABLE extra AS SELECT * FROM saved WHERE seq = {n}; \
                 UPDATE extra SET seq = 3; INSERT INTO aegis_audit SELECT * FROM extra; \
                 DROP TABLE extra"
            ),
            "DELETE FROM aegis_audit; INSERT INTO aegis_audit SELECT * FROM saved".into(),
            "do not hash to the checkpoint's root",
        ),
        (
            "a tile rewritten",
            "UPDATE aegis_tlog_tiles SET hashes = overlay(hashes placing '\\x00000000'::bytea from 65 for 4) WHERE level = 0 AND idx = 0 AND strip = 0".into(),
            "DELETE FROM aegis_tlog_tiles; INSERT INTO aegis_tlog_tiles SELECT * FROM saved_tiles".into(),
            "tile 0/0 is not the entries' tree",
        ),
        (
            "a truncated tail",
            format!("DELETE FROM aegis_audit WHERE seq > {}", n - 2),
            "DELETE FROM aegis_audit; INSERT INTO aegis_audit SELECT * FROM saved".into(),
            "entry bundle 0",
        ),
        (
            "a database rolled back to an earlier checkpoint",
            format!("DELETE FROM aegis_tlog_checkpoints WHERE size >= {n}"),
            "DELETE FROM aegis_tlog_checkpoints; INSERT INTO aegis_tlog_checkpoints SELECT * FROM saved_notes".into(),
            "rolled back",
        ),
    ];
    tamper(
        &stack,
        "CREATE TABLE saved AS SELECT * FROM aegis_audit; \
         CREATE TABLE saved_tiles AS SELECT * FROM aegis_tlog_tiles; \
         CREATE TABLE saved_notes AS SELECT * FROM aegis_tlog_checkpoints",
    )
    .await;
    let notes: Vec<serde_json::Value> = stack
        .postgres
        .query_json("SELECT size FROM aegis_tlog_checkpoints ORDER BY size")
        .await
        .unwrap();
    assert!(
        notes.len() >= 2,
        "the rollback case needs an earlier checkpoint: {notes:?}"
    );
    for (label, attack, undo, why) in cases {
        tamper(&stack, &attack).await;
        let (code, out, _) = check(label)();
        assert_eq!(code, 1, "{label} was not caught: {out}");
        let problem = out["problem"].as_str().unwrap_or_default();
        assert!(
            problem.contains(why),
            "{label}: caught for another reason: {out}"
        );
        tamper(&stack, &undo).await;
        let (code, out, _) = check(label)();
        assert_eq!(code, 0, "after undoing {label}: {out}");
    }

    // And `aegis audit verify` sees a tile rewritten under intact rows.
    tamper(&stack, "UPDATE aegis_tlog_tiles SET hashes = overlay(hashes placing '\\x00000000'::bytea from 1 for 4) WHERE level = 0 AND idx = 0 AND strip = 0").await;
    let (code, out, _) = aegis(&["audit", "verify", "--config", &config, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (code, report["problem"].as_str()),
        (1, Some("tree_mismatch")),
        "{out}"
    );
    tamper(
        &stack,
        "DELETE FROM aegis_tlog_tiles; INSERT INTO aegis_tlog_tiles SELECT * FROM saved_tiles",
    )
    .await;
    let (code, out, err) = aegis(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");

    // A chain from before the transparency log: no tiles, tree_size 0. The writer builds them
    // before serving, and the result is the same tree.
    tamper(
        &stack,
        "DELETE FROM aegis_tlog_tiles; UPDATE aegis_chain_head SET tree_size = 0",
    )
    .await;
    stack.aegis.restart().await.expect("aegis restarts");
    let r = get(&stack, ME, Some(&alice)).await;
    assert_eq!(r.status, 200, "serving after the catch-up");
    let (code, out, err) = aegis(&["audit", "verify", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");

    stack.shutdown().await;
}
