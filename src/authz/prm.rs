//! OAuth 2.0 Protected Resource Metadata (RFC 9728) for MCP clients.
//!
//! An MCP client that gets a 401 reads `resource_metadata` from the `WWW-Authenticate` challenge,
//! fetches that document and learns which authorization server (the IdP) to sign in with. aegis
//! answers `GET /.well-known/oauth-protected-resource[/<resource path>]` itself, from inside
//! Check, so the document is served behind any Envoy listener without an extra route. Nothing
//! here depends on the request's credentials, and nothing secret is in the document: it lists the
//! configured issuers and names the resource.
//!
//! The resource URL is built from the request's scheme and `:authority`, which the client chose;
//! the authority is checked to be a plain host[:port] so it cannot smuggle anything into a header
//! or a JSON string.

use crate::policy::normalize_path;

/// The RFC 9728 well-known path prefix.
pub const WELL_KNOWN: &str = "/.well-known/oauth-protected-resource";

/// Prefix of the managed MCP server routes that get a `resource_metadata` challenge.
const MCP_PREFIX: &str = "/api/2.0/mcp";

/// `scheme://authority` as the client addressed us, or `None` if either part is not something
/// we are willing to echo back.
pub fn origin(scheme: &str, authority: &str) -> Option<String> {
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "https" => "https",
        // Envoy reports the downstream scheme; an empty one is a plain-text listener.
        "http" | "" => "http",
        _ => return None,
    };
    let authority = authority.trim();
    let plain = !authority.is_empty()
        && authority.len() <= 255
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    plain.then(|| format!("{scheme}://{}", authority.to_ascii_lowercase()))
}

/// The metadata document for a `GET` of the well-known path, or `None` when the request is
/// something else (it then goes through the normal pipeline).
pub fn document(
    method: &str,
    raw_path: &str,
    scheme: &str,
    authority: &str,
    authorization_servers: &[String],
) -> Option<String> {
    if !method.eq_ignore_ascii_case("GET") {
        return None;
    }
    let path = normalize_path(raw_path);
    let resource_path = path.strip_prefix(WELL_KNOWN)?;
    if !(resource_path.is_empty() || resource_path.starts_with('/')) {
        return None;
    }
    let origin = origin(scheme, authority)?;
    Some(
        serde_json::json!({
            "resource": format!("{origin}{resource_path}"),
            "authorization_servers": authorization_servers,
            "bearer_methods_supported": ["header"],
            "resource_name": "aegis",
        })
        .to_string(),
    )
}

/// Whether `raw_path` is one of the managed MCP server routes.
pub fn is_mcp_path(raw_path: &str) -> bool {
    let path = normalize_path(raw_path).to_ascii_lowercase();
    path == MCP_PREFIX
        || path
            .strip_prefix(MCP_PREFIX)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The metadata URL a 401 on an MCP path points to: the well-known path with the resource path
/// appended (RFC 9728 section 3.1), on the origin the client used.
pub fn metadata_url(raw_path: &str, scheme: &str, authority: &str) -> Option<String> {
    if !is_mcp_path(raw_path) {
        return None;
    }
    let origin = origin(scheme, authority)?;
    let path = normalize_path(raw_path);
    // normalize_path keeps only non-control characters that survived decoding; refuse anything
    // that could break out of the quoted challenge parameter.
    if path
        .bytes()
        .any(|b| b == b'"' || b == b'\\' || !(0x21..0x7f).contains(&b))
    {
        return None;
    }
    Some(format!("{origin}{WELL_KNOWN}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers() -> Vec<String> {
        vec!["https://idp.example.com".to_string()]
    }

    #[test]
    fn serves_the_document_for_the_root_and_a_resource_path() {
        let doc = document("GET", WELL_KNOWN, "https", "gw.example.com", &servers()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["resource"], "https://gw.example.com");
        assert_eq!(v["authorization_servers"][0], "https://idp.example.com");

        let doc = document(
            "GET",
            "/.well-known/oauth-protected-resource/api/2.0/mcp/sql?x=1",
            "http",
            "127.0.0.1:8080",
            &servers(),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["resource"], "http://127.0.0.1:8080/api/2.0/mcp/sql");
    }

    #[test]
    fn leaves_everything_else_to_the_pipeline() {
        let s = servers();
        assert!(document("POST", WELL_KNOWN, "https", "h", &s).is_none());
        assert!(document(
            "GET",
            "/.well-known/oauth-protected-resourcex",
            "https",
            "h",
            &s
        )
        .is_none());
        assert!(document("GET", "/api/2.0/mcp/sql", "https", "h", &s).is_none());
        assert!(document("GET", WELL_KNOWN, "https", "evil\"host", &s).is_none());
        assert!(document("GET", WELL_KNOWN, "gopher", "h", &s).is_none());
    }

    #[test]
    fn challenges_point_at_the_resource_metadata() {
        assert_eq!(
            metadata_url("/api/2.0/mcp/genie/abc", "https", "gw.example.com").as_deref(),
            Some(
                "https://gw.example.com/.well-known/oauth-protected-resource/api/2.0/mcp/genie/abc"
            )
        );
        assert_eq!(metadata_url("/api/2.0/sql/statements", "https", "gw"), None);
        assert_eq!(metadata_url("/api/2.0/mcpx", "https", "gw"), None);
        assert_eq!(metadata_url("/api/2.0/mcp/%22x", "https", "gw"), None);
        assert!(is_mcp_path("//API/2.0/./mcp/sql"));
    }
}
