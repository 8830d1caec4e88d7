//! The lexer of the statement guardrail: one pass over the bytes of a SQL text, no allocation,
//! yielding the tokens the classifier reads (see [`super`]) as spans of the text.
//!
//! It splits a text exactly where sqlparser 0.64's tokenizer does with the Databricks dialect
//! (`DatabricksDialect`, `unescape` on) and fails exactly where it fails, so that the verdicts and
//! the fingerprints (which audit rows already hold) stay those of the sqlparser-based classifier;
//! the differential tests hold it to that (src/policy/sql/reference.rs). What sqlparser does there,
//! and so what this does:
//!
//! - Whitespace (`char::is_whitespace`, so Unicode's too) and comments separate tokens and are
//!   dropped: `--` to the next `\n` (not including it); `/* */`, nested, unterminated = error.
//! - Words: an ASCII letter or `_`, then ASCII letters, digits and `_`. `N'…'` and `X'…'` are
//!   string literals (national, hex); `n`, `x` followed by anything else start a word. No other
//!   prefix (`b`, `r`, `e`, `u&`, `q`) means anything to the Databricks dialect.
//! - String literals in `'` or `"`: a doubled quote is one quote, a backslash escapes the next
//!   character (`\0 \a \b \f \n \r \t \Z` are control characters, anything else itself);
//!   unterminated = error. Backquoted identifiers: a doubled backquote is one, no backslash
//!   escapes; unterminated = error.
//! - Numbers as sqlparser reads them, odd cases included: `1a` and `1.5a` are words (a numeric
//!   prefix), `1e5` a number, `1e5L` a long one, `0x1F` a hex literal, a `.` right after a word a
//!   period, and `._` is a period after a word and an error anywhere else.
//! - `$$…$$` and `$tag$…$tag$` are dollar-quoted strings (unterminated = error), `$name` and
//!   `?123` placeholders, and every operator sqlparser knows for the dialect is one token
//!   (`->>`, `<=>`, `||/`, `!~*`, …); anything else is a one-character token.
//!
//! Where Databricks (Spark's lexer) may read a text otherwise than sqlparser and the difference
//! could hide a statement, the lexer reports a [`Hazard`], and the classifier blocks the text as
//! `unknown` where the sqlparser-based one let it pass: deliberately stricter, never laxer. The
//! hazards, with the reason for each:
//!
//! - [`Hazard::BackslashQuote`]: a backslash before the literal's own quote (`'it\'s'`). With
//!   `spark.sql.parser.escapedStringLiterals` on (a session `SET` away), or in a raw string
//!   `r'…'` (which sqlparser reads as the word `r` and a string), the quote ends the literal and
//!   what follows is SQL: `SELECT r'\'; GRANT …; --'` is one query to sqlparser and a GRANT to
//!   Databricks. A backslash before anything else does not move the literal's end.
//! - [`Hazard::CommentCarriageReturn`]: a `\r` inside a `--` comment not followed by `\n`. Spark
//!   ends the comment there, sqlparser only at `\n`: `-- x\rGRANT …` hides the GRANT from it.
//! - [`Hazard::CommentContinuation`]: a `--` comment whose line ends in a backslash. Spark
//!   continues the comment on the next line (`'--' ('\\\n' | ~[\r\n])*`), sqlparser does not, so
//!   a quote on that line opens a literal for one and not the other.
//! - [`Hazard::Hint`]: a `/*+ … */` hint holding anything but ASCII letters, digits, `_`,
//!   whitespace, `( ) , . =`; or `/*+` inside a block comment. Spark lexes a hint's insides as
//!   SQL (a quote there opens a literal, `--` a comment) and does not count a nested `/*+` as a
//!   nested comment; sqlparser treats both as comment text.
//! - [`Hazard::DollarQuote`]: `$$…$$` or `$tag$…$tag$`. Spark has no dollar-quoted strings, so
//!   what sqlparser hides in one is SQL to Databricks (Python UDF bodies are the one use).
//! - [`Hazard::VariableSubstitution`]: `${` anywhere, literals and comments included. Spark
//!   substitutes `${var}` in the text before it lexes it (`spark.sql.variable.substitute`).
//! - [`Hazard::NonAscii`]: a non-ASCII character outside literals, quoted identifiers and
//!   comments (Unicode whitespace, look-alike letters, a BOM, Unicode digits after `?`): Spark's
//!   whitespace and identifier rules differ from sqlparser's there.
//! - [`Hazard::Nul`]: a NUL byte anywhere (a layer that reads C strings sees a shorter text).
//!
//! A quote inside a comment, `--` inside a block comment and `/*` inside a literal mean nothing
//! to either lexer and are not hazards; `{`, `}` and `$name` are single tokens to sqlparser and
//! no Spark token, so they hide nothing.

