//! What a SQL text does, as far as an agent guardrail needs to know: the statements' kinds, and
//! whether any of them changes permissions (or cannot be told apart from one that does).
//!
//! The text is tokenized the way Databricks reads it (sqlparser's Databricks dialect: nested
//! `/* */` comments, `--` comments, backquoted identifiers, string literals), split at top-level
//! `;`, and each statement is judged by its leading keywords. That is deliberately not a full
//! parse: Databricks SQL grows faster than any parser, and a guardrail that refused every query
//! it could not parse would be switched off. The rule is an allowlist instead: a statement must
//! start with a known keyword, spelled in ASCII; anything else (a look-alike letter, a quoted
//! first word, text that does not tokenize) is `unknown` and blocked for agents.
//!
//! Blocked: `GRANT`, `REVOKE`, `DENY`; ownership changes (`OWNER` in an `ALTER`); row filter and
//! column mask changes (`ROW FILTER` or `MASK` in DDL); `CREATE`/`ALTER`/`DROP` of credentials,
//! storage credentials, external locations, connections, shares, recipients and providers;
//! `EXECUTE IMMEDIATE` (SQL built at run time cannot be judged); anything unknown.

use sha2::{Digest, Sha256};
use sqlparser::dialect::DatabricksDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

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

const CHANGES_PERMISSIONS: &str = "changes permissions";
const CHANGES_OWNER: &str = "changes an owner";
const CHANGES_FILTER_OR_MASK: &str = "changes a row filter or a column mask";
const CHANGES_SECURABLE: &str =
    "changes a credential, external location, connection, share, recipient or provider";
const DYNAMIC_SQL: &str = "runs SQL built at run time";
const UNRECOGNIZED: &str = "is not a statement aegis recognizes";
const UNREADABLE: &str = "cannot be read as SQL";

