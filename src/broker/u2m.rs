//! U2M: the user's own Databricks OAuth tokens from an authorization code + PKCE consent, kept
//! fresh with their refresh token.
//!
//! - **Consent.** A principal with no stored refresh token is denied `consent_required` with a
//!   `consent_url`: a link to `{public_url}/oauth/start` bound to (workspace, user name, issuer,
//!   subject) and an expiry, signed with HMAC-SHA256 under a key derived from the cache key
//!   ([`ConsentLinks`]). `/oauth/start` (see `crate::public`) keeps the PKCE verifier in Redis,
//!   sealed, under a random `state`, and binds it to the browser with a cookie; `/oauth/callback`
//!   exchanges the code, asks SCIM `Me` who consented, and stores the refresh token only when
//!   that Databricks user *is* the user the IdP token maps to.
//! - **Durable.** Refresh tokens live in Postgres (`aegis_u2m_grants`), one row per principal
//!   (workspace, issuer, subject), sealed with the cache AEAD ([`Sealer`]) under AAD = workspace,
//!   issuer, subject and user name, so a row copied to another principal does not open, and a
//!   Redis flush costs a refresh, never a consent. A grant is used only while the principal
//!   still maps to the user name that consented.
//! - **Revocation.** `discard_access` marks the stored access token unusable (the next request
//!   refreshes and sends a different token); `forget` deletes the grant.
//! - **Rotation.** Refresh tokens may be single-use. Every refresh runs inside one Postgres
//!   transaction holding the user's row (`SELECT ... FOR UPDATE`), and the rotated token is
//!   written before the row is released, so no replica ever sends a spent token. The row also
//!   keeps the newest access token: a replica that waited for the lock uses it instead of
//!   refreshing again. The refresh runs on its own task, so a Check that gives up (deadline)
//!   cannot abandon a rotated token between the token endpoint and the commit.
//! - `invalid_grant` on refresh means the grant is gone: the row is deleted and the user is
//!   asked to consent again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::Client;

use super::federation::{form_encode, token_reply, TokenReply};
use super::seal::Sealer;
use super::{now_ms, BrokerError, Minted};
use crate::config::{TokenSourceKind, WorkspaceConfig};
use crate::http::{post_form, read_body, without_url};
use crate::identity::Identity;
use crate::pg::PgTarget;
use crate::redis::RedisLink;
use crate::secret::{Key32, SecretString};

type HmacSha256 = Hmac<Sha256>;

/// How long a consent link and a started consent stay usable.
pub const CONSENT_TTL: Duration = Duration::from_secs(600);
/// Concurrent Postgres connections used for refresh tokens, per process.
const MAX_CONNECTIONS: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Waiting for another replica's refresh of the same user.
const LOCK_TIMEOUT: &str = "1500ms";
const STATEMENT_TIMEOUT: &str = "3s";
const LINK_TAG: &[u8] = b"aegis.u2m.consent-link.v1";
/// Redis keys of a consent link's sign-ins: `aegis:v2:u2m:{<link id>}:...`, one hash slot per
/// link. `state:<hash>` holds a pending sign-in, `pending` the link's only live one, `starts`
/// how often the link was started.
const LINK_PREFIX: &str = "aegis:v2:u2m:";
/// How often one consent link may start a sign-in.
pub const MAX_STARTS_PER_LINK: u64 = 5;

/// Starts a sign-in for a link: counts the start (refusing past the limit), replaces the link's
/// previous pending sign-in (so only the newest state can finish) and stores the new one.
/// KEYS: starts, pending, new state. ARGV: sealed pending, ttl (ms), limit. Returns the starts
/// so far, or -1 past the limit (nothing stored).
const START_SCRIPT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[3]) then return -1 end
local old = redis.call('GET', KEYS[2])
if old then redis.call('DEL', old) end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], KEYS[3], 'PX', ARGV[2])
return n
";

/// Consumes a pending sign-in only if it still holds what was read (and so was checked).
/// KEYS: state. ARGV: the sealed value read. Returns 1 when this call consumed it.
const CONSUME_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

// === Consent links ===

/// Signs and checks consent links. The key is HMAC-SHA256(cache key, [`LINK_TAG`]): derived,
/// so no new secret needs configuring, and separate from the AEAD's use of the cache key.
pub struct ConsentLinks {
    key: Key32,
    public_url: url::Url,
}

/// What a valid consent link names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkClaims {
    pub workspace: String,
    pub user_name: String,
    pub issuer: String,
    pub subject: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("the consent link is incomplete")]
    Malformed,
    #[error("the consent link's signature does not verify")]
    BadSignature,
    #[error("the consent link has expired")]
    Expired,
}

