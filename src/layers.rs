//! The module graph, checked: every `crate::<module>` a module names (in `use` lines and in
//! paths) must sit on a lower layer than the module itself. See the layer table in the crate
//! docs; a new top-level module has to be placed in [`LAYERS`] before it builds green.
//!
//! Test code (`tests.rs` files and `#[cfg(test)] mod tests` blocks) and comments are not read:
//! a test may reach across layers to assemble what it checks.

/// Each top-level module and its layer; a module may use only modules of a lower layer.
pub const LAYERS: &[(&str, u8)] = &[
    // Leaves: no aegis module below them but each other's plain types.
    ("clock", 0),
    ("secret", 0),
    ("http", 0),
    ("pg", 1),
    ("tlog", 1),
    ("config", 2),
    ("logging", 3),
    ("redis", 3),
    // The domain: each speaks in its own types and errors, never in deny reasons.
    ("identity", 4),
    ("audit", 4),
    ("policy", 4),
    ("broker", 5),
    // The Check pipeline, its ports and the error → reason mappings.
    ("authz", 6),
    // Edges: listeners and background work built on the pipeline and the domain.
    ("grpc", 7),
    ("admin", 7),
    ("public", 7),
    ("ledger", 7),
    ("reload", 7),
    // Assembly.
    ("server", 8),
    ("cli", 9),
];

#[cfg(test)]
mod tests {
    use super::LAYERS;
    use std::path::{Path, PathBuf};

    fn layer(module: &str) -> Option<u8> {
        LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The source without comments, string literals, and test modules.
    fn code_of(text: &str) -> String {
        let text = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => &text[..i],
            None => text,
        };
        let b = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        while i < b.len() {
            if b[i..].starts_with(b"//") {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            } else if b[i..].starts_with(b"/*") {
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            } else if b[i] == b'"' && (i == 0 || b[i - 1] != b'\'') {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            } else {
                out.push(b[i] as char);
                i += 1;
            }
        }
        out
    }

    /// The top-level modules a piece of code names through `crate::`.
    fn named_modules(code: &str) -> Vec<String> {
        let mut found = Vec::new();
        let ident = |s: &str| -> String {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        for (i, _) in code.match_indices("crate::") {
            let before = code[..i].chars().last();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            let rest = &code[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a::b, c}`: the first segment of each top-level item.
                let mut depth = 0;
                let mut start = true;
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => start = true,
                        c if start && !c.is_whitespace() => {
                            found.push(ident(&group[j..]));
                            start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                found.push(ident(rest));
            }
        }
        found.retain(|m| !m.is_empty());
        found
    }

    #[test]
    fn modules_only_use_lower_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        files.sort();
        let mut problems = Vec::new();
        let mut seen = 0;
        for file in &files {
            let rel = file.strip_prefix(&src).expect("under src");
            let top = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .expect("utf-8 path")
                .trim_end_matches(".rs")
                .to_string();
            if top == "lib" || top == "main" || top == "layers" || rel.ends_with("tests.rs") {
                continue;
            }
            let Some(own) = layer(&top) else {
                problems.push(format!(
                    "{}: module {top} has no layer in LAYERS",
                    rel.display()
                ));
                continue;
            };
            let text = std::fs::read_to_string(file).expect("read source");
            if code_of(&text).contains("super::super") {
                problems.push(format!(
                    "{}: super::super hides a crate path",
                    rel.display()
                ));
            }
            for used in named_modules(&code_of(&text)) {
                seen += 1;
                if used == top {
                    continue;
                }
                match layer(&used) {
                    None => problems.push(format!(
                        "{}: uses crate::{used}, not in LAYERS",
                        rel.display()
                    )),
                    Some(l) if l >= own => problems.push(format!(
                        "{}: {top} (layer {own}) uses crate::{used} (layer {l})",
                        rel.display()
                    )),
                    Some(_) => {}
                }
            }
        }
        assert!(
            seen > 100,
            "the scan found only {seen} crate paths: is it reading src/?"
        );
        assert!(
            problems.is_empty(),
            "the module graph is not one-way:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn the_scanner_sees_what_it_must() {
        // Positive and negative controls for the reader itself.
        let code = code_of(
            "use crate::{audit::{Draft, Verdict}, config};\n\
             // crate::server in a comment\n\
             let s = \"crate::cli\";\n\
             fn f() { crate::policy::normalize_path(\"/\"); }\n\
             /* crate::grpc /* nested */ crate::admin */\n\
             #[cfg(test)]\nmod tests { use crate::server; }",
        );
        let mut m = named_modules(&code);
        m.sort();
        assert_eq!(m, ["audit", "config", "policy"]);
    }
}