/// What a token is, as far as the classifier and the fingerprint need to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// An unquoted word (ASCII letters, digits, `_`; a numeric-prefix word may hold `.`, `+`,
    /// `-`).
    Word,
    /// A backquoted identifier, quotes included in the span.
    QuotedIdent,
    /// A string literal, quotes (and an `N`/`X` prefix) included in the span.
    Str {
        quote: u8,
        prefix: Option<u8>,
    },
    /// `0x` and hex digits.
    HexNumber,
    /// `!=` (sqlparser spells it `<>`).
    BangEq,
    LParen,
    SemiColon,
    /// Anything else: shown as written.
    Other,
}

/// A token: its kind and its bytes `start..end` in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tok {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

/// The text cannot be tokenized (sqlparser would fail on it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unreadable;

/// Something Databricks may read otherwise than sqlparser (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hazard {
    BackslashQuote,
    CommentCarriageReturn,
    CommentContinuation,
    Hint,
    DollarQuote,
    VariableSubstitution,
    NonAscii,
    Nul,
}

/// The previous token, whitespace and comments included, as the number rules need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prev {
    None,
    Space,
    Word,
    Period,
    Other,
}

pub(super) struct Lexer<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
    prev: Prev,
    prev_non_space_word: bool,
    /// The first hazard seen, if any.
    pub hazard: Option<Hazard>,
}

