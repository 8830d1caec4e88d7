//! Dev-only local Databricks workspace and dev IdP for aegis tests and the demo.
//!
//! [`Sandbox::start`] serves two HTTP servers on loopback:
//!
//! - the **dev IdP** (`idp_url`, also the issuer): OIDC discovery, a JWKS with an RSA and an EC
//!   key, tokens for named users ([`Sandbox::mint_idp_token`], `POST /dev/token`), and browser
//!   sign-in with the authorization code flow and PKCE (`/authorize`, `/token`) for clients
//!   registered with [`Sandbox::register_oidc_client`];
//! - the **workspace** (`workspace_url`): `/oidc/v1/token` token exchange under a federation
//!   policy that trusts the dev IdP, the discovery documents, SCIM `Me`, and the SQL Statement
//!   Execution API over a fixture catalog with grants, a row filter and a column mask. It
//!   enforces permissions itself, as Databricks does, and logs every request
//!   ([`Sandbox::requests`], `GET /_sandbox/requests`), standing in for `system.access.audit`.
//!
//! See `sandbox/README.md` for the endpoints, the fixture and the response shapes.
//!
//! # Layout
//!
//! - `idp`: the dev IdP (keys, minting, federation-policy verification).
//! - `workspace`: the Databricks emulator: front-door authentication and the request log
//!   (`mod.rs`), `oauth`, `scim`, `statements`.
//! - `fixture`: users, groups, catalog, tables and data, grants, row filters, column masks.
//! - `sql`: parse, resolve, authorize, rewrite and execute SQL over SQLite.
//! - `stack`, `demo`: process orchestration for end-to-end tests and `make demo`.
//!
//! # Invariants
//!
//! - An IdP JWT is never accepted as a workspace credential; only tokens the workspace issued
//!   through `/oidc/v1/token` are, and only until they expire.
//! - Every table a statement touches is resolved and authorized before anything runs, and the
//!   engine can read nothing but the row-filtered, column-masked copies of those tables.
//! - Servers bind loopback addresses only.

#![forbid(unsafe_code)]

pub mod demo;
pub mod fixture;
mod idp;
mod sql;
pub mod stack;
mod util;
mod workspace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use fixture::WAREHOUSE_ID;
pub use idp::{IdTokenFault, JwksFault, OidcClient};
pub use workspace::entra::{
    AZURE_DATABRICKS_SCOPE, ENTRA_CLIENT_ID, ENTRA_CLIENT_SECRET, ENTRA_TENANT_ID,
};
pub use workspace::oauth::TokenFault;
pub use workspace::U2mCounts;

/// How long `shutdown` waits for the servers to finish in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// Lifetime of the Databricks access tokens `/oidc/v1/token` issues.
    pub token_ttl: Duration,
    /// The audience the workspace's federation policy accepts in subject tokens.
    pub federation_audience: String,
    /// Whether the token exchange accepts a subject whose email matches no fixture user, issuing
    /// a token for that email as a new user with no grants (load tests with thousands of users).
    /// Such users can mint tokens but the workspace's other APIs do not know them.
    pub auto_provision_users: bool,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            token_ttl: Duration::from_secs(3600),
            federation_audience: "aegis".to_string(),
            auto_provision_users: false,
        }
    }
}

/// What a dev IdP token says.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// Short name ("alice", "bob", "carol"); any string works and becomes `<user>@example.com`.
    /// A value containing `@` is used as the email as is.
    pub user: String,
    /// The calling agent application, put in `azp`.
    pub agent: String,
    /// `aud`.
    pub audience: String,
    /// Lifetime from now; negative makes an already-expired token.
    pub ttl_secs: i64,
    /// `None` means RS256. Also "ES256", and "RS384", "RS512", "PS256" (RSA key). For negative
    /// tests: "HS256" (signed with a secret no JWKS publishes), "none" (unsigned), and any other
    /// name, e.g. "ES384" (that `alg` in the header, the RSA key's `kid`, a random signature).
    pub alg: Option<String>,
    /// Merged last; overrides any standard claim.
    pub extra_claims: serde_json::Map<String, serde_json::Value>,
}