impl ConsentLinks {
    pub fn new(cache_key: &Key32, public_url: url::Url) -> ConsentLinks {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(cache_key.expose())
            .unwrap_or_else(|_| unreachable!("hmac accepts any key length"));
        mac.update(LINK_TAG);
        let derived: [u8; 32] = mac.finalize().into_bytes().into();
        ConsentLinks {
            key: Key32::from_bytes(derived),
            public_url,
        }
    }

    fn mac(&self, c: &LinkClaims, exp: i64) -> HmacSha256 {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(self.key.expose())
            .unwrap_or_else(|_| unreachable!("hmac accepts any key length"));
        for part in [
            c.workspace.as_bytes(),
            c.user_name.as_bytes(),
            c.issuer.as_bytes(),
            c.subject.as_bytes(),
            exp.to_string().as_bytes(),
        ] {
            // Length-prefixed, so no two claim sets encode alike.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// `{public_url}/oauth/start?w=..&u=..&i=..&p=..&e=..&s=..`, valid for [`CONSENT_TTL`].
    pub fn link(&self, c: &LinkClaims, now_ms: i64) -> String {
        let exp = now_ms / 1000 + CONSENT_TTL.as_secs() as i64;
        let sig = URL_SAFE_NO_PAD.encode(self.mac(c, exp).finalize().into_bytes());
        let mut url = self.public_url.clone();
        url.set_path(&format!(
            "{}/oauth/start",
            self.public_url.path().trim_end_matches('/')
        ));
        url.query_pairs_mut()
            .clear()
            .append_pair("w", &c.workspace)
            .append_pair("u", &c.user_name)
            .append_pair("i", &c.issuer)
            .append_pair("p", &c.subject)
            .append_pair("e", &exp.to_string())
            .append_pair("s", &sig);
        url.into()
    }

    /// The id of a link (from its signature), which its sign-ins are counted and kept under.
    pub fn link_id(params: &std::collections::HashMap<String, String>) -> Option<String> {
        let sig = params.get("s").filter(|s| !s.is_empty())?;
        Some(hex::encode(&Sha256::digest(sig.as_bytes())[..16]))
    }

    /// Checks a link's query parameters (`w`, `u`, `i`, `p`, `e`, `s`).
    pub fn verify(
        &self,
        params: &std::collections::HashMap<String, String>,
        now_ms: i64,
    ) -> Result<LinkClaims, LinkError> {
        let get = |k: &str| params.get(k).filter(|v| !v.is_empty());
        let (Some(w), Some(u), Some(i), Some(p), Some(e), Some(s)) =
            (get("w"), get("u"), get("i"), get("p"), get("e"), get("s"))
        else {
            return Err(LinkError::Malformed);
        };
        let exp: i64 = e.parse().map_err(|_| LinkError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| LinkError::BadSignature)?;
        let claims = LinkClaims {
            workspace: w.clone(),
            user_name: u.clone(),
            issuer: i.clone(),
            subject: p.clone(),
        };
        self.mac(&claims, exp)
            .verify_slice(&sig)
            .map_err(|_| LinkError::BadSignature)?;
        if exp <= now_ms / 1000 {
            return Err(LinkError::Expired);
        }
        Ok(claims)
    }

    /// The redirect URI registered with the workspace's OAuth app.
    pub fn redirect_uri(&self) -> String {
        let mut url = self.public_url.clone();
        url.set_path(&format!(
            "{}/oauth/callback",
            self.public_url.path().trim_end_matches('/')
        ));
        url.set_query(None);
        url.into()
    }
}

impl U2m {
    /// The signed link where the user consents, bound to the verified principal.
    pub fn consent_link(
        &self,
        workspace: &str,
        user_name: &str,
        issuer: &str,
        subject: &str,
    ) -> String {
        self.links.link(
            &LinkClaims {
                workspace: workspace.to_string(),
                user_name: user_name.to_string(),
                issuer: issuer.to_string(),
                subject: subject.to_string(),
            },
            now_ms(),
        )
    }
}

// === Postgres connections ===

/// A few reusable connections; a transaction needs a connection of its own.
struct Pool {
    target: PgTarget,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
}

struct Pooled<'a> {
    pool: &'a Pool,
    client: Option<Client>,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    async fn get(&self) -> Result<Pooled<'_>, BrokerError> {
        let permit = tokio::time::timeout(CONNECT_TIMEOUT, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| BrokerError::Unavailable("postgres busy"))?
            .map_err(|_| BrokerError::Unavailable("postgres"))?;
        let idle = self
            .idle
            .lock()
            .ok()
            .and_then(|mut v| std::iter::from_fn(|| v.pop()).find(|c| !c.is_closed()));
        let client = match idle {
            Some(c) => c,
            None => self
                .target
                .connect(CONNECT_TIMEOUT, "aegis-u2m")
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "u2m: cannot connect to postgres");
                    BrokerError::Unavailable("postgres")
                })?,
        };
        Ok(Pooled {
            pool: self,
            client: Some(client),
            _permit: permit,
        })
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.is_closed() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    idle.push(c);
                }
            }
        }
    }
}