fn ident_part(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

impl<'a> Lexer<'a> {
    pub fn new(text: &'a str) -> Self {
        let b = text.as_bytes();
        let mut hazard = None;
        if b.contains(&0) {
            hazard = Some(Hazard::Nul);
        } else if text.contains("${") {
            hazard = Some(Hazard::VariableSubstitution);
        }
        Lexer {
            text,
            b,
            i: 0,
            prev: Prev::None,
            prev_non_space_word: false,
            hazard,
        }
    }

    fn flag(&mut self, h: Hazard) {
        self.hazard.get_or_insert(h);
    }

    fn at(&self, i: usize) -> Option<u8> {
        self.b.get(i).copied()
    }

    /// The next token that is not whitespace or a comment; `Ok(None)` at the end.
    pub fn next_token(&mut self) -> Result<Option<Tok>, Unreadable> {
        loop {
            let start = self.i;
            let Some(c) = self.at(start) else {
                return Ok(None);
            };
            let (kind, end) = match c {
                b' ' | b'\t' | b'\n' => {
                    self.space(start + 1);
                    continue;
                }
                b'\r' => {
                    let end = if self.at(start + 1) == Some(b'\n') {
                        start + 2
                    } else {
                        start + 1
                    };
                    self.space(end);
                    continue;
                }
                b'N' | b'n' | b'X' | b'x' if self.at(start + 1) == Some(b'\'') => {
                    let end = self.string(start + 1, b'\'')?;
                    let prefix = c.to_ascii_uppercase();
                    (
                        Kind::Str {
                            quote: b'\'',
                            prefix: Some(prefix),
                        },
                        end,
                    )
                }
                b'\'' | b'"' => (
                    Kind::Str {
                        quote: c,
                        prefix: None,
                    },
                    self.string(start, c)?,
                ),
                b'`' => (Kind::QuotedIdent, self.quoted_ident(start)?),
                b'0'..=b'9' | b'.' => self.number(start)?,
                b'(' => (Kind::LParen, start + 1),
                b';' => (Kind::SemiColon, start + 1),
                b')' | b',' | b'+' | b'*' | b'%' | b'\\' | b'[' | b']' | b'{' | b'}' => {
                    (Kind::Other, start + 1)
                }
                b'-' => match self.at(start + 1) {
                    Some(b'-') => {
                        self.line_comment(start + 2);
                        continue;
                    }
                    Some(b'>') if self.at(start + 2) == Some(b'>') => (Kind::Other, start + 3),
                    Some(b'>') => (Kind::Other, start + 2),
                    _ => (Kind::Other, start + 1),
                },
                b'/' => {
                    if self.at(start + 1) == Some(b'*') {
                        self.block_comment(start)?;
                        continue;
                    }
                    (Kind::Other, start + 1)
                }
                b'|' => match self.at(start + 1) {
                    Some(b'/') | Some(b'>') => (Kind::Other, start + 2),
                    Some(b'|') if self.at(start + 2) == Some(b'/') => (Kind::Other, start + 3),
                    Some(b'|') => (Kind::Other, start + 2),
                    _ => (Kind::Other, start + 1),
                },
                b'=' => match self.at(start + 1) {
                    Some(b'>') | Some(b'=') => (Kind::Other, start + 2),
                    _ => (Kind::Other, start + 1),
                },
                b'!' => match self.at(start + 1) {
                    Some(b'=') => (Kind::BangEq, start + 2),
                    Some(b'!') => (Kind::Other, start + 2),
                    Some(b'~') if self.at(start + 2) == Some(b'*') => (Kind::Other, start + 3),
                    Some(b'~') => (Kind::Other, start + 2),
                    _ => (Kind::Other, start + 1),
                },
                b'<' => match self.at(start + 1) {
                    Some(b'=') if self.at(start + 2) == Some(b'>') => (Kind::Other, start + 3),
                    Some(b'=') | Some(b'>') | Some(b'<') | Some(b'@') => (Kind::Other, start + 2),
                    _ => (Kind::Other, start + 1),
                },
                b'>' => match self.at(start + 1) {
                    Some(b'=') | Some(b'>') => (Kind::Other, start + 2),
                    _ => (Kind::Other, start + 1),
                },
                b':' => match self.at(start + 1) {
                    Some(b':') | Some(b'=') => (Kind::Other, start + 2),
                    _ => (Kind::Other, start + 1),
                },
                b'&' => match self.at(start + 1) {
                    Some(b'&') => (Kind::Other, start + 2),
                    _ => (Kind::Other, start + 1),
                },
                b'^' => match self.at(start + 1) {
                    Some(b'@') => (Kind::Other, start + 2),
                    _ => (Kind::Other, start + 1),
                },
                b'~' => match self.at(start + 1) {
                    Some(b'*') => (Kind::Other, start + 2),
                    _ => (Kind::Other, start + 1),
                },
                b'#' => match self.at(start + 1) {
                    Some(b'-') => (Kind::Other, start + 2),
                    Some(b'>') if self.at(start + 2) == Some(b'>') => (Kind::Other, start + 3),
                    Some(b'>') => (Kind::Other, start + 2),
                    _ => (Kind::Other, start + 1),
                },
                b'@' => match self.at(start + 1) {
                    Some(b'>') | Some(b'?') | Some(b'@') => (Kind::Other, start + 2),
                    _ => (Kind::Other, start + 1),
                },
                b'?' => {
                    // `?` and any (Unicode) numeric characters.
                    let mut end = start + 1;
                    while let Some(ch) = self.text[end..].chars().next() {
                        if !ch.is_numeric() {
                            break;
                        }
                        if !ch.is_ascii() {
                            self.flag(Hazard::NonAscii);
                        }
                        end += ch.len_utf8();
                    }
                    (Kind::Other, end)
                }
                b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                    let mut end = start + 1;
                    while self.at(end).is_some_and(ident_part) {
                        end += 1;
                    }
                    (Kind::Word, end)
                }
                b'$' => (Kind::Other, self.dollar(start)?),
                _ => {
                    // Anything else is one character: whitespace if Unicode says so (this covers
                    // \x0b and \x0c too), else a token of its own.
                    let ch = self.text[start..].chars().next().unwrap_or('\0');
                    if !ch.is_ascii() {
                        self.flag(Hazard::NonAscii);
                    }
                    let end = start + ch.len_utf8();
                    if ch.is_whitespace() {
                        self.space(end);
                        continue;
                    }
                    (Kind::Other, end)
                }
            };
            self.i = end;
            let word = matches!(kind, Kind::Word | Kind::QuotedIdent);
            self.prev = if word {
                Prev::Word
            } else if end == start + 1 && c == b'.' {
                Prev::Period
            } else {
                Prev::Other
            };
            self.prev_non_space_word = word;
            return Ok(Some(Tok { kind, start, end }));
        }
    }

    fn space(&mut self, end: usize) {
        self.i = end;
        self.prev = Prev::Space;
    }

    /// A string literal whose opening `quote` is at `open`; returns its end.
    fn string(&mut self, open: usize, quote: u8) -> Result<usize, Unreadable> {
        let mut i = open + 1;
        while let Some(c) = self.at(i) {
            if c == quote {
                if self.at(i + 1) == Some(quote) {
                    i += 2;
                    continue;
                }
                return Ok(i + 1);
            }
            if c == b'\\' {
                match self.at(i + 1) {
                    Some(n) if n == quote => {
                        self.flag(Hazard::BackslashQuote);
                        i += 2;
                    }
                    // The escaped character's first byte; the rest of a multi-byte character
                    // cannot be a quote or a backslash.
                    Some(_) => i += 2,
                    None => return Err(Unreadable),
                }
                continue;
            }
            i += 1;
        }
        Err(Unreadable)
    }

    /// A backquoted identifier opening at `open`; returns its end.
    fn quoted_ident(&self, open: usize) -> Result<usize, Unreadable> {
        let mut i = open + 1;
        while let Some(c) = self.at(i) {
            if c == b'`' {
                if self.at(i + 1) == Some(b'`') {
                    i += 2;
                    continue;
                }
                return Ok(i + 1);
            }
            i += 1;
        }
        Err(Unreadable)
    }

    /// `--` comment text from `from` to the next `\n` (not included).
    fn line_comment(&mut self, from: usize) {
        let rest = &self.b[from..];
        let len = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
        let text = &rest[..len];
        if let Some(cr) = text.iter().position(|&c| c == b'\r') {
            // `\r\n` ends the line for both lexers, and a `\r` at the very end ends the text;
            // a `\r` with more comment after it ends the comment only for Spark.
            if cr + 1 != len {
                self.flag(Hazard::CommentCarriageReturn);
            }
        }
        if len < rest.len() && text.last() == Some(&b'\\') {
            self.flag(Hazard::CommentContinuation);
        }
        self.space(from + len);
    }

    /// A block comment opening at `open` (`/*`), nested ones included.
    fn block_comment(&mut self, open: usize) -> Result<(), Unreadable> {
        let hint = self.at(open + 2) == Some(b'+');
        let mut depth = 1u32;
        let mut i = open + 2;
        let mut nested = false;
        loop {
            match (self.at(i), self.at(i + 1)) {
                (Some(b'/'), Some(b'*')) => {
                    if self.at(i + 2) == Some(b'+') {
                        self.flag(Hazard::Hint);
                    }
                    nested = true;
                    depth += 1;
                    i += 2;
                }
                (Some(b'*'), Some(b'/')) => {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                }
                (Some(_), _) => i += 1,
                (None, _) => return Err(Unreadable),
            }
        }
        if hint {
            let body = &self.b[open + 3..i - 2];
            let plain = body.iter().all(|&c| {
                c.is_ascii_alphanumeric()
                    || matches!(
                        c,
                        b'_' | b' ' | b'\t' | b'\n' | b'\r' | b'(' | b')' | b',' | b'.' | b'='
                    )
            });
            if nested || !plain {
                self.flag(Hazard::Hint);
            }
        }
        self.space(i);
        Ok(())
    }

    /// A number, a period or a numeric-prefix word starting at `start` (a digit or `.`).
    fn number(&mut self, start: usize) -> Result<(Kind, usize), Unreadable> {
        let b = self.b;
        let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
        if b[start] == b'.' && self.at(start + 1) == Some(b'_') {
            // `._` after a word is a field access; anywhere else sqlparser refuses it.
            return if self.prev_non_space_word {
                Ok((Kind::Other, start + 1))
            } else {
                Err(Unreadable)
            };
        }
        let mut j = start;
        while digit(j) {
            j += 1;
        }
        if j == start + 1 && b[start] == b'0' && self.at(j) == Some(b'x') {
            j += 1;
            while b.get(j).is_some_and(u8::is_ascii_hexdigit) {
                j += 1;
            }
            return Ok((Kind::HexNumber, j));
        }
        if self.at(j) == Some(b'.') {
            j += 1;
        }
        let only_period = j == start + 1 && b[start] == b'.';
        if only_period && self.prev == Prev::Word {
            return Ok((Kind::Other, j));
        }
        while digit(j) {
            j += 1;
        }
        if only_period && j == start + 1 {
            return Ok((Kind::Other, j));
        }
        // An exponent: `e`, an optional sign, at least one digit. sqlparser notes the `e` even
        // when no digit follows, and then reads no numeric-prefix word.
        let mut saw_e = false;
        if matches!(self.at(j), Some(b'e' | b'E')) {
            saw_e = true;
            let mut k = j + 1;
            if matches!(self.at(k), Some(b'+' | b'-')) {
                k += 1;
            }
            if digit(k) {
                j = k;
                while digit(j) {
                    j += 1;
                }
            }
        }
        if !saw_e {
            let mut w = j;
            while self.at(w).is_some_and(ident_part) {
                w += 1;
            }
            if w > j {
                return Ok((Kind::Word, w));
            }
        } else if self.prev == Prev::Period {
            return Ok((Kind::Word, j));
        }
        if self.at(j) == Some(b'L') {
            j += 1;
        }
        Ok((Kind::Other, j))
    }

    /// `$…` at `start`: a dollar-quoted string or a placeholder; returns its end.
    fn dollar(&mut self, start: usize) -> Result<usize, Unreadable> {
        let b = self.b;
        if self.at(start + 1) == Some(b'$') {
            // `$$…$$`: up to the first `$$` after the opening one.
            let from = start + 2;
            let close = b[from..].windows(2).position(|w| w == b"$$");
            self.flag(Hazard::DollarQuote);
            return close.map(|p| from + p + 2).ok_or(Unreadable);
        }
        // The tag (or placeholder name): Unicode letters, digits and `_`.
        let mut j = start + 1;
        while let Some(ch) = self.text[j..].chars().next() {
            if !(ch.is_alphanumeric() || ch == '_') {
                break;
            }
            if !ch.is_ascii() {
                self.flag(Hazard::NonAscii);
            }
            j += ch.len_utf8();
        }
        if self.at(j) != Some(b'$') {
            return Ok(j);
        }
        // `$tag$…$tag$`: up to the first closing `$tag$` after the opening one.
        self.flag(Hazard::DollarQuote);
        let delim = &b[start..=j];
        let from = j + 1;
        b[from..]
            .windows(delim.len())
            .position(|w| w == delim)
            .map(|p| from + p + delim.len())
            .ok_or(Unreadable)
    }
}
