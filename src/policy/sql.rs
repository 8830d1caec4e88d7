//! What a SQL text does, as far as an agent guardrail needs to know: the statements' kinds, and
//! whether any of them changes permissions (or cannot be told apart from one that does).
//!
//! The text is tokenized the way Databricks reads it (nested `/* */` comments, `--` comments,
//! backquoted identifiers, string literals) by a purpose-built lexer ([`lex`]) that splits
//! exactly where sqlparser's tokenizer (Databricks dialect) does, split at top-level `;`, and each
//! statement is judged by its leading keywords. That is deliberately not a full parse:
//! Databricks SQL grows faster than any parser, and a guardrail that refused every query it
//! could not parse would be switched off. The rule is an allowlist instead: a statement must
//! start with a known keyword, spelled in ASCII; anything else (a look-alike letter, a quoted
//! first word, text that does not tokenize) is `unknown` and blocked for agents.
//!
//! Blocked: `GRANT`, `REVOKE`, `DENY`; ownership changes (`OWNER` in an `ALTER`); row filter and
//! column mask changes (`ROW FILTER` or `MASK` in DDL); `CREATE`/`ALTER`/`DROP` of credentials,
//! storage credentials, external locations, connections, shares, recipients and providers;
//! `EXECUTE IMMEDIATE` (SQL built at run time cannot be judged); anything unknown; and text that
//! Databricks may tokenize otherwise than this lexer does ([`lex::Hazard`]: a backslash before a
//! literal's own quote, a lone `\r` or a trailing backslash in a `--` comment, hints holding
//! more than names, dollar quotes, `${`, non-ASCII outside literals and comments, NUL).
//!
//! Until December 2026 the classifier ran on sqlparser's tokenizer, at ~0.16 ms per 4 KB
//! statement on aegis' single worker thread. The lexer gives the same verdicts and the same
//! fingerprints (audit rows hold them) on every text, except that the hazards above are blocked
//! where sqlparser let them pass; the differential tests (src/policy/sql/reference.rs, the old
//! classifier kept as the reference, tests/fuzz_smoke.rs and the cargo-fuzz target
//! `sql_classify`) hold it to that.

pub mod lex;

pub use lex::Hazard;
use lex::{Kind, Tok};
use sha2::{Digest, Sha256};

/// What kind of statement (the most privileged kind when a text holds several).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StatementKind {
    Query,
    Dml,
    Ddl,
    Dcl,
    Unknown,
}

impl StatementKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Query => "query",
            StatementKind::Dml => "dml",
            StatementKind::Ddl => "ddl",
            StatementKind::Dcl => "dcl",
            StatementKind::Unknown => "unknown",
        }
    }
}

/// The verdict on a SQL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub kind: StatementKind,
    /// Why an agent may not run it; `None` when it may.
    pub blocked: Option<&'static str>,
    /// SHA-256 of the normalized text: its tokens without comments and whitespace, keywords
    /// upper-cased, one space apart. The same statement spelled otherwise has the same one.
    pub fingerprint: [u8; 32],
}

pub const CHANGES_PERMISSIONS: &str = "changes permissions";
pub const CHANGES_OWNER: &str = "changes an owner";
pub const CHANGES_FILTER_OR_MASK: &str = "changes a row filter or a column mask";
pub const CHANGES_SECURABLE: &str =
    "changes a credential, external location, connection, share, recipient or provider";
pub const DYNAMIC_SQL: &str = "runs SQL built at run time";
pub const UNRECOGNIZED: &str = "is not a statement aegis recognizes";
pub const UNREADABLE: &str = "cannot be read as SQL";
/// A [`Hazard`]: Databricks may read the text otherwise than aegis does.
pub const AMBIGUOUS: &str = "may be read otherwise by Databricks";

/// Words that may stand between CREATE/ALTER/DROP and the object type.
pub const TYPE_MODIFIERS: &[&str] = &[
    "OR",
    "REPLACE",
    "TEMPORARY",
    "TEMP",
    "EXTERNAL",
    "STORAGE",
    "SERVICE",
    "IF",
    "NOT",
    "EXISTS",
    "GLOBAL",
    "MANAGED",
    "STREAMING",
    "LIVE",
    "MATERIALIZED",
    "FOREIGN",
];

