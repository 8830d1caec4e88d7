//! PostgreSQL connections, with TLS when the URL asks for it: one seam shared by the audit
//! ledger, the U2M grant store, the agent blocklist and config validation.
//!
//! The URL takes libpq's `sslmode` (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`)
//! and `sslrootcert` (a PEM bundle). aegis is stricter than libpq: whenever TLS is used the
//! server's certificate chain and host name are verified (against `sslrootcert`, else the
//! Mozilla roots), because an unverified TLS session to the audit store protects nothing.
//! `prefer` is refused outright: it silently falls back to plaintext.

use std::time::Duration;

use tokio_postgres::config::SslMode;
use tokio_postgres::Client;

/// A PostgreSQL failure. The driver's error is kept as the source; the text shown to operators
/// is [`error_text`]'s (SQLSTATE and server message, or "connection closed"/"connection error"),
/// never a connection string or a parameter value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PgError {
    #[error("{}", error_text(.0))]
    Db(#[source] std::sync::Arc<tokio_postgres::Error>),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("not connected")]
    NotConnected,
    /// A fixed-text state problem (e.g. a connection still in use).
    #[error("{0}")]
    State(&'static str),
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> PgError {
        PgError::Db(std::sync::Arc::new(e))
    }
}

/// Connection settings parsed from an aegis postgres URL.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    tls: Option<rustls::ClientConfig>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Why a URL cannot be used (config validation reports these).
pub fn validate_url(url: &str) -> Result<(), String> {
    PgTarget::parse(url).map(|_| ())
}

impl PgTarget {
    pub fn parse(url: &str) -> Result<PgTarget, String> {
        let (rest, mode, root) = split_tls_params(url)?;
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|_| "is not a valid postgres:// URL".to_string())?;
        let tls =
            match mode.as_deref() {
                None | Some("disable") => {
                    if root.is_some() {
                        return Err("sslrootcert is set but sslmode does not use TLS".into());
                    }
                    config.ssl_mode(SslMode::Disable);
                    None
                }
                Some("require") | Some("verify-ca") | Some("verify-full") => {
                    config.ssl_mode(SslMode::Require);
                    Some(client_config(root.as_deref())?)
                }
                Some("prefer") | Some("allow") => return Err(
                    "sslmode=prefer/allow may fall back to plaintext; use require or verify-full"
                        .into(),
                ),
                Some(other) => return Err(format!("sslmode \"{other}\" is not supported")),
            };
        Ok(PgTarget { config, tls })
    }

    /// Connects and spawns the connection task.
    pub async fn connect(&self, timeout: Duration, app: &str) -> Result<Client, PgError> {
        let mut cfg = self.config.clone();
        cfg.connect_timeout(timeout);
        cfg.application_name(app);
        let fut = async {
            let client = match &self.tls {
                None => {
                    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
                    tokio::spawn(drive(conn));
                    client
                }
                Some(tls) => {
                    let connector = tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone());
                    let (client, conn) = cfg.connect(connector).await?;
                    tokio::spawn(drive(conn));
                    client
                }
            };
            Ok(client)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| PgError::ConnectTimeout)?
    }
}

/// Runs a connection until it closes.
async fn drive<S, T>(conn: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = conn.await {
        tracing::debug!(error = %error_text(&e), "postgres connection closed");
    }
}

/// Removes `sslmode` and `sslrootcert` from the query (tokio-postgres knows neither the verify
/// modes nor root certs) and returns them.
fn split_tls_params(url: &str) -> Result<(String, Option<String>, Option<String>), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must be a postgres:// URL".into());
    }
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None, None));
    };
    let mut mode = None;
    let mut root = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => mode = Some(v.to_string()),
            "sslrootcert" => {
                let decoded = url::form_urlencoded::parse(format!("v={v}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                root = Some(decoded);
            }
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, mode, root))
}

fn client_config(root: Option<&str>) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match root {
        Some(path) => {
            let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("sslrootcert {path} is not a PEM bundle: {e}"))?;
            if certs.is_empty() {
                return Err(format!("sslrootcert {path} holds no certificate"));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("sslrootcert {path}: {e}"))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A Postgres error as text safe for logs (never the connection string or a parameter value).
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            if e.is_closed() {
                "connection closed".to_string()
            } else {
                "connection error".to_string()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_params_are_understood_and_prefer_is_refused() {
        assert!(PgTarget::parse("postgres://aegis@127.0.0.1:5432/aegis")
            .unwrap()
            .tls
            .is_none());
        assert!(
            PgTarget::parse("postgres://aegis@db:5432/aegis?sslmode=verify-full")
                .unwrap()
                .tls
                .is_some()
        );
        assert!(PgTarget::parse("postgres://aegis@db/aegis?sslmode=prefer").is_err());
        assert!(PgTarget::parse("postgres://aegis@db/aegis?sslmode=bogus").is_err());
        assert!(
            PgTarget::parse("postgres://aegis@db/aegis?sslmode=require&sslrootcert=/nope.pem")
                .unwrap_err()
                .contains("cannot read sslrootcert")
        );
        assert!(PgTarget::parse("mysql://x").is_err());
    }
}
