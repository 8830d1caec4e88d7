//! The outbound HTTP client (IdP discovery and JWKS, Databricks token endpoints), and
//! [`cookie`] for our own listeners (the console, the U2M consent pages).
//!
//! Bounded everywhere: connect and total timeouts, no redirects (an IdP or token endpoint that
//! redirects is misconfigured, and following it could leak a subject token), and a cap on the
//! size of any body we read.

use std::time::Duration;

/// The value of cookie `name` in a request (every `Cookie` header, `;`-separated pairs).
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Largest response body read from an IdP or token endpoint.
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Transport(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("response body over {MAX_BODY} bytes")]
    TooLarge,
    #[error("response is not JSON")]
    NotJson,
    #[error("{0}")]
    Invalid(&'static str),
}

/// Builds the shared client.
pub fn client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(timeout.min(Duration::from_secs(2)))
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("aegis/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
}

/// Reads a response body up to [`MAX_BODY`] bytes.
pub async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, FetchError> {
    if resp.content_length().is_some_and(|n| n as usize > MAX_BODY) {
        return Err(FetchError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| FetchError::Transport(without_url(e)))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// GETs a JSON document; non-2xx is an error.
pub async fn fetch_json(
    http: &reqwest::Client,
    url: &str,
) -> Result<serde_json::Value, FetchError> {
    let resp = http
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| FetchError::Transport(without_url(e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(FetchError::Status(status.as_u16()));
    }
    let body = read_body(resp).await?;
    serde_json::from_slice(&body).map_err(|_| FetchError::NotJson)
}

/// A transport error's text without the URL (which may carry a query we would rather not log).
pub fn without_url(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "bad response body"
    } else {
        "transport error"
    };
    kind.to_string()
}

/// POSTs an `application/x-www-form-urlencoded` body that carries credentials (a subject token,
/// a refresh token, a client secret) and wipes the body from memory once it is sent.
pub async fn post_form(
    http: &reqwest::Client,
    url: url::Url,
    mut body: String,
) -> Result<reqwest::Response, String> {
    let sent = http
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json")
        .body(body.clone())
        .send()
        .await;
    zeroize::Zeroize::zeroize(&mut body);
    sent.map_err(without_url)
}

/// Escapes text for HTML (the console and the consent pages): element content and quoted attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
