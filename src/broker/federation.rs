//! Databricks OAuth token federation: RFC 8693 token exchange of the user's IdP JWT at the
//! workspace's `/oidc/v1/token`.

use serde::Deserialize;

use super::{BrokerError, Minted};
use crate::config::WorkspaceConfig;
use crate::http::{post_form, read_body};
use crate::secret::SecretString;

pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    token_type: Option<String>,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct OAuthError {
    #[serde(default)]
    error: Option<String>,
}

/// What a token endpoint handed out.
pub(crate) struct TokenReply {
    pub access: SecretString,
    pub refresh: Option<SecretString>,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

/// A token we would put into a header: non-empty, bounded, visible ASCII without spaces.
fn plausible_token(t: &str) -> bool {
    !t.is_empty() && t.len() <= 16 * 1024 && !t.bytes().any(|b| b <= b' ' || b >= 0x7f)
}

/// Exchanges `subject_token` for the user's Databricks token.
pub async fn exchange(
    http: &reqwest::Client,
    ws: &WorkspaceConfig,
    subject_token: &str,
) -> Result<Minted, BrokerError> {
    let url = ws
        .url
        .join("/oidc/v1/token")
        .map_err(|_| BrokerError::Unavailable("workspace url"))?;
    let scope = ws.scopes.join(" ");
    let mut form: Vec<(&str, &str)> = vec![
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("subject_token", subject_token),
        ("subject_token_type", TOKEN_TYPE_JWT),
        ("scope", &scope),
    ];
    if let Some(client_id) = &ws.client_id {
        form.push(("client_id", client_id));
    }
    let body = form_encode(&form);
    let resp = post_form(http, url, body).await.map_err(|e| {
        tracing::warn!(workspace = %ws.name, error = %e, "token exchange failed");
        BrokerError::Unavailable("token endpoint")
    })?;
    parse_response(resp).await
}

/// An exchange's answer as the user's Databricks token.
pub(crate) async fn parse_response(resp: reqwest::Response) -> Result<Minted, BrokerError> {
    let reply = token_reply(resp).await?;
    Ok(Minted {
        token: reply.access,
        expires_in: reply.expires_in,
    })
}

/// Reads a token endpoint's answer (RFC 6749 section 5): the tokens on 200, `RateLimited` on 429,
/// the OAuth error code as `Rejected` on 400/401/403, `Unavailable` for anything else or anything
/// malformed. The raw body, which holds the tokens, is wiped once parsed.
pub(crate) async fn token_reply(resp: reqwest::Response) -> Result<TokenReply, BrokerError> {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut body = read_body(resp)
        .await
        .map_err(|_| BrokerError::Unavailable("token endpoint body"))?;
    let out = match status {
        200 => serde_json::from_slice::<TokenResponse>(&body)
            .map_err(|_| BrokerError::Unavailable("token endpoint answered without a token"))
            .and_then(reply_of),
        429 => Err(BrokerError::RateLimited {
            retry_after: retry_after.unwrap_or(1).clamp(1, 300),
        }),
        400 | 401 | 403 => {
            let code = serde_json::from_slice::<OAuthError>(&body)
                .ok()
                .and_then(|e| e.error)
                .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic()))
                .unwrap_or_else(|| format!("http_{status}"));
            Err(BrokerError::Rejected(code))
        }
        _ => Err(BrokerError::Unavailable("token endpoint error status")),
    };
    zeroize::Zeroize::zeroize(&mut body);
    out
}

fn reply_of(parsed: TokenResponse) -> Result<TokenReply, BrokerError> {
    // Into secrets first, so the strings are wiped whatever is wrong with them.
    let access = SecretString::new(parsed.access_token);
    let refresh = parsed.refresh_token.map(SecretString::new);
    if !plausible_token(access.expose())
        || refresh
            .as_ref()
            .is_some_and(|r| !plausible_token(r.expose()))
    {
        return Err(BrokerError::Unavailable(
            "token endpoint answered a malformed token",
        ));
    }
    if parsed
        .token_type
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
    {
        return Err(BrokerError::Unavailable(
            "token endpoint answered a non-bearer token",
        ));
    }
    let Some(expires_in) = parsed.expires_in else {
        // Never guess a lifetime: a token we cannot bound could be forwarded expired.
        return Err(BrokerError::Unavailable(
            "token endpoint answered no expires_in",
        ));
    };
    Ok(TokenReply {
        access,
        refresh,
        expires_in,
    })
}

/// `application/x-www-form-urlencoded` body.
pub(crate) fn form_encode(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}