/// Object types an agent may not create, change or drop.
pub const GUARDED_TYPES: &[&str] = &[
    "CREDENTIAL",
    "CREDENTIALS",
    "LOCATION",
    "CONNECTION",
    "SHARE",
    "RECIPIENT",
    "PROVIDER",
];

/// Classifies a SQL text (one or more statements).
pub fn classify(sql: &str) -> Classified {
    classify_explained(sql).0
}

/// [`classify`], and the lexical hazard that made it stricter than sqlparser would be, if one
/// did (see [`lex`]). For the differential tests and the fuzz target.
#[doc(hidden)]
pub fn classify_explained(sql: &str) -> (Classified, Option<Hazard>) {
    let mut lexer = lex::Lexer::new(sql);
    let mut fp = Fingerprint::new();
    let mut worst = Classified {
        kind: StatementKind::Query,
        blocked: None,
        fingerprint: [0u8; 32],
    };
    let mut statement = Statement::default();
    loop {
        let token = match lexer.next_token() {
            Ok(Some(t)) => t,
            Ok(None) => break,
            Err(lex::Unreadable) => {
                return (
                    Classified {
                        kind: StatementKind::Unknown,
                        blocked: Some(UNREADABLE),
                        fingerprint: Sha256::digest(sql.as_bytes()).into(),
                    },
                    None,
                )
            }
        };
        fp.token(sql, &token);
        if token.kind == Kind::SemiColon {
            statement.finish(&mut worst);
            statement = Statement::default();
        } else {
            statement.push(sql, &token);
        }
    }
    statement.finish(&mut worst);
    worst.fingerprint = fp.finish();
    match lexer.hazard {
        Some(h) if worst.blocked.is_none() => {
            worst.kind = StatementKind::Unknown;
            worst.blocked = Some(AMBIGUOUS);
            (worst, Some(h))
        }
        _ => (worst, None),
    }
}

/// The normalized text, streamed into SHA-256 through a small buffer: each token as sqlparser
/// displays it (unquoted ASCII words upper-cased), one space apart.
struct Fingerprint {
    hash: Sha256,
    buf: [u8; 256],
    len: usize,
    first: bool,
}

impl Fingerprint {
    fn new() -> Self {
        Fingerprint {
            hash: Sha256::new(),
            buf: [0u8; 256],
            len: 0,
            first: true,
        }
    }

