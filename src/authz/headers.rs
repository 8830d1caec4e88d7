//! Reading the agent's credentials and cleaning what goes upstream.

use std::borrow::Cow;
use std::collections::HashMap;

use super::Reason;

pub use crate::identity::MAX_TOKEN_LEN;

/// The single bearer token in `authorization`.
///
/// Envoy joins repeated headers with ',', and a JWT never contains one, so two `authorization`
/// headers (or a list) are refused rather than guessed at.
pub fn bearer_token(headers: &HashMap<String, String>) -> Result<&str, Reason> {
    let Some(value) = headers.get("authorization") else {
        return Err(Reason::MissingCredentials);
    };
    let value = value.trim();
    let Some((scheme, rest)) = value.split_once(' ') else {
        // `Bearer` with nothing after it, or a bare token with no scheme.
        return Err(
            if value.eq_ignore_ascii_case("bearer") || value.is_empty() {
                Reason::MissingCredentials
            } else {
                Reason::InvalidToken
            },
        );
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        // Basic, Negotiate, ... : no bearer credentials were offered.
        return Err(Reason::MissingCredentials);
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(Reason::MissingCredentials);
    }
    if token.len() > MAX_TOKEN_LEN
        || token.contains(',')
        || token.bytes().any(|b| b <= b' ' || b >= 0x7f)
    {
        return Err(Reason::InvalidToken);
    }
    Ok(token)
}

/// Names of every client-sent `x-aegis-*` header except `x-aegis-trace-id`, which aegis
/// overwrites (Envoy applies removals after additions, so removing it would drop ours too).
pub fn client_aegis_headers(headers: &HashMap<String, String>) -> Vec<String> {
    headers
        .keys()
        .filter(|k| k.starts_with("x-aegis-") && k.as_str() != "x-aegis-trace-id")
        .cloned()
        .collect()
}

/// Upper bound on the agent's part of the upstream user agent.
const MAX_AGENT_UA: usize = 512;

/// The agent's user-agent without any `aegis/…` or `aegis-trace/…` product (so an agent cannot
/// forge the join between the aegis chain and the Databricks audit log), without control
/// characters, and bounded in length.
///
/// A product is removed wherever it stands, not only at the start of a whitespace-separated
/// part: Databricks records the user agent as one string, and a join on `aegis-trace/<id>` would
/// match `x(aegis-trace/<id>` or `foo;aegis-trace/<id>` just as well.
pub fn clean_user_agent(ua: &str) -> String {
    let mut out = String::with_capacity(ua.len().min(MAX_AGENT_UA));
    for part in ua.split_ascii_whitespace() {
        if part.chars().any(|c| c.is_control()) {
            continue;
        }
        let part = strip_aegis_products(part);
        if part.is_empty() {
            continue;
        }
        if out.len() + part.len() + 1 > MAX_AGENT_UA {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&part);
    }
    out
}

/// `part` with every `aegis/<version>` and `aegis-trace/<value>` (ASCII case-insensitive) cut
/// out. Repeated until none is left, since a cut can join two halves into a new one
/// (`aegisaegis/1/2`). Borrows when there is nothing to cut, the common case.
fn strip_aegis_products(part: &str) -> Cow<'_, str> {
    let mut s = Cow::Borrowed(part);
    while let Some(range) = find_aegis_product(&s) {
        s.to_mut().replace_range(range, "");
    }
    s
}

/// The byte range of the first `aegis/…` or `aegis-trace/…` product in `s`: the name, the `/`
/// and the version or value after it (RFC 9110 token characters).
fn find_aegis_product(s: &str) -> Option<std::ops::Range<usize>> {
    const NAMES: [&[u8]; 2] = [b"aegis/", b"aegis-trace/"];
    let b = s.as_bytes();
    for start in 0..b.len() {
        // Both names start with an ASCII byte, so `start` is a char boundary when one matches.
        let Some(name) = NAMES.iter().find(|n| {
            b.get(start..start + n.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(n))
        }) else {
            continue;
        };
        let mut end = start + name.len();
        while b.get(end).copied().is_some_and(is_tchar) {
            end += 1;
        }
        return Some(start..end);
    }
    None
}

/// RFC 9110 `tchar`: what a product name or version is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A W3C `traceparent` (trace-context level 1): the caller's trace id and parent span id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent<'a> {
    pub trace_id: &'a str,
    pub parent_id: &'a str,
}

