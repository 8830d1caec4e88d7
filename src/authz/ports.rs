//! The pipeline's ports, implemented by the adapters, and the adapters' errors mapped to the
//! stable deny reasons. Kept here so that identity, broker and audit never speak the wire
//! contract: they report what went wrong in their own terms, and only `authz` decides which
//! [`Reason`] (status, deny text) that becomes.

use std::sync::Arc;

use super::{Audit, ConsentLink, Identify, Reason, Tokens};
use crate::audit::{AuditChain, AuditError, Draft};
use crate::broker::u2m::U2m;
use crate::broker::{Broker, BrokerError, DbToken};
use crate::config::WorkspaceConfig;
use crate::identity::{Identity, IdentityError, Validator};

impl Identify for Arc<Validator> {
    async fn identify(&self, token: &str) -> Result<Arc<Identity>, IdentityError> {
        self.validate(token).await
    }
}

impl Tokens for Arc<Broker> {
    async fn token(
        &self,
        workspace: &WorkspaceConfig,
        identity: &Identity,
        subject_token: &str,
    ) -> Result<Arc<DbToken>, BrokerError> {
        self.get(workspace, identity, subject_token).await
    }
}

impl Audit for Arc<AuditChain> {
    async fn append(&self, draft: Draft) -> Result<u64, AuditError> {
        AuditChain::append(self, draft).await
    }
}

impl ConsentLink for U2m {
    fn consent_url(
        &self,
        workspace: &str,
        user_name: &str,
        issuer: &str,
        subject: &str,
    ) -> Option<String> {
        Some(self.consent_link(workspace, user_name, issuer, subject))
    }
}

impl From<&IdentityError> for Reason {
    fn from(e: &IdentityError) -> Reason {
        match e {
            IdentityError::Malformed(_) | IdentityError::Rejected(_) => Reason::InvalidToken,
            IdentityError::Expired => Reason::TokenExpired,
            IdentityError::UntrustedIssuer => Reason::UntrustedIssuer,
            IdentityError::NoUsername => Reason::NoDatabricksIdentity,
            IdentityError::KeysUnavailable => Reason::DependencyUnavailable,
        }
    }
}

impl From<&BrokerError> for Reason {
    fn from(e: &BrokerError) -> Reason {
        match e {
            BrokerError::Unavailable(_) => Reason::DependencyUnavailable,
            BrokerError::RateLimited { .. } => Reason::RateLimited,
            BrokerError::Rejected(_) => Reason::TokenExchangeRejected,
            BrokerError::ConsentRequired => Reason::ConsentRequired,
        }
    }
}