    fn byte(&mut self, b: u8) {
        if self.len == self.buf.len() {
            self.hash.update(self.buf);
            self.len = 0;
        }
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn bytes(&mut self, bytes: &[u8]) {
        if bytes.len() > self.buf.len() - self.len {
            self.hash.update(&self.buf[..self.len]);
            self.len = 0;
            if bytes.len() > self.buf.len() {
                self.hash.update(bytes);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// `bytes`, ASCII upper-cased.
    fn upper(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.len == self.buf.len() {
                self.hash.update(self.buf);
                self.len = 0;
            }
            let n = bytes.len().min(self.buf.len() - self.len);
            let to = &mut self.buf[self.len..self.len + n];
            to.copy_from_slice(&bytes[..n]);
            to.make_ascii_uppercase();
            self.len += n;
            bytes = &bytes[n..];
        }
    }

    fn token(&mut self, sql: &str, t: &Tok) {
        if !self.first {
            self.byte(b' ');
        }
        self.first = false;
        let raw = &sql.as_bytes()[t.start..t.end];
        match t.kind {
            Kind::Word if is_plain_word(raw) => self.upper(raw),
            Kind::Str { quote, prefix } => {
                // sqlparser shows the unescaped value between the quotes, prefix upper-cased.
                let open = match prefix {
                    Some(p) => {
                        self.byte(p);
                        1
                    }
                    None => 0,
                };
                self.byte(quote);
                let inner = &raw[open + 1..raw.len() - 1];
                let mut i = 0;
                while i < inner.len() {
                    let c = inner[i];
                    if c == quote {
                        // A doubled quote (a lone one cannot be inside).
                        self.byte(quote);
                        i += 2;
                    } else if c == b'\\' {
                        self.byte(match inner[i + 1] {
                            b'0' => 0,
                            b'a' => 7,
                            b'b' => 8,
                            b'f' => 0x0c,
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'Z' => 0x1a,
                            other => other,
                        });
                        i += 2;
                    } else {
                        self.byte(c);
                        i += 1;
                    }
                }
                self.byte(quote);
            }
            Kind::QuotedIdent => self.quoted_ident(&raw[1..raw.len() - 1]),
            Kind::HexNumber => {
                self.bytes(b"X'");
                self.bytes(&raw[2..]);
                self.byte(b'\'');
            }
            Kind::BangEq => self.bytes(b"<>"),
            _ => self.bytes(raw),
        }
    }

    /// A backquoted identifier as sqlparser displays it: the value (a doubled backquote in the
    /// text is one in the value), each backquote of it doubled unless it is the first of a pair
    /// (then the pair stays) or follows a backslash (then it stays single).
    fn quoted_ident(&mut self, inner: &[u8]) {
        // The value's byte at `pos` of `inner`, and where the next one starts.
        let value_at = |pos: usize| -> Option<(u8, usize)> {
            inner
                .get(pos)
                .map(|&c| (c, if c == b'`' { pos + 2 } else { pos + 1 }))
        };
        self.byte(b'`');
        let mut pos = 0;
        let mut prev = 0u8;
        while let Some((c, next)) = value_at(pos) {
            if c != b'`' {
                self.byte(c);
                prev = c;
                pos = next;
            } else if prev == b'\\' {
                self.byte(c);
                pos = next;
            } else {
                self.bytes(b"``");
                prev = c;
                pos = match value_at(next) {
                    Some((b'`', after)) => after,
                    _ => next,
                };
            }
        }
        self.byte(b'`');
    }

    fn finish(mut self) -> [u8; 32] {
        self.hash.update(&self.buf[..self.len]);
        self.hash.finalize().into()
    }
}

/// An unquoted word the rules read: ASCII letters, digits and `_` only (compared ignoring ASCII
/// case). A numeric-prefix word such as `1.5e` is not one.
fn is_plain_word(w: &[u8]) -> bool {
    !w.is_empty() && w.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_')
}

fn one_of(w: &str, list: &[&str]) -> bool {
    list.iter().any(|x| w.eq_ignore_ascii_case(x))
}

/// What the rules need of one statement (the tokens between two top-level `;`), gathered token
/// by token.
#[derive(Default)]
struct Statement<'a> {
    tokens: usize,
    /// The first token: `(`, a plain word, or something else (`None` with `tokens > 0`).
    first: Option<&'a str>,
    immediate: bool,
    owner: bool,
    mask: bool,
    row_filter: bool,
    /// The previous token was the plain word `ROW`.
    after_row: bool,
    /// The first plain word after the first token that is not a type modifier.
    object: Option<&'a str>,
    /// A plain word `ON` was seen; the first plain word after it.
    seen_on: bool,
    after_on: Option<&'a str>,
}

impl<'a> Statement<'a> {
    fn push(&mut self, sql: &'a str, t: &Tok) {
        let text = &sql[t.start..t.end];
        let word = (t.kind == Kind::Word && is_plain_word(text.as_bytes())).then_some(text);
        if self.tokens == 0 {
            self.first = match (t.kind, word) {
                (Kind::LParen, _) => Some("("),
                (_, w) => w,
            };
        }
        self.tokens += 1;
        let Some(w) = word else {
            self.after_row = false;
            return;
        };
        let is = |want: &str| w.eq_ignore_ascii_case(want);
        self.immediate |= is("IMMEDIATE");
        self.owner |= is("OWNER");
        self.mask |= is("MASK");
        self.row_filter |= self.after_row && is("FILTER");
        self.after_row = is("ROW");
        if self.tokens > 1 && self.object.is_none() && !one_of(w, TYPE_MODIFIERS) {
            self.object = Some(w);
        }
        if self.seen_on {
            if self.after_on.is_none() {
                self.after_on = Some(w);
            }
        } else if is("ON") {
            self.seen_on = true;
        }
    }

    /// Folds the statement's verdict into `worst` (the most privileged kind, the first reason to
    /// block). An empty statement (only comments and whitespace) runs nothing.
    fn finish(&self, worst: &mut Classified) {
        if self.tokens == 0 {
            return;
        }
        let (kind, blocked) = self.verdict();
        if blocked.is_some() && worst.blocked.is_none() {
            worst.blocked = blocked;
        }
        worst.kind = worst.kind.max(kind);
    }

    fn verdict(&self) -> (StatementKind, Option<&'static str>) {
        use StatementKind::*;
        if self.immediate {
            return (Unknown, Some(DYNAMIC_SQL));
        }
        let Some(first) = self.first else {
            return (Unknown, Some(UNRECOGNIZED));
        };
        let f = |want: &str| first.eq_ignore_ascii_case(want);
        let any = |list: &[&str]| list.iter().any(|w| f(w));
        let kind = if any(&["GRANT", "REVOKE", "DENY"]) {
            return (Dcl, Some(CHANGES_PERMISSIONS));
        } else if any(&[
            "SELECT", "WITH", "VALUES", "FROM", "TABLE", "(", "SHOW", "DESCRIBE", "DESC",
            "EXPLAIN", "LIST",
        ]) {
            Query
        } else if any(&["INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "TRUNCATE"]) {
            Dml
        } else if any(&[
            "CREATE", "ALTER", "DROP", "REPLACE", "COMMENT", "OPTIMIZE", "VACUUM", "ANALYZE",
            "REFRESH", "CACHE", "UNCACHE", "CLEAR", "MSCK", "RESTORE", "CONVERT", "USE", "SET",
            "RESET", "DECLARE",
        ]) {
            Ddl
        } else {
            return (Unknown, Some(UNRECOGNIZED));
        };
        if kind != Ddl {
            return (kind, None);
        }
        if f("ALTER") && self.owner {
            return (Dcl, Some(CHANGES_OWNER));
        }
        let changes = any(&["CREATE", "ALTER", "DROP", "REPLACE"]);
        if changes && (self.row_filter || self.mask) {
            return (Dcl, Some(CHANGES_FILTER_OR_MASK));
        }
        if changes || f("COMMENT") {
            if self.object.is_some_and(|o| one_of(o, GUARDED_TYPES)) {
                return (Dcl, Some(CHANGES_SECURABLE));
            }
            // COMMENT ON <type> ...: judge the type after ON.
            if f("COMMENT")
                && self.object.is_some_and(|o| o.eq_ignore_ascii_case("ON"))
                && self.after_on.is_some_and(|o| one_of(o, GUARDED_TYPES))
            {
                return (Dcl, Some(CHANGES_SECURABLE));
            }
        }
        (kind, None)
    }
}

/// The sqlparser-based classifier this one replaced: the reference of the differential tests.
#[cfg(test)]
pub(crate) mod reference {
    use super::*;
    include!("sql/reference.rs");
}

/// The SQL corpus of the integration tests (permission changes, ordinary SQL).
#[cfg(test)]
#[path = "../../tests/support/sql_corpus.rs"]
mod sql_corpus;

#[cfg(test)]
mod tests {
    use super::reference::{check_against_reference, classify_reference};
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn permission_changes_are_blocked_and_queries_are_not() {
        for sql in [
            "GRANT SELECT ON TABLE t TO `bob`",
            "select 1; grant all privileges on catalog main to `account users`",
            "/* nested /* */ SELECT 1 */ GRANT USE CATALOG ON CATALOG main TO x",
            "ALTER TABLE t OWNER TO `mallory`",
            "ALTER TABLE t SET ROW FILTER f ON (c)",
            "ALTER TABLE t ALTER COLUMN c SET MASK m",
            "CREATE STORAGE CREDENTIAL c WITH (AWS_IAM_ROLE = 'x')",
            "DROP EXTERNAL LOCATION l",
            "EXECUTE IMMEDIATE 'GR' || 'ANT ALL ON t TO x'",
            "ＧＲＡＮＴ SELECT ON t TO x",
            "`GRANT` SELECT ON t TO x",
            "SELECT 'unterminated",
        ] {
            assert!(classify(sql).blocked.is_some(), "not blocked: {sql}");
        }
        for sql in [
            "SELECT * FROM t WHERE c = 'GRANT ALL'",
            "-- GRANT\nSELECT 1",
            "WITH x AS (SELECT 1) SELECT * FROM x QUALIFY row_number() OVER (ORDER BY 1) = 1",
            "SELECT transform(array(1, 2), x -> x + 1), :p",
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET *",
            "CREATE TABLE t AS SELECT 1 AS mask_id",
            "",
        ] {
            assert_eq!(classify(sql).blocked, None, "blocked: {sql}");
        }
        assert_eq!(classify("SELECT 1; DELETE FROM t").kind, StatementKind::Dml);
        // One fingerprint however it is spelled; another statement, another one.
        let fp = |s: &str| classify(s).fingerprint;
        assert_eq!(
            fp("select *  from t -- note\n"),
            fp("SELECT * /* x */ FROM t")
        );
        assert_ne!(fp("SELECT * FROM t"), fp("SELECT * FROM u"));
    }

    /// The unit-test strings above, and spellings that stress the lexer's agreement with
    /// sqlparser: numbers, operators, quoting, comments.
    const TRICKY: &[&str] = &[
        "GRANT SELECT ON TABLE t TO `bob`",
        "select 1; grant all privileges on catalog main to `account users`",
        "/* nested /* */ SELECT 1 */ GRANT USE CATALOG ON CATALOG main TO x",
        "ALTER TABLE t OWNER TO `mallory`",
        "ALTER TABLE t SET ROW FILTER f ON (c)",
        "ALTER TABLE t ALTER COLUMN c SET MASK m",
        "CREATE STORAGE CREDENTIAL c WITH (AWS_IAM_ROLE = 'x')",
        "DROP EXTERNAL LOCATION l",
        "EXECUTE IMMEDIATE 'GR' || 'ANT ALL ON t TO x'",
        "`GRANT` SELECT ON t TO x",
        "SELECT 'unterminated",
        "SELECT * FROM t WHERE c = 'GRANT ALL'",
        "-- GRANT\nSELECT 1",
        "WITH x AS (SELECT 1) SELECT * FROM x QUALIFY row_number() OVER (ORDER BY 1) = 1",
        "SELECT transform(array(1, 2), x -> x + 1), :p",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET *",
        "CREATE TABLE t AS SELECT 1 AS mask_id",
        "",
        "   \n\t ",
        "-- only a comment",
        "/* only */ /* comments */;;",
        "select *  from t -- note\n",
        "SELECT * /* x */ FROM t",
        "SELECT 1, 1.5, .5, 1., 1e5, 1E+5, 1e-5, 1.5e3, 1e, 1ea, 1e5L, 1e5x, 2L, 0x1F, 0x, 0X1F, 00x1",
        "SELECT 1a, 1.5abc, 123_abc, t.1, t.1e5, t.1.2, t .5, t._a, (1)._a, `t`._a, t. _a",
        "SELECT ._a",
        "SELECT a._",
        "SELECT 1 ._a",
        "SELECT a != b, a <> b, a <=> b, a <= b, a >= b, a << b, a >> b, a <@ b, a @> b, a <+ b, a <-b, a <=- b",
        "SELECT a || b, a ||/ b, |/ a, a |> b, a | b, a & b, a && b, a ^ b, a ^@ b, ~a, a ~* b",
        "SELECT a !~ b, a !~* b, !!a, !a, a == b, a => b, a := b, a::int, a:b, a % b, a%b, 5 %\u{a0}2",
        "SELECT a #- b, a #> b, a #>> b, a # b, a#b, a @? b, @@ a, a @@b, @a, @'x', a -> b, a ->> b",
        "SELECT ?, ?1, ?12a, $1, $name, $, $ a, \\, [1], {a}, a.b.c, a..b",
        "SELECT $$GRANT$$, $tag$x$tag$, $a$$a$, $$$$, $$a$b$$, $a$ $b$ $a$",
        "SELECT $$unterminated",
        "SELECT $a$unterminated",
        "SELECT 'it''s', 'a\\nb', 'a\\tb\\0\\a\\b\\f\\r\\Z\\q\\\\', '\\\\', 'x\\\"y'",
        "SELECT \"dq\", \"d\"\"q\", \"d\\tq\", N'nat', n'nat', X'1F', x'1f', N, X, n1, xyz",
        "SELECT `a``b`, `a````b`, `a\\`, `a\\``b`, `\\``, ``, `a b`, `é`",
        "SELECT `unterminated",
        "SELECT \"unterminated",
        "SELECT 'unterminated\\",
        "/* unterminated",
        "/* a /* b */ c",
        "/*/ a */ SELECT 1",
        "/**/SELECT/**/1/***/",
        "SELECT 1 --",
        "SELECT 1 -- a\r\nSELECT 2",
        "SELECT 1\r\n;\rGRANT x",
        "SELECT 1 /*+ BROADCAST(t), REPARTITION(10, c) */",
        "SELECT 1; ; GRANT x; -- done",
        "COMMENT ON CONNECTION c IS 'x'",
        "COMMENT ON TABLE t IS 'x'",
        "COMMENT ON ON SHARE",
        "COMMENT ON x ON SHARE",
        "CREATE OR REPLACE TEMPORARY VIEW v AS SELECT 1",
        "CREATE IF NOT EXISTS SHARE s",
        "CREATE `SHARE` s",
        "CREATE 1.5 SHARE",
        "ALTER TABLE t SET ROW /* c */ FILTER f ON (c)",
        "ALTER TABLE t SET ROW, FILTER",
        "DROP TABLE t.mask",
        "(SELECT 1)",
        "((GRANT))",
        "VALUES 1; EXECUTE x",
        "SET x = 1; RESET; USE main",
        "select 1;select 2;delete from t",
        "\u{feff}SELECT 1",
    ];

    #[test]
    fn agrees_with_sqlparser_on_the_corpus_and_tricky_spellings() {
        let mut stricter = 0;
        for sql in sql_corpus::PERMISSION_CHANGES
            .iter()
            .chain(sql_corpus::ORDINARY_SQL)
            .chain(TRICKY)
        {
            stricter += usize::from(check_against_reference(sql).is_some());
        }
        // Tokens longer than the fingerprint's buffer, and texts many times longer.
        let long = [
            format!("SELECT {} FROM t", "a_b".repeat(300)),
            format!(
                "SELECT '{}', `{}`",
                "x''y\\n".repeat(200),
                "q``".repeat(200)
            ),
            format!("SELECT {}1", "coalesce(a.b, 'c') AS d, ".repeat(200)),
            format!("{}GRANT x", "SELECT 1; -- c\n".repeat(100)),
        ];
        for sql in &long {
            check_against_reference(sql);
        }
        // The corpus and most spellings are read alike; a few carry a hazard by design.
        assert!(stricter <= 6, "{stricter} stricter verdicts");
        for sql in sql_corpus::PERMISSION_CHANGES {
            assert!(classify(sql).blocked.is_some(), "not blocked: {sql}");
        }
        for sql in sql_corpus::ORDINARY_SQL {
            assert_eq!(classify(sql).blocked, None, "blocked: {sql}");
        }
    }

    /// Every deliberate difference: the reference lets the text pass, `classify` blocks it as
    /// `unknown` for the hazard named; the control next to it, without the hazard, passes both.
    #[test]
    fn hazards_are_blocked_where_sqlparser_let_them_pass() {
        let cases: &[(&str, Hazard, &str)] = &[
            // A raw string (or escapedStringLiterals): the GRANT is SQL to Databricks.
            (
                "SELECT r'\\'; GRANT ALL PRIVILEGES ON CATALOG main TO x; --'",
                Hazard::BackslashQuote,
                "SELECT r'\\\\'; SELECT 'GRANT ALL PRIVILEGES ON CATALOG main TO x; --'",
            ),
            (
                "SELECT \"\\\"; GRANT ALL ON t TO x; --\"",
                Hazard::BackslashQuote,
                "SELECT \"\\\\\", '\\\"'",
            ),
            (
                "SELECT 1 -- note\rGRANT ALL PRIVILEGES ON CATALOG main TO x",
                Hazard::CommentCarriageReturn,
                "SELECT 1 -- note\r\nSELECT 2\r",
            ),
            (
                "SELECT 1 -- note \\\n'\n; GRANT ALL ON t TO x; -- '",
                Hazard::CommentContinuation,
                "SELECT 1 -- note \\ x\n'\n; GRANT ALL ON t TO x; -- '",
            ),
            (
                "SELECT /*+ ' */ 1 '; GRANT ALL ON t TO x; -- '",
                Hazard::Hint,
                "SELECT /*+ BROADCAST(t), COALESCE(3) */ 1",
            ),
            (
                "/* outer /*+ */ GRANT ALL ON t TO x */ SELECT 1",
                Hazard::Hint,
                "/* outer /* */ GRANT ALL ON t TO x */ SELECT 1",
            ),
            (
                "SELECT $$ ; GRANT ALL ON t TO x; $$",
                Hazard::DollarQuote,
                "SELECT $1, $name",
            ),
            (
                "SELECT $t$ ; GRANT ALL ON t TO x; $t$",
                Hazard::DollarQuote,
                "SELECT $t, t$",
            ),
            (
                "SELECT '${grant_it}'",
                Hazard::VariableSubstitution,
                "SELECT '$', '{grant_it}'",
            ),
            (
                "SELECT\u{a0}1",
                Hazard::NonAscii,
                "SELECT 'é', `é` -- é\n/* é */",
            ),
            ("SELECT 1 ＧＲＡＮＴ", Hazard::NonAscii, "SELECT 1"),
            ("SELECT ?\u{663}", Hazard::NonAscii, "SELECT ?3"),
            ("SELECT 'a\0b'", Hazard::Nul, "SELECT 'a\\0b'"),
            ("-- x\0", Hazard::Nul, "-- x"),
        ];
        for &(sql, hazard, control) in cases {
            assert_eq!(classify_reference(sql).blocked, None, "reference: {sql:?}");
            let (c, h) = classify_explained(sql);
            assert_eq!(h, Some(hazard), "{sql:?}");
            assert_eq!(c.kind, StatementKind::Unknown, "{sql:?}");
            assert_eq!(c.blocked, Some(AMBIGUOUS), "{sql:?}");
            assert_eq!(check_against_reference(sql), Some(hazard));
            // The control: no hazard, and both classifiers let it pass.
            assert_eq!(check_against_reference(control), None, "{control:?}");
            assert_eq!(classify(control).blocked, None, "{control:?}");
        }
        // A hazard never lifts a block: the reference's verdict stands.
        let sql = "GRANT ALL ON t TO x -- \r y";
        assert_eq!(classify(sql), classify_reference(sql));
        assert_eq!(classify(sql).blocked, Some(CHANGES_PERMISSIONS));
    }

    /// Every text of up to three characters over the characters the lexer treats specially.
    #[test]
    fn agrees_with_sqlparser_on_every_short_text() {
        let alphabet: Vec<char> =
            "'\"`\\-/*+._0159eELxXNn$?;(<>=!|&^~#@:[{\r\n a\u{e9}\u{a0}\u{663}"
                .chars()
                .collect();
        let mut n = 0;
        let mut text = String::new();
        for &a in &alphabet {
            for b in std::iter::once(None).chain(alphabet.iter().map(Some)) {
                for c in std::iter::once(None).chain(alphabet.iter().map(Some)) {
                    if b.is_none() && c.is_some() {
                        continue;
                    }
                    text.clear();
                    text.push(a);
                    text.extend(b);
                    text.extend(c);
                    check_against_reference(&text);
                    n += 1;
                }
            }
        }
        assert!(n > 50_000, "{n}");
    }

    /// Pieces the random cases are spliced from.
    const FRAGMENTS: &[&str] = &[
        "'",
        "\"",
        "`",
        "``",
        "''",
        "\\",
        "\\'",
        "\\\"",
        "\\\\",
        "--",
        "-- x\n",
        "/*",
        "*/",
        "/*+",
        "/* a */",
        ";",
        "(",
        ")",
        "$",
        "$$",
        "$a$",
        "${x}",
        "\r",
        "\n",
        "\r\n",
        "\t",
        " ",
        "\u{a0}",
        "\u{2028}",
        "\u{85}",
        "\u{feff}",
        "\u{200b}",
        "Ｇ",
        "\u{410}",
        "é",
        "\u{663}",
        "\0",
        "\x0b",
        "\x0c",
        "\x7f",
        ".",
        "._",
        "0x1F",
        "0x",
        "1e5",
        "1e",
        "1e5L",
        "1.5a",
        "1L",
        "N'",
        "X'",
        "n",
        "x",
        "r'",
        "?",
        "?1",
        ":p",
        "::",
        "!=",
        "<=>",
        "<=",
        "->>",
        "->",
        "||/",
        "|/",
        "|>",
        "!~*",
        "#>>",
        "#-",
        "@@",
        "@>",
        "^@",
        "&&",
        "=>",
        "==",
        "GRANT",
        "grant",
        "REVOKE",
        "OWNER",
        "ROW",
        "FILTER",
        "MASK",
        "ON",
        "SHARE",
        "CREATE",
        "ALTER",
        "DROP",
        "COMMENT",
        "IMMEDIATE",
        "EXECUTE",
        "SELECT",
        "WITH",
        "\\\n",
        "`a``b`",
        "'a''b'",
        "\\ ",
    ];

    fn mutate(rng: &mut impl Rng, input: &mut Vec<u8>, pool: &[&str]) {
        for _ in 0..rng.random_range(1..8) {
            let at = rng.random_range(0..=input.len());
            match rng.random_range(0..7) {
                0 | 1 => {
                    let f = FRAGMENTS[rng.random_range(0..FRAGMENTS.len())];
                    input.splice(at..at, f.bytes());
                }
                2 if at < input.len() => {
                    let end = rng.random_range(at..=input.len().min(at + 12));
                    input.drain(at..end);
                }
                3 => {
                    // A piece of another corpus text.
                    let other = pool[rng.random_range(0..pool.len())].as_bytes();
                    let from = rng.random_range(0..=other.len());
                    let to = rng.random_range(from..=other.len().min(from + 40));
                    input.splice(at..at, other[from..to].iter().copied());
                }
                4 => input.insert(at, rng.random_range(0x01..0x80u8)),
                5 => input.insert(at, rng.random()),
                _ if at < input.len() => {
                    let b = input[at];
                    input[at] = if b.is_ascii_lowercase() {
                        b.to_ascii_uppercase()
                    } else {
                        b ^ (1 << rng.random_range(0..7))
                    };
                }
                _ => input.push(b';'),
            }
        }
        input.truncate(4096);
    }

    /// Seeded, bounded: 20,000 mutated texts, each held to the reference
    /// (`AEGIS_SQL_DIFF_SEED` and `AEGIS_SQL_DIFF_CASES` change the seed and the count for a
    /// longer exploration).
    #[test]
    fn agrees_with_sqlparser_on_random_mutations() {
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let pool: Vec<&str> = sql_corpus::PERMISSION_CHANGES
            .iter()
            .chain(sql_corpus::ORDINARY_SQL)
            .chain(TRICKY)
            .copied()
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(env("AEGIS_SQL_DIFF_SEED", 0x5a117));
        let started = std::time::Instant::now();
        let (mut blocked, mut unreadable, mut stricter) = (0, 0, 0);
        let cases = env("AEGIS_SQL_DIFF_CASES", 20_000) as usize;
        for _ in 0..cases {
            let mut input = pool[rng.random_range(0..pool.len())].as_bytes().to_vec();
            mutate(&mut rng, &mut input, &pool);
            let sql = String::from_utf8_lossy(&input);
            stricter += usize::from(check_against_reference(&sql).is_some());
            let c = classify(&sql);
            blocked += usize::from(c.blocked.is_some());
            unreadable += usize::from(c.blocked == Some(UNREADABLE));
        }
        eprintln!(
            "{cases} cases in {:?}: {blocked} blocked, {unreadable} unreadable, {stricter} stricter",
            started.elapsed()
        );
        // The mix exercises every outcome.
        assert!(blocked > 1_000 && blocked < cases - 1_000, "{blocked}");
        assert!(
            unreadable > 500 && stricter > 500,
            "{unreadable} {stricter}"
        );
    }
}