/// Parses `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, lower-case, ids not all zero); anything
/// else is ignored, as the spec asks, and the request simply starts no trace of its own.
pub fn traceparent(headers: &HashMap<String, String>) -> Option<TraceParent<'_>> {
    let v = headers.get("traceparent")?.trim();
    let mut parts = v.split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    if !hex(version, 2) || version == "ff" || !hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if !hex(trace_id, 32) || !hex(parent_id, 16) || zero(trace_id) || zero(parent_id) {
        return None;
    }
    Some(TraceParent {
        trace_id,
        parent_id,
    })
}

#[cfg(test)]
mod traceparent_tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_strictly() {
        let h = |v: &str| HashMap::from([("traceparent".to_string(), v.to_string())]);
        let good = h("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(
            traceparent(&good),
            Some(TraceParent {
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
                parent_id: "00f067aa0ba902b7"
            })
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx",
            "00-4bf92f3577b34da6-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(traceparent(&h(bad)), None, "{bad}");
        }
        assert_eq!(traceparent(&HashMap::new()), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bearer_token_cases() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<&'a str, Reason>);
        let cases: &[Case] = &[
            (&[], Err(Reason::MissingCredentials)),
            (
                &[("authorization", "Bearer abc.def.ghi")],
                Ok("abc.def.ghi"),
            ),
            (
                &[("authorization", "bearer   abc.def.ghi ")],
                Ok("abc.def.ghi"),
            ),
            (
                &[("authorization", "Bearer")],
                Err(Reason::MissingCredentials),
            ),
            (
                &[("authorization", "Bearer ")],
                Err(Reason::MissingCredentials),
            ),
            (
                &[("authorization", "Basic dXNlcjpwYXNz")],
                Err(Reason::MissingCredentials),
            ),
            (
                &[("authorization", "abc.def.ghi")],
                Err(Reason::InvalidToken),
            ),
            (
                &[("authorization", "Bearer a.b.c,Bearer d.e.f")],
                Err(Reason::InvalidToken),
            ),
            (
                &[("authorization", "Bearer a.b c")],
                Err(Reason::InvalidToken),
            ),
        ];
        for (headers, want) in cases {
            assert_eq!(bearer_token(&h(headers)), *want, "{headers:?}");
        }
        let huge = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert_eq!(
            bearer_token(&h(&[("authorization", &huge)])),
            Err(Reason::InvalidToken)
        );
    }

    /// Every `aegis/` and `aegis-trace/` the agent sent is cut out wherever it stands, with its
    /// value, so the only ones upstream are the two aegis appends.
    #[test]
    fn strips_forged_correlation_tokens() {
        let cases = [
            (
                "copilot/1.2 aegis/9.9 AEGIS-TRACE/deadbeef python/3.11",
                "copilot/1.2 python/3.11",
            ),
            ("x(aegis-trace/deadbeef)", "x()"),
            ("x(aegis-trace/deadbeef", "x("),
            ("foo;aegis/1.0", "foo;"),
            ("foo;AeGiS/1.0;bar", "foo;;bar"),
            ("copilot/1.0 (aegis-trace/deadbeef; x)", "copilot/1.0 (; x)"),
            ("a,aegis-trace/dead,b", "a,,b"),
            ("python/3.11aegis-trace/deadbeef", "python/3.11"),
            // A cut that joins two halves into a new product is cut again.
            ("aegisaegis/1/2", ""),
            ("aegis-traceaegis/9/deadbeef", ""),
            ("aegis-trace/aegis-trace/x", "/x"),
            ("aegis/", ""),
            ("\"aegis-trace/deadbeef\"", "\"\""),
            (
                "copilot/1.0 \u{1}aegis-trace/x python/3",
                "copilot/1.0 python/3",
            ),
            (
                "ok/1 aegis-tracer/2 aegis_x/3",
                "ok/1 aegis-tracer/2 aegis_x/3",
            ),
            ("", ""),
        ];
        for (raw, want) in cases {
            let got = clean_user_agent(raw);
            assert_eq!(got, want, "{raw:?}");
            let lower = got.to_ascii_lowercase();
            assert!(
                !lower.contains("aegis/") && !lower.contains("aegis-trace/"),
                "{raw:?} -> {got:?}"
            );
        }
        let long = "a".repeat(600);
        assert_eq!(clean_user_agent(&format!("x/1 {long}")), "x/1");
    }

    #[test]
    fn lists_client_aegis_headers_but_not_the_trace_id() {
        let mut got = client_aegis_headers(&h(&[
            ("x-aegis-user", "root"),
            ("x-aegis-trace-id", "forged"),
            ("x-other", "1"),
        ]));
        got.sort();
        assert_eq!(got, vec!["x-aegis-user".to_string()]);
    }
}