impl Pooled<'_> {
    fn client(&mut self) -> Result<&mut Client, BrokerError> {
        self.client
            .as_mut()
            .ok_or(BrokerError::Unavailable("postgres"))
    }
}

fn pg_err(e: tokio_postgres::Error) -> BrokerError {
    tracing::warn!(error = %crate::pg::error_text(&e), "u2m: postgres statement failed");
    BrokerError::Unavailable("postgres")
}

// === The stored grant ===

/// The sealed content of a row.
#[derive(Serialize, Deserialize)]
struct Grant {
    /// Refresh token.
    r: String,
    /// Newest access token and its expiry / issue time (unix ms).
    a: String,
    x: i64,
    n: i64,
}

impl Drop for Grant {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.r);
        zeroize::Zeroize::zeroize(&mut self.a);
    }
}

impl Grant {
    /// Whether the stored access token is worth handing out rather than refreshing.
    fn access_fresh(&self, now: i64) -> bool {
        let lifetime = (self.x - self.n).max(0);
        self.x - now > (lifetime / 2).min(60_000)
    }
}

/// How a token call failed.
enum TokenCallError {
    /// `invalid_grant`: the code or refresh token is no longer valid.
    InvalidGrant,
    Broker(BrokerError),
}

async fn token_call(
    http: &reqwest::Client,
    url: url::Url,
    body: String,
) -> Result<TokenReply, TokenCallError> {
    let resp = post_form(http, url, body).await.map_err(|e| {
        tracing::warn!(error = %e, "u2m: token endpoint request failed");
        TokenCallError::Broker(BrokerError::Unavailable("token endpoint"))
    })?;
    match token_reply(resp).await {
        Ok(reply) => Ok(reply),
        Err(BrokerError::Rejected(code)) if code == "invalid_grant" => {
            Err(TokenCallError::InvalidGrant)
        }
        Err(e) => Err(TokenCallError::Broker(e)),
    }
}

/// Which grant: a principal in a workspace and the user name it consented as.
struct GrantOf<'a> {
    workspace: &'a str,
    issuer: &'a str,
    subject: &'a str,
    user_name: &'a str,
}

/// The `WHERE` clause of a revocation: every principal of a user name, or one of them.
const BY_NAME: &str = "workspace = $1 AND user_name = $2";
const BY_PRINCIPAL: &str = "workspace = $1 AND user_name = $2 AND issuer = $3 AND subject = $4";

async fn by_principals(
    client: &Client,
    statement: &str,
    workspace: &str,
    user_name: &str,
    narrow: Option<(&str, &str)>,
) -> Result<u64, tokio_postgres::Error> {
    match narrow {
        None => {
            client
                .execute(
                    &format!("{statement} WHERE {BY_NAME}"),
                    &[&workspace, &user_name],
                )
                .await
        }
        Some((iss, sub)) => {
            client
                .execute(
                    &format!("{statement} WHERE {BY_PRINCIPAL}"),
                    &[&workspace, &user_name, &iss, &sub],
                )
                .await
        }
    }
}

/// Marks the stored access tokens of a user name's principals (or one) unusable.
pub async fn discard_access(
    client: &Client,
    workspace: &str,
    user_name: &str,
    narrow: Option<(&str, &str)>,
) -> Result<u64, tokio_postgres::Error> {
    by_principals(
        client,
        "UPDATE aegis_u2m_grants SET access_discarded = true, updated_at = now()",
        workspace,
        user_name,
        narrow,
    )
    .await
}

/// Deletes the grants of a user name's principals (or one).
pub async fn forget(
    client: &Client,
    workspace: &str,
    user_name: &str,
    narrow: Option<(&str, &str)>,
) -> Result<u64, tokio_postgres::Error> {
    by_principals(
        client,
        "DELETE FROM aegis_u2m_grants",
        workspace,
        user_name,
        narrow,
    )
    .await
}

