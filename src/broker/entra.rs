//! Microsoft Entra on-behalf-of (OBO) for Azure Databricks: the user's IdP JWT (an Entra access
//! token whose audience is aegis' app) is exchanged with the `jwt-bearer` grant for an Entra
//! token scoped to the Azure Databricks resource, which the workspace accepts as a bearer token.
//!
//! aegis authenticates as a confidential client (`client_id` + `client_secret_file`). Errors map
//! as for token federation: 429 → `rate_limited` with the endpoint's `Retry-After`, 5xx and
//! timeouts → `dependency_unavailable`, 4xx (`invalid_grant`, `interaction_required`, ...) →
//! `token_exchange_rejected`.

use super::federation::{form_encode, parse_response};
use super::{BrokerError, Minted};
use crate::config::WorkspaceConfig;
use crate::http::post_form;

pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The Azure Databricks resource (a fixed, well-known application id in every tenant).
pub const AZURE_DATABRICKS_SCOPE: &str = "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d/.default";

/// The token endpoint: `entra_token_url`, else the tenant's v2.0 endpoint.
pub fn token_url(ws: &WorkspaceConfig) -> Option<url::Url> {
    if let Some(u) = &ws.entra_token_url {
        return Some(u.clone());
    }
    let tenant = ws.tenant_id.as_deref()?;
    url::Url::parse(&format!(
        "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
    ))
    .ok()
}

/// Exchanges the user's assertion for their Azure Databricks token.
pub async fn exchange(
    http: &reqwest::Client,
    ws: &WorkspaceConfig,
    assertion: &str,
) -> Result<Minted, BrokerError> {
    // Config validation requires all three for entra_obo; a gap here is a bug, refused.
    let (Some(url), Some(client_id), Some(secret)) = (
        token_url(ws),
        ws.client_id.as_deref(),
        ws.client_secret.as_ref(),
    ) else {
        return Err(BrokerError::Unavailable("entra obo is not configured"));
    };
    let body = form_encode(&[
        ("grant_type", GRANT_JWT_BEARER),
        ("client_id", client_id),
        ("client_secret", secret.expose()),
        ("assertion", assertion),
        ("scope", AZURE_DATABRICKS_SCOPE),
        ("requested_token_use", "on_behalf_of"),
    ]);
    let resp = post_form(http, url, body).await.map_err(|e| {
        tracing::warn!(workspace = %ws.name, error = %e, "entra obo request failed");
        BrokerError::Unavailable("entra token endpoint")
    })?;
    parse_response(resp).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenSourceKind;

    fn ws(tenant: Option<&str>, url: Option<&str>) -> WorkspaceConfig {
        WorkspaceConfig {
            name: "azure".into(),
            url: url::Url::parse("https://adb-1.azuredatabricks.net").unwrap(),
            hosts: vec![],
            token_source: TokenSourceKind::EntraObo,
            client_id: Some("app".into()),
            scopes: vec!["all-apis".into()],
            allowed_agents: None,
            issuers: None,
            rate_limits: Default::default(),
            tenant_id: tenant.map(str::to_string),
            entra_token_url: url.map(|u| url::Url::parse(u).unwrap()),
            client_secret: None,
        }
    }

    #[test]
    fn the_token_url_defaults_to_the_tenant_endpoint() {
        assert_eq!(
            token_url(&ws(Some("contoso.onmicrosoft.com"), None))
                .unwrap()
                .as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(
            token_url(&ws(
                Some("t"),
                Some("http://127.0.0.1:9/t/oauth2/v2.0/token")
            ))
            .unwrap()
            .as_str(),
            "http://127.0.0.1:9/t/oauth2/v2.0/token"
        );
        assert!(token_url(&ws(None, None)).is_none());
    }

    #[tokio::test]
    async fn a_workspace_without_a_secret_is_refused_without_a_request() {
        let http = reqwest::Client::new();
        let err = exchange(&http, &ws(Some("t"), None), "jwt")
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::Unavailable(_)));
    }
}
