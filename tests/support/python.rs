//! Runs the official Python clients (scripts in tests/python/, from the repo's .venv, which
//! `scripts/bootstrap.sh` creates); each script prints one JSON document.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

pub const PYTHON_TIMEOUT: Duration = Duration::from_secs(180);

pub fn python() -> PathBuf {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        py.is_file(),
        "{} is missing: run scripts/bootstrap.sh (make setup)",
        py.display()
    );
    py
}

pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Runs a test client script; its stdout is one JSON document.
pub async fn run_python(name: &str, args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(script(name))
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(PYTHON_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within {PYTHON_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("could not run {name}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} {args:?} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{name} printed no JSON ({e}):\n{stdout}\n{stderr}"))
}

/// The `rows` of a client's JSON answer, each cell as text (`NULL` for null).
pub fn rows_of(v: &Value) -> Vec<Vec<String>> {
    v["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows in {v:#}"))
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|c| c.as_str().unwrap_or("NULL").to_string())
                .collect()
        })
        .collect()
}