// === U2m ===

/// The U2M token source: stored grants, consent links, pending consents.
pub struct U2m {
    pool: Pool,
    sealer: Sealer,
    http: reqwest::Client,
    redis: Arc<RedisLink>,
    links: ConsentLinks,
}

/// A consent that was started and not yet finished, as kept in Redis.
#[derive(Serialize, Deserialize)]
struct Pending {
    /// PKCE verifier.
    v: String,
    w: String,
    u: String,
    i: String,
    /// The principal's subject.
    p: String,
    /// Browser binding (the cookie's value).
    b: String,
}

impl Drop for Pending {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.v);
        zeroize::Zeroize::zeroize(&mut self.b);
    }
}

/// Where `/oauth/start` sends the browser, and the cookie that binds the callback to it.
pub struct Started {
    pub authorize_url: String,
    pub binding: SecretString,
}

/// Why a consent callback stored nothing. The `Display` text is shown to the user: it names
/// no token, code or internal error.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("this sign-in expired or was already used; start again from the consent link")]
    UnknownState,
    #[error("this sign-in was started in another browser; start again from the consent link")]
    WrongBrowser,
    #[error("the workspace refused the sign-in; start again from the consent link")]
    Refused,
    #[error("the workspace granted no refresh token (is offline_access allowed for the app?)")]
    NoRefreshToken,
    #[error(
        "you signed in to Databricks as a different user than the one your identity maps to; \
         sign in as {expected}"
    )]
    WrongUser { expected: String },
    #[error("a service aegis depends on is unavailable; try again in a moment")]
    Unavailable,
    #[error("this consent link was used too often; retry your request to get a new one")]
    TooManyStarts,
}

impl U2m {
    pub fn new(
        postgres: PgTarget,
        cache_key: &Key32,
        public_url: url::Url,
        http: reqwest::Client,
        redis: Arc<RedisLink>,
    ) -> U2m {
        U2m {
            pool: Pool {
                target: postgres,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            },
            sealer: Sealer::new(cache_key),
            http,
            redis,
            links: ConsentLinks::new(cache_key, public_url),
        }
    }

    pub fn links(&self) -> &ConsentLinks {
        &self.links
    }

    /// AAD of a stored grant: the principal and the user name it consented as.
    fn aad(p: &GrantOf<'_>) -> Vec<u8> {
        let mut aad = b"aegis.u2m.v2".to_vec();
        for part in [p.workspace, p.issuer, p.subject, p.user_name] {
            aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
        aad
    }

    fn seal(&self, g: &Grant, p: &GrantOf<'_>) -> Result<Vec<u8>, BrokerError> {
        let mut plain = serde_json::to_vec(g).map_err(|_| BrokerError::Unavailable("seal"))?;
        let sealed = self.sealer.seal(&plain, &Self::aad(p));
        zeroize::Zeroize::zeroize(&mut plain);
        sealed.ok_or(BrokerError::Unavailable("seal"))
    }

    fn open(&self, sealed: &[u8], p: &GrantOf<'_>) -> Option<Grant> {
        let mut plain = self.sealer.open(sealed, &Self::aad(p))?;
        let g = serde_json::from_slice(&plain).ok();
        zeroize::Zeroize::zeroize(&mut plain);
        g
    }

    fn token_url(ws: &WorkspaceConfig) -> Result<url::Url, BrokerError> {
        ws.url
            .join("/oidc/v1/token")
            .map_err(|_| BrokerError::Unavailable("workspace url"))
    }

    /// The principal's access token: the stored one while fresh, else a refresh. Runs on its
    /// own task so that, once the refresh request is sent, the rotated token is always stored.
    pub async fn access_token(
        self: &Arc<Self>,
        ws: &WorkspaceConfig,
        identity: &Identity,
    ) -> Result<Minted, BrokerError> {
        if ws.token_source != TokenSourceKind::U2m {
            return Err(BrokerError::Unavailable("not a u2m workspace"));
        }
        let this = self.clone();
        let ws = ws.clone();
        let (issuer, subject, user) = (
            identity.issuer.to_string(),
            identity.subject.clone(),
            identity.user_name.clone(),
        );
        tokio::spawn(async move {
            let p = GrantOf {
                workspace: &ws.name,
                issuer: &issuer,
                subject: &subject,
                user_name: &user,
            };
            this.refresh_locked(&ws, &p).await
        })
        .await
        .unwrap_or(Err(BrokerError::Unavailable("u2m refresh task")))
    }

    async fn refresh_locked(
        &self,
        ws: &WorkspaceConfig,
        p: &GrantOf<'_>,
    ) -> Result<Minted, BrokerError> {
        let mut conn = self.pool.get().await?;
        let client = conn.client()?;
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; \
             SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'"
        ))
        .await
        .map_err(pg_err)?;
        let row = tx
            .query_opt(
                "SELECT sealed, user_name, access_discarded FROM aegis_u2m_grants \
                 WHERE workspace = $1 AND issuer = $2 AND subject = $3 FOR UPDATE",
                &[&p.workspace, &p.issuer, &p.subject],
            )
            .await
            .map_err(pg_err)?;
        let Some(row) = row else {
            return Err(BrokerError::ConsentRequired);
        };
        let sealed: Vec<u8> = row.get(0);
        let consented_as: String = row.get(1);
        let discarded: bool = row.get(2);
        if consented_as != p.user_name {
            // The principal now maps to another user name than the one that consented: that
            // consent does not cover the new name.
            tracing::warn!(workspace = %ws.name, "u2m: the principal's user name changed since consent; consent needed");
            return Err(BrokerError::ConsentRequired);
        }
        let Some(grant) = self.open(&sealed, p) else {
            // Sealed under another cache key (rotated), or tampered with: unusable.
            tracing::warn!(workspace = %ws.name, "u2m: a stored grant does not open; consent needed");
            return Err(BrokerError::ConsentRequired);
        };
        let now = now_ms();
        if !discarded && grant.access_fresh(now) {
            // Another replica refreshed while we waited for the row.
            return Ok(Minted {
                token: SecretString::new(grant.a.clone()),
                expires_in: ((grant.x - now) / 1000).max(0) as u64,
            });
        }