/// Words that may stand between CREATE/ALTER/DROP and the object type.
const TYPE_MODIFIERS: &[&str] = &[
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
const GUARDED_TYPES: &[&str] = &[
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
    let dialect = DatabricksDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, sql).tokenize() else {
        return Classified {
            kind: StatementKind::Unknown,
            blocked: Some(UNREADABLE),
            fingerprint: Sha256::digest(sql.as_bytes()).into(),
        };
    };
    let mut worst = Classified {
        kind: StatementKind::Query,
        blocked: None,
        fingerprint: normalized_digest(&tokens),
    };
    let mut statements = 0;
    for statement in tokens
        .split(|t| matches!(t, Token::SemiColon))
        .map(|s| {
            s.iter()
                .filter(|t| !matches!(t, Token::Whitespace(_)))
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
    {
        statements += 1;
        let c = statement_verdict(&statement);
        if c.blocked.is_some() && worst.blocked.is_none() {
            worst.blocked = c.blocked;
        }
        worst.kind = worst.kind.max(c.kind);
    }
    if statements == 0 {
        // Nothing but comments and whitespace: nothing runs.
        return worst;
    }
    worst
}

fn normalized_digest(tokens: &[Token]) -> [u8; 32] {
    use std::fmt::Write;
    let mut h = Sha256::new();
    let mut first = true;
    // One buffer for every token: no allocation per token.
    let mut buf = String::with_capacity(64);
    for t in tokens.iter().filter(|t| !matches!(t, Token::Whitespace(_))) {
        if !first {
            h.update(b" ");
        }
        first = false;
        buf.clear();
        match word(t) {
            Some(w) => buf.extend(w.chars().map(|c| c.to_ascii_uppercase())),
            None => {
                let _ = write!(buf, "{t}");
            }
        }
        h.update(buf.as_bytes());
    }
    h.finalize().into()
}

/// An unquoted word, as written, if `t` is one spelled in ASCII letters, digits and `_` (compared
/// ignoring ASCII case).
fn word(t: &Token) -> Option<&str> {
    match t {
        Token::Word(w)
            if w.quote_style.is_none()
                && !w.value.is_empty()
                && w.value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
        {
            Some(w.value.as_str())
        }
        _ => None,
    }
}

fn is(w: Option<&str>, want: &str) -> bool {
    w.is_some_and(|w| w.eq_ignore_ascii_case(want))
}

fn one_of(w: &str, list: &[&str]) -> bool {
    list.iter().any(|x| w.eq_ignore_ascii_case(x))
}

fn statement_verdict(tokens: &[&Token]) -> Classified {
    let block = |kind, why| Classified {
        kind,
        blocked: Some(why),
        fingerprint: [0u8; 32],
    };
    let words: Vec<Option<&str>> = tokens.iter().map(|t| word(t)).collect();
    let has = |w: &str| words.iter().any(|x| is(*x, w));
    let has_pair = |a: &str, b: &str| words.windows(2).any(|p| is(p[0], a) && is(p[1], b));
    if has_pair("EXECUTE", "IMMEDIATE") || has("IMMEDIATE") {
        return block(StatementKind::Unknown, DYNAMIC_SQL);
    }
    let first = match (tokens.first(), words.first()) {
        (Some(Token::LParen), _) => "(".to_string(),
        (_, Some(Some(w))) => w.to_ascii_uppercase(),
        _ => return block(StatementKind::Unknown, UNRECOGNIZED),
    };
    let kind = match first.as_str() {
        "GRANT" | "REVOKE" | "DENY" => return block(StatementKind::Dcl, CHANGES_PERMISSIONS),
        "SELECT" | "WITH" | "VALUES" | "FROM" | "TABLE" | "(" | "SHOW" | "DESCRIBE" | "DESC"
        | "EXPLAIN" | "LIST" => StatementKind::Query,
        "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "COPY" | "TRUNCATE" => StatementKind::Dml,
        "CREATE" | "ALTER" | "DROP" | "REPLACE" | "COMMENT" | "OPTIMIZE" | "VACUUM" | "ANALYZE"
        | "REFRESH" | "CACHE" | "UNCACHE" | "CLEAR" | "MSCK" | "RESTORE" | "CONVERT" | "USE"
        | "SET" | "RESET" | "DECLARE" => StatementKind::Ddl,
        _ => return block(StatementKind::Unknown, UNRECOGNIZED),
    };
    if kind != StatementKind::Ddl {
        return Classified {
            kind,
            blocked: None,
            fingerprint: [0u8; 32],
        };
    }
    if first == "ALTER" && has("OWNER") {
        return block(StatementKind::Dcl, CHANGES_OWNER);
    }
    if matches!(first.as_str(), "CREATE" | "ALTER" | "DROP" | "REPLACE")
        && (has_pair("ROW", "FILTER") || has("MASK"))
    {
        return block(StatementKind::Dcl, CHANGES_FILTER_OR_MASK);
    }
    if matches!(
        first.as_str(),
        "CREATE" | "ALTER" | "DROP" | "REPLACE" | "COMMENT"
    ) {
        // The object type: the first word after the verb that is not a modifier.
        let object = words
            .iter()
            .skip(1)
            .flatten()
            .find(|w| !one_of(w, TYPE_MODIFIERS));
        if object.is_some_and(|o| one_of(o, GUARDED_TYPES)) {
            return block(StatementKind::Dcl, CHANGES_SECURABLE);
        }
        if first == "COMMENT" && object.is_some_and(|o| o.eq_ignore_ascii_case("ON")) {
            // COMMENT ON <type> ...: judge the type after ON.
            let after_on = words
                .iter()
                .flatten()
                .skip_while(|w| !w.eq_ignore_ascii_case("ON"))
                .nth(1);
            if after_on.is_some_and(|o| one_of(o, GUARDED_TYPES)) {
                return block(StatementKind::Dcl, CHANGES_SECURABLE);
            }
        }
    }
    Classified {
        kind,
        blocked: None,
        fingerprint: [0u8; 32],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