impl TokenRequest {
    pub fn new(user: &str) -> Self {
        TokenRequest {
            user: user.to_string(),
            agent: "copilot".to_string(),
            audience: "aegis".to_string(),
            ttl_secs: 300,
            alg: None,
            extra_claims: serde_json::Map::new(),
        }
    }
}

/// One request the workspace received, as its audit log would record it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RequestRecord {
    pub ts_ms: i64,
    pub method: String,
    /// Path and query as received.
    pub path: String,
    /// How many `Authorization` headers the request carried.
    pub authorization_count: usize,
    /// "none" | "databricks_token" | "idp_jwt" | "other".
    pub authorization_kind: String,
    /// A token this workspace issued, presented after its expiry.
    pub token_expired: bool,
    /// The Databricks user the token (or, for a token exchange, the subject) resolved to.
    pub user: Option<String>,
    /// Sandbox only (no Databricks audit field): for a token that came from a token exchange,
    /// the IdP principal (`iss#sub`) whose subject token was exchanged for it.
    #[serde(default)]
    pub subject: Option<String>,
    /// Sandbox only: which access token this workspace issued was presented (1 = the first).
    #[serde(default)]
    pub token_serial: Option<u64>,
    pub user_agent: Option<String>,
    /// From the user agent's `aegis-trace/<id>` product token.
    pub trace_id: Option<String>,
    /// Names of the `x-aegis-*` headers received (none should reach Databricks).
    pub x_aegis_headers: Vec<String>,
    /// Audit-log service name: "sql", "accounts", "oauth2", "workspace", ...
    pub service: String,
    /// Audit-log action name: "executeStatement", "me", "tokenExchange", ...
    pub action: String,
    pub status: u16,
}

/// The path of the second issuer the workspace's federation trusts: `{idp_url}/tenant-b`,
/// signing with the dev IdP's own keys (`{idp_url}/jwks`). Tokens for it are minted with
/// [`TokenRequest::extra_claims`] setting `iss`.
pub const SECOND_ISSUER_PATH: &str = "/tenant-b";

/// A running dev IdP and workspace. Dropping it stops the servers without waiting.
pub struct Sandbox {
    pub idp_url: String,
    pub workspace_url: String,
    idp: Arc<idp::IdpState>,
    workspace: Arc<workspace::WorkspaceState>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sandbox {
    /// Binds the IdP and the workspace each on 127.0.0.1:0 and serves them on tokio tasks.
    pub async fn start(opts: SandboxOptions) -> std::io::Result<Sandbox> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Sandbox::start_on(opts, any, any).await
    }