        let client_id = ws.client_id.as_deref().unwrap_or_default();
        let body = form_encode(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &grant.r),
            ("client_id", client_id),
        ]);
        let result = token_call(&self.http, Self::token_url(ws)?, body).await;
        match result {
            Ok(set) => {
                let issued = now_ms();
                let next = Grant {
                    // A server that does not rotate keeps the old refresh token valid.
                    r: match &set.refresh {
                        Some(r) => r.expose().to_string(),
                        None => grant.r.clone(),
                    },
                    a: set.access.expose().to_string(),
                    x: issued.saturating_add((set.expires_in as i64).saturating_mul(1000)),
                    n: issued,
                };
                let sealed = self.seal(&next, p)?;
                let stored = async {
                    tx.execute(
                        "UPDATE aegis_u2m_grants SET sealed = $4, key_id = $5, \
                         access_discarded = false, generation = generation + 1, \
                         updated_at = now() \
                         WHERE workspace = $1 AND issuer = $2 AND subject = $3",
                        &[
                            &p.workspace,
                            &p.issuer,
                            &p.subject,
                            &sealed,
                            &self.sealer.key_id(),
                        ],
                    )
                    .await?;
                    tx.commit().await
                }
                .await;
                if let Err(e) = stored {
                    // The old refresh token is spent and the new one is lost: the user must
                    // consent again. Nothing else is safe.
                    tracing::error!(
                        workspace = %ws.name,
                        error = %crate::pg::error_text(&e),
                        "u2m: could not store a rotated refresh token"
                    );
                    return Err(BrokerError::Unavailable("postgres"));
                }
                metrics::counter!("aegis_u2m_refreshes_total", "outcome" => "ok").increment(1);
                Ok(Minted {
                    token: set.access,
                    expires_in: set.expires_in,
                })
            }
            Err(TokenCallError::InvalidGrant) => {
                metrics::counter!("aegis_u2m_refreshes_total", "outcome" => "invalid_grant")
                    .increment(1);
                tracing::info!(workspace = %ws.name, "u2m: refresh token rejected; consent needed");
                tx.execute(
                    "DELETE FROM aegis_u2m_grants \
                     WHERE workspace = $1 AND issuer = $2 AND subject = $3",
                    &[&p.workspace, &p.issuer, &p.subject],
                )
                .await
                .map_err(pg_err)?;
                tx.commit().await.map_err(pg_err)?;
                Err(BrokerError::ConsentRequired)
            }
            Err(TokenCallError::Broker(e)) => {
                metrics::counter!("aegis_u2m_refreshes_total", "outcome" => "error").increment(1);
                Err(e)
            }
        }
    }

    /// Discards the stored access tokens of the principals that map to `user_name` (or only
    /// `narrow` = (issuer, subject)): their next request refreshes. The number of grants.
    pub async fn discard_access(
        &self,
        workspace: &str,
        user_name: &str,
        narrow: Option<(&str, &str)>,
    ) -> Result<u64, BrokerError> {
        let mut conn = self.pool.get().await?;
        discard_access(conn.client()?, workspace, user_name, narrow)
            .await
            .map_err(pg_err)
    }

    /// Deletes the grants of the principals that map to `user_name` (or only `narrow`); the
    /// number deleted.
    pub async fn forget(
        &self,
        workspace: &str,
        user_name: &str,
        narrow: Option<(&str, &str)>,
    ) -> Result<u64, BrokerError> {
        let mut conn = self.pool.get().await?;
        forget(conn.client()?, workspace, user_name, narrow)
            .await
            .map_err(pg_err)
    }

    // --- consent ---

    /// The Redis key of a pending sign-in. `state` is `<link id>.<random>`, so the key lands
    /// in its link's hash slot; anything else names no key.
    fn pending_key(state: &str) -> Option<String> {
        let (link, _) = state.split_once('.')?;
        if link.len() != 32 || !link.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let h = Sha256::digest(state.as_bytes());
        Some(format!("{LINK_PREFIX}{{{link}}}:state:{}", hex::encode(h)))
    }

    /// Starts a consent for a verified link (`link_id` from [`ConsentLinks::link_id`]): stores
    /// the PKCE verifier under a fresh `state`, which replaces any sign-in this link started
    /// before, and returns the workspace authorize URL. A link starts at most
    /// [`MAX_STARTS_PER_LINK`] sign-ins.
    pub async fn start(
        &self,
        ws: &WorkspaceConfig,
        claims: &LinkClaims,
        link_id: &str,
    ) -> Result<Started, CallbackError> {
        let (challenge, verifier) = oauth2::PkceCodeChallenge::new_random_sha256();
        let state = oauth2::CsrfToken::new(format!(
            "{link_id}.{}",
            oauth2::CsrfToken::new_random().secret()
        ));
        let binding = oauth2::CsrfToken::new_random();
        let pending = Pending {
            v: verifier.secret().to_string(),
            w: claims.workspace.clone(),
            u: claims.user_name.clone(),
            i: claims.issuer.clone(),
            p: claims.subject.clone(),
            b: binding.secret().to_string(),
        };
        let key = Self::pending_key(state.secret()).ok_or(CallbackError::Unavailable)?;
        let mut plain = serde_json::to_vec(&pending).map_err(|_| CallbackError::Unavailable)?;
        let sealed = self.sealer.seal(&plain, key.as_bytes());
        zeroize::Zeroize::zeroize(&mut plain);
        let sealed = sealed.ok_or(CallbackError::Unavailable)?;
        let link_keys = format!("{LINK_PREFIX}{{{link_id}}}:");
        let ttl = CONSENT_TTL.as_millis().to_string();
        let limit = MAX_STARTS_PER_LINK.to_string();
        let started: i64 = self
            .redis
            .script(
                &redis::Script::new(START_SCRIPT),
                &[
                    &format!("{link_keys}starts"),
                    &format!("{link_keys}pending"),
                    &key,
                ],
                &[&sealed, ttl.as_bytes(), limit.as_bytes()],
            )
            .await
            .map_err(|_| CallbackError::Unavailable)?;
        if started < 0 {
            return Err(CallbackError::TooManyStarts);
        }

        let mut url = ws
            .url
            .join("/oidc/v1/authorize")
            .map_err(|_| CallbackError::Unavailable)?;
        url.query_pairs_mut()
            .append_pair("client_id", ws.client_id.as_deref().unwrap_or_default())
            .append_pair("redirect_uri", &self.links.redirect_uri())
            .append_pair("response_type", "code")
            .append_pair("scope", &scopes(ws))
            .append_pair("state", state.secret())
            .append_pair("code_challenge", challenge.as_str())
            .append_pair("code_challenge_method", "S256")
            .append_pair("login_hint", &claims.user_name);
        Ok(Started {
            authorize_url: url.into(),
            binding: SecretString::new(binding.secret().to_string()),
        })
    }

    /// Finishes a consent: the code is exchanged, SCIM `Me` must name the user the link was
    /// for, and only then is the grant stored. Returns the workspace and user name.
    pub async fn finish(
        &self,
        workspaces: &[WorkspaceConfig],
        code: &str,
        state: &str,
        binding: Option<&str>,
    ) -> Result<LinkClaims, CallbackError> {
        let key = Self::pending_key(state).ok_or(CallbackError::UnknownState)?;
        let sealed = self
            .redis
            .get(&key)
            .await
            .map_err(|_| CallbackError::Unavailable)?
            .ok_or(CallbackError::UnknownState)?;
        let mut plain = self
            .sealer
            .open(&sealed, key.as_bytes())
            .ok_or(CallbackError::UnknownState)?;
        let pending: Option<Pending> = serde_json::from_slice(&plain).ok();
        zeroize::Zeroize::zeroize(&mut plain);
        let pending = pending.ok_or(CallbackError::UnknownState)?;
        let bound = binding.is_some_and(|b| {
            use subtle::ConstantTimeEq;
            bool::from(b.as_bytes().ct_eq(pending.b.as_bytes()))
        });
        if !bound {
            // Checked before the state is consumed: a request without the browser's cookie
            // cannot burn the user's sign-in.
            return Err(CallbackError::WrongBrowser);
        }
        let consumed: i64 = self
            .redis
            .script(&redis::Script::new(CONSUME_SCRIPT), &[&key], &[&sealed])
            .await
            .map_err(|_| CallbackError::Unavailable)?;
        if consumed != 1 {
            // Another callback with the same state won the race.
            return Err(CallbackError::UnknownState);
        }
        let ws = workspaces
            .iter()
            .find(|w| w.name == pending.w && w.token_source == TokenSourceKind::U2m)
            .ok_or(CallbackError::UnknownState)?;

        let token_url = Self::token_url(ws).map_err(|_| CallbackError::Unavailable)?;
        let redirect_uri = self.links.redirect_uri();
        let body = form_encode(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &redirect_uri),
            ("code_verifier", &pending.v),
            ("client_id", ws.client_id.as_deref().unwrap_or_default()),
        ]);
        let set = match token_call(&self.http, token_url, body).await {
            Ok(set) => set,
            Err(TokenCallError::InvalidGrant)
            | Err(TokenCallError::Broker(BrokerError::Rejected(_))) => {
                return Err(CallbackError::Refused)
            }
            Err(TokenCallError::Broker(_)) => return Err(CallbackError::Unavailable),
        };
        let Some(refresh) = set.refresh.as_ref() else {
            return Err(CallbackError::NoRefreshToken);
        };

        // Who actually consented? Only that user's tokens may be stored for this user.
        let consented = self.scim_me(ws, &set.access).await?;
        if !consented.eq_ignore_ascii_case(&pending.u) {
            tracing::warn!(
                workspace = %ws.name,
                "u2m: consent by a different Databricks user than the IdP user maps to; refused"
            );
            return Err(CallbackError::WrongUser {
                expected: pending.u.clone(),
            });
        }

        let issued = now_ms();
        let grant = Grant {
            r: refresh.expose().to_string(),
            a: set.access.expose().to_string(),
            x: issued.saturating_add((set.expires_in as i64).saturating_mul(1000)),
            n: issued,
        };
        let principal = GrantOf {
            workspace: &ws.name,
            issuer: &pending.i,
            subject: &pending.p,
            user_name: &pending.u,
        };
        let sealed = self
            .seal(&grant, &principal)
            .map_err(|_| CallbackError::Unavailable)?;
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|_| CallbackError::Unavailable)?;
        conn.client()
            .map_err(|_| CallbackError::Unavailable)?
            .execute(
                "INSERT INTO aegis_u2m_grants \
                 (workspace, issuer, subject, user_name, sealed, key_id) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (workspace, issuer, subject) DO UPDATE SET \
                 user_name = EXCLUDED.user_name, sealed = EXCLUDED.sealed, \
                 key_id = EXCLUDED.key_id, access_discarded = false, \
                 generation = aegis_u2m_grants.generation + 1, updated_at = now()",
                &[
                    &ws.name,
                    &pending.i,
                    &pending.p,
                    &pending.u,
                    &sealed,
                    &self.sealer.key_id(),
                ],
            )
            .await
            .map_err(|e| {
                pg_err(e);
                CallbackError::Unavailable
            })?;
        tracing::info!(workspace = %ws.name, "u2m: consent stored");
        Ok(LinkClaims {
            workspace: ws.name.clone(),
            user_name: pending.u.clone(),
            issuer: pending.i.clone(),
            subject: pending.p.clone(),
        })
    }

    /// The `userName` of the token's owner.
    async fn scim_me(
        &self,
        ws: &WorkspaceConfig,
        token: &SecretString,
    ) -> Result<String, CallbackError> {
        #[derive(Deserialize)]
        struct Me {
            #[serde(rename = "userName")]
            user_name: String,
        }
        let url = ws
            .url
            .join("/api/2.0/preview/scim/v2/Me")
            .map_err(|_| CallbackError::Unavailable)?;
        let resp = self
            .http
            .get(url)
            .bearer_auth(token.expose())
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| {
                tracing::warn!(error = %without_url(e), "u2m: scim me failed");
                CallbackError::Unavailable
            })?;
        if !resp.status().is_success() {
            return Err(CallbackError::Refused);
        }
        let body = read_body(resp)
            .await
            .map_err(|_| CallbackError::Unavailable)?;
        serde_json::from_slice::<Me>(&body)
            .map(|m| m.user_name)
            .map_err(|_| CallbackError::Refused)
    }
}

