//! The fuzz targets' invariants (fuzz/checks.rs), run in-process on the stable toolchain as part
//! of `make test`: seeds plus random mutations, a few seconds per target. Coverage-guided runs
//! are `make fuzz` (cargo fuzz, libFuzzer); this smoke run keeps the invariants exercised on
//! every test run without the sanitizer build.

use std::time::Instant;

use rand::Rng;

include!("../fuzz/checks.rs");
include!("../fuzz/sql_check.rs");

/// Per target.
const BUDGET: Duration = Duration::from_secs(3);
const MAX_ITERATIONS: usize = 200_000;

/// Fragments a mutation splices in: the shapes the parsers care about.
const DICT: &[&[u8]] = &[
    b"%",
    b"%2e",
    b"%2f",
    b"%25",
    b"%3f",
    b"%23",
    b"..",
    b"/",
    b"\\",
    b";",
    b"?",
    b"#",
    b".",
    b"Bearer ",
    b"bearer",
    b",",
    b"\n",
    b"\r",
    b"\0",
    b"aegis-trace/",
    b"aegis/",
    b"x-aegis-",
    b"authorization:",
    b"user-agent:",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b"\"alg\"",
    b"\"none\"",
    b"\"RS256\"",
    b"\"kid\"",
    b"null",
    b"\"exp\"",
    b"1e999",
    b"-0",
    b"\xff",
    b"\xc3",
    b"[[[[[[[[",
    b"\"crit\"",
    b"\"jku\"",
    b"[server]",
    b"[[issuers]]",
    b"=",
    b"${",
    b"$$",
    b"\"\"\"",
    b"'''",
    b"'",
    b"`",
    b"--",
    b"/*",
    b"*/",
    b"/*+",
    b"\\'",
    b"\\\n",
    b"$a$",
    b"GRANT ",
    b"\xc2\xa0",
];

fn mutate(rng: &mut impl Rng, input: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..6) {
        let at = if input.is_empty() {
            0
        } else {
            rng.random_range(0..=input.len())
        };
        match rng.random_range(0..5) {
            0 if !input.is_empty() => {
                let i = rng.random_range(0..input.len());
                input[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !input.is_empty() => {
                let end = rng.random_range(at..=input.len());
                input.drain(at..end.min(at + 16));
            }
            2 => {
                let d = DICT[rng.random_range(0..DICT.len())];
                input.splice(at..at, d.iter().copied());
            }
            3 => input.insert(at, rng.random()),
            _ if !input.is_empty() => {
                // Repeat a slice: depth and length.
                let start = rng.random_range(0..input.len());
                let end = (start + rng.random_range(1..32)).min(input.len());
                let chunk: Vec<u8> = input[start..end].to_vec();
                for _ in 0..rng.random_range(1..64) {
                    input.splice(at..at, chunk.iter().copied());
                }
            }
            _ => input.push(rng.random()),
        }
    }
    input.truncate(20_000);
}

fn seeds(target: &str, extra: &[&[u8]]) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    out.extend(extra.iter().map(|s| s.to_vec()));
    assert!(!out.is_empty(), "no seeds for {target}");
    out
}

/// Runs `check` on every seed, then on mutations of them, within the budget. Returns the count.
fn run(target: &str, extra: &[&[u8]], mut check: impl FnMut(&[u8])) -> usize {
    let seeds = seeds(target, extra);
    for s in &seeds {
        check(s);
    }
    let mut rng = rand::rng();
    let start = Instant::now();
    let mut n = seeds.len();
    while start.elapsed() < BUDGET && n < MAX_ITERATIONS {
        let mut input = seeds[rng.random_range(0..seeds.len())].clone();
        mutate(&mut rng, &mut input);
        check(&input);
        n += 1;
    }
    eprintln!("{target}: {n} inputs");
    n
}

#[test]
fn fuzz_smoke_headers() {
    let n = run(
        "bearer_token",
        &[
            b"authorization: Bearer a.b.c",
            b"user-agent: a aegis/1 aegis-trace/x b\x01c",
            b"user-agent: x(aegis-trace/x) foo;AEGIS/1 aegisaegis/1/2",
        ],
        check_headers,
    );
    assert!(n > 100);
}

#[test]
fn fuzz_smoke_paths() {
    let n = run(
        "normalize_path",
        &[
            b"/api/2.0/token%253fcreate",
            b"//a/./b/../c;x?y#z",
            b"/%2e%2e/%252e",
        ],
        check_path,
    );
    assert!(n > 100);
}

#[test]
fn fuzz_smoke_config() {
    let n = run(
        "config_parse",
        &[b"[server]\ngrpc_listen = \"127.0.0.1:1\"\n"],
        check_config,
    );
    assert!(n > 100);
}

#[test]
fn fuzz_smoke_tokens() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let validator = fuzz_validator(&rt);
    let n = run(
        "validate_token",
        &[
            b"\x01{\"alg\":\"RS256\",\"kid\":\"k\"}\xff{\"iss\":\"https://idp.example\",\"exp\":9999999999,\"aud\":\"aegis\",\"email\":\"a\"}\xffsig",
            b"\x01{\"alg\":\"none\"}\xff{\"iss\":\"https://idp.example\"}\xff",
            b"\x00eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
        ],
        |d| check_token(&rt, &validator, d),
    );
    assert!(n > 100);
}

#[test]
fn fuzz_smoke_sql() {
    let n = run(
        "sql_classify",
        &[
            b"SELECT 1; GRANT SELECT ON t TO x",
            b"SELECT 'a\\'b' -- c\r\n/* d /* e */ */ `f``g`",
            b"CREATE STORAGE CREDENTIAL c; SELECT 1.5e3, 0x1F, a != b",
        ],
        check_sql,
    );
    assert!(n > 100);
}