    /// Same on given addresses (the demo uses fixed ports). Both must be loopback addresses.
    pub async fn start_on(
        opts: SandboxOptions,
        idp: SocketAddr,
        workspace: SocketAddr,
    ) -> std::io::Result<Sandbox> {
        for addr in [idp, workspace] {
            if !addr.ip().is_loopback() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("the sandbox binds loopback addresses only, not {addr}"),
                ));
            }
        }
        let idp_listener = TcpListener::bind(idp).await?;
        let ws_listener = TcpListener::bind(workspace).await?;
        let idp_url = format!("http://{}", idp_listener.local_addr()?);
        let workspace_url = format!("http://{}", ws_listener.local_addr()?);

        let issuer = idp_url.clone();
        let idp_state = tokio::task::spawn_blocking(move || idp::IdpState::generate(issuer))
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
        let idp_state = Arc::new(idp_state);
        let ws_state = Arc::new(workspace::WorkspaceState::new(
            workspace_url.clone(),
            opts,
            idp_state.clone(),
        ));

        let (shutdown, _) = watch::channel(false);
        let tasks = vec![
            serve(
                idp_listener,
                // The Entra-shaped OBO endpoint shares the IdP's listener, as the directory.
                idp::router(idp_state.clone()).merge(workspace::entra::router(ws_state.clone())),
                shutdown.subscribe(),
                "idp",
            ),
            serve(
                ws_listener,
                workspace::router(ws_state.clone()),
                shutdown.subscribe(),
                "workspace",
            ),
        ];
        tracing::info!(%idp_url, %workspace_url, "sandbox started");
        Ok(Sandbox {
            idp_url,
            workspace_url,
            idp: idp_state,
            workspace: ws_state,
            shutdown,
            tasks,
        })
    }

    /// Signs an IdP access token (RS256 unless `req.alg` says otherwise).
    pub fn mint_idp_token(&self, req: &TokenRequest) -> String {
        match self.idp.mint(req) {
            Ok(token) => token,
            // Signing claims that serialize with keys generated at start cannot fail.
            Err(e) => unreachable!("the sandbox IdP failed to sign with its own key: {e}"),
        }
    }

    /// Registers a client for browser sign-in (`/authorize`, `/token`); replaces one of the
    /// same `client_id`.
    pub fn register_oidc_client(&self, client: OidcClient) {
        self.idp.oidc.register(client);
    }

    /// How long the IdP's authorization codes are good for (60 s unless changed).
    pub fn set_oidc_code_ttl(&self, ttl: Duration) {
        self.idp.oidc.set_code_ttl(ttl);
    }

    /// Makes the next ID tokens wrong on purpose (`IdTokenFault::None` restores them).
    pub fn set_id_token_fault(&self, fault: IdTokenFault) {
        self.idp.oidc.set_fault(fault);
    }

    /// Sets how the IdP's `GET /jwks` behaves (also `POST {idp}/dev/faults`).
    pub fn set_jwks_fault(&self, fault: JwksFault) {
        self.idp.set_jwks_fault(fault);
    }

    /// `GET /jwks` requests the IdP has served since it started.
    pub fn jwks_fetch_count(&self) -> u64 {
        self.idp.jwks_fetches()
    }

    /// The `kid`s of the IdP's RSA and EC signing keys.
    pub fn idp_key_ids(&self) -> (String, String) {
        self.idp.key_ids()
    }

    /// For attack tests: a compact JWS over exactly these header and payload bytes, signed with
    /// the IdP's RSA (`"RS256"`) or EC (`"ES256"`) key. Panics on any other `alg`.
    pub fn sign_idp_raw(&self, alg: &str, header: &[u8], payload: &[u8]) -> String {
        match self.idp.sign_raw(alg, header, payload) {
            Ok(t) => t,
            Err(e) => panic!("sign_idp_raw: {e}"),
        }
    }

    /// Sets how the workspace's `/oidc/v1/token` behaves.
    pub fn set_token_fault(&self, fault: TokenFault) {
        *self
            .workspace
            .token_fault
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = fault;
    }

    /// What the U2M grants did: codes redeemed, refreshes, replayed refresh tokens.
    pub fn u2m_counts(&self) -> U2mCounts {
        self.workspace.u2m.counts()
    }

    /// Revokes every U2M refresh token of a user (an admin revoking the app's consent).
    pub fn revoke_u2m_user(&self, user_name: &str) {
        self.workspace.u2m.revoke_user(user_name);
    }

    /// The Entra-shaped OBO token endpoint for [`ENTRA_TENANT_ID`].
    pub fn entra_token_url(&self) -> String {
        format!("{}/{ENTRA_TENANT_ID}/oauth2/v2.0/token", self.idp_url)
    }

    /// Sets how the Entra OBO endpoint behaves.
    pub fn set_entra_fault(&self, fault: TokenFault) {
        *self
            .workspace
            .entra
            .fault
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = fault;
    }

    /// Successful OBO exchanges for that Databricks user.
    pub fn entra_obo_count(&self, user_name: &str) -> u64 {
        self.workspace.entra.obo_count(user_name)
    }

    /// Requests the Entra OBO endpoint received, whatever their outcome.
    pub fn entra_requests(&self) -> u64 {
        self.workspace.entra.requests()
    }

    /// The workspace request log, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.workspace.requests()
    }

    pub fn clear_requests(&self) {
        self.workspace.clear_requests();
    }

    /// `/oidc/v1/token` requests received so far, counted on arrival (before any delay).
    pub fn token_requests(&self) -> u64 {
        self.workspace
            .token_requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Successful `/oidc/v1/token` exchanges for that Databricks user (e.g. "alice@example.com").
    pub fn exchange_count(&self, user_name: &str) -> u64 {
        self.workspace.exchange_count(user_name)
    }

    /// Stops both servers, waiting up to a few seconds for in-flight requests.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn serve(
    listener: TcpListener,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
    name: &'static str,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(server = name, error = %e, "sandbox server failed");
        }
    })
}