/// The workspace's scopes plus `offline_access` (needed for a refresh token).
fn scopes(ws: &WorkspaceConfig) -> String {
    let mut s: Vec<&str> = ws.scopes.iter().map(String::as_str).collect();
    if !s.contains(&"offline_access") {
        s.push("offline_access");
    }
    s.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn links() -> ConsentLinks {
        ConsentLinks::new(
            &Key32::from_bytes([3u8; 32]),
            url::Url::parse("https://aegis.example.com/base/").unwrap(),
        )
    }

    fn claims() -> LinkClaims {
        LinkClaims {
            workspace: "prod".into(),
            user_name: "alice@example.com".into(),
            issuer: "https://idp.example.com".into(),
            subject: "u-alice".into(),
        }
    }

    fn params(link: &str) -> HashMap<String, String> {
        url::Url::parse(link)
            .unwrap()
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    #[test]
    fn a_link_verifies_for_what_it_names_until_it_expires() {
        let l = links();
        let now = 1_700_000_000_000;
        let link = l.link(&claims(), now);
        assert!(link.starts_with("https://aegis.example.com/base/oauth/start?"));
        assert_eq!(l.verify(&params(&link), now).unwrap(), claims());
        let later = now + CONSENT_TTL.as_millis() as i64 + 1000;
        assert_eq!(l.verify(&params(&link), later), Err(LinkError::Expired));
        assert_eq!(
            l.redirect_uri(),
            "https://aegis.example.com/base/oauth/callback"
        );
    }

    #[test]
    fn a_changed_link_does_not_verify() {
        let l = links();
        let now = 1_700_000_000_000;
        let good = params(&l.link(&claims(), now));
        for (k, v) in [
            ("u", "bob@example.com"),
            ("w", "other"),
            ("i", "https://evil.example.com"),
            ("p", "mallory"),
            ("e", "99999999999"),
            ("s", "AAAA"),
        ] {
            let mut p = good.clone();
            p.insert(k.into(), v.into());
            assert!(l.verify(&p, now).is_err(), "{k} changed but verified");
        }
        let mut p = good.clone();
        p.remove("s");
        assert_eq!(l.verify(&p, now), Err(LinkError::Malformed));
        // Another cache key signs other links.
        let other = ConsentLinks::new(
            &Key32::from_bytes([4u8; 32]),
            url::Url::parse("https://aegis.example.com/base/").unwrap(),
        );
        assert_eq!(other.verify(&good, now), Err(LinkError::BadSignature));
    }

    #[test]
    fn the_stored_access_token_is_reused_only_while_fresh() {
        let g = Grant {
            r: "r".into(),
            a: "a".into(),
            n: 0,
            x: 3_600_000,
        };
        assert!(g.access_fresh(0));
        assert!(g.access_fresh(3_500_000));
        assert!(!g.access_fresh(3_540_000));
        let short = Grant {
            r: "r".into(),
            a: "a".into(),
            n: 0,
            x: 10_000,
        };
        assert!(short.access_fresh(4_000));
        assert!(!short.access_fresh(5_000));
    }

    #[test]
    fn offline_access_is_always_requested() {
        let mut ws = WorkspaceConfig {
            name: "prod".into(),
            url: url::Url::parse("https://dbc-1.cloud.databricks.com").unwrap(),
            hosts: vec![],
            token_source: TokenSourceKind::U2m,
            client_id: Some("app".into()),
            scopes: vec!["all-apis".into()],
            allowed_agents: None,
            issuers: None,
            rate_limits: Default::default(),
            tenant_id: None,
            entra_token_url: None,
            client_secret: None,
        };
        assert_eq!(scopes(&ws), "all-apis offline_access");
        ws.scopes = vec!["all-apis".into(), "offline_access".into()];
        assert_eq!(scopes(&ws), "all-apis offline_access");
    }
}
