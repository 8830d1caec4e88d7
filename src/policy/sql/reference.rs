// The classifier as it was before the purpose-built lexer (src/policy/sql/lex.rs): sqlparser's
// tokenizer (Databricks dialect), then the same verdict and fingerprint rules. It is the
// reference of the differential tests: `classify` must agree with it on every text, except
// where it is deliberately stricter (see the module docs of src/policy/sql.rs).
//
// Included (include!) by src/policy/sql.rs under #[cfg(test)], by tests/fuzz_smoke.rs and by
// the cargo-fuzz target fuzz/fuzz_targets/sql_classify.rs; the includer brings `Classified`,
// `StatementKind`, `Hazard`, `classify_explained` and the reason constants into scope.

use sha2::{Digest, Sha256};
use sqlparser::dialect::DatabricksDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

/// Classifies a SQL text (one or more statements).
pub fn classify_reference(sql: &str) -> Classified {
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


/// Whether the text shows the `hazard` on its face: a crude, independent check that the lexer
/// blocks a text for one of its documented reasons and not for another.
pub fn shows_hazard(sql: &str, hazard: Hazard) -> bool {
    match hazard {
        Hazard::BackslashQuote => sql.contains("\\'") || sql.contains("\\\""),
        Hazard::CommentCarriageReturn => {
            sql.contains("--") && sql.split("\r\n").any(|part| part.contains('\r'))
        }
        Hazard::CommentContinuation => sql.contains("--") && sql.contains("\\\n"),
        Hazard::Hint => sql.contains("/*+"),
        Hazard::DollarQuote => sql.matches('$').count() >= 2,
        Hazard::VariableSubstitution => sql.contains("${"),
        Hazard::NonAscii => !sql.is_ascii(),
        Hazard::Nul => sql.contains('\0'),
    }
}

/// Panics unless `classify` agrees with the reference on `sql`: the same fingerprint always; the
/// same verdict, unless the lexer saw a hazard the text shows, the reference let the text pass
/// and `classify` blocked it as `unknown` (stricter, never laxer). Returns that hazard.
pub fn check_against_reference(sql: &str) -> Option<Hazard> {
    let reference = classify_reference(sql);
    let (new, hazard) = classify_explained(sql);
    assert_eq!(
        new.fingerprint, reference.fingerprint,
        "fingerprint differs for {sql:?}"
    );
    match hazard {
        None => assert_eq!(new, reference, "verdict differs for {sql:?}"),
        Some(h) => {
            assert!(
                reference.blocked.is_none()
                    && new.kind == StatementKind::Unknown
                    && new.blocked == Some(AMBIGUOUS),
                "{h:?}: {new:?} against the reference's {reference:?} for {sql:?}"
            );
            assert!(shows_hazard(sql, h), "{h:?} not shown by {sql:?}");
        }
    }
    hazard
}
