//! The stable deny reason codes and what each one means on the wire.

/// Why a request was denied. The `code()` strings are a public contract: operators' alerts and
/// scripts match on them, so they are never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    MissingCredentials,
    InvalidToken,
    TokenExpired,
    UntrustedIssuer,
    AgentNotAllowed,
    PathBlocked,
    UnknownWorkspace,
    NoDatabricksIdentity,
    ConsentRequired,
    TokenExchangeRejected,
    RateLimited,
    DependencyUnavailable,
    /// The CheckRequest itself was malformed (no HTTP attributes).
    BadRequest,
    /// SQL an agent may not run (it changes permissions, or cannot be told apart from SQL that
    /// does), on any SQL path aegis reads.
    StatementBlocked,
    /// An MCP tool an agent may not call.
    ToolBlocked,
}

impl Reason {
    pub const ALL: [Reason; 15] = [
        Reason::MissingCredentials,
        Reason::InvalidToken,
        Reason::TokenExpired,
        Reason::UntrustedIssuer,
        Reason::AgentNotAllowed,
        Reason::PathBlocked,
        Reason::UnknownWorkspace,
        Reason::NoDatabricksIdentity,
        Reason::ConsentRequired,
        Reason::TokenExchangeRejected,
        Reason::RateLimited,
        Reason::DependencyUnavailable,
        Reason::BadRequest,
        Reason::StatementBlocked,
        Reason::ToolBlocked,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::MissingCredentials => "missing_credentials",
            Reason::InvalidToken => "invalid_token",
            Reason::TokenExpired => "token_expired",
            Reason::UntrustedIssuer => "untrusted_issuer",
            Reason::AgentNotAllowed => "agent_not_allowed",
            Reason::PathBlocked => "path_blocked",
            Reason::UnknownWorkspace => "unknown_workspace",
            Reason::NoDatabricksIdentity => "no_databricks_identity",
            Reason::ConsentRequired => "consent_required",
            Reason::TokenExchangeRejected => "token_exchange_rejected",
            Reason::RateLimited => "rate_limited",
            Reason::DependencyUnavailable => "dependency_unavailable",
            Reason::BadRequest => "bad_request",
            Reason::StatementBlocked => "statement_blocked",
            Reason::ToolBlocked => "tool_blocked",
        }
    }

    /// HTTP status: 401 for credential problems, 403 for policy, 429/503 for limits and outages.
    pub fn status(self) -> u16 {
        match self {
            Reason::MissingCredentials
            | Reason::InvalidToken
            | Reason::TokenExpired
            | Reason::UntrustedIssuer
            | Reason::ConsentRequired
            | Reason::TokenExchangeRejected => 401,
            Reason::AgentNotAllowed
            | Reason::PathBlocked
            | Reason::UnknownWorkspace
            | Reason::NoDatabricksIdentity
            | Reason::StatementBlocked
            | Reason::ToolBlocked => 403,
            Reason::RateLimited => 429,
            Reason::DependencyUnavailable => 503,
            Reason::BadRequest => 400,
        }
    }

    /// Human text for the deny body. Fixed strings: never an internal error, token or key.
    pub fn message(self) -> &'static str {
        match self {
            Reason::MissingCredentials => {
                "a bearer token from a trusted identity provider is required"
            }
            Reason::InvalidToken => "the bearer token is not valid",
            Reason::TokenExpired => "the bearer token has expired",
            Reason::UntrustedIssuer => {
                "the bearer token was not issued by a trusted identity provider"
            }
            Reason::AgentNotAllowed => {
                "this agent application is not allowed to reach this workspace"
            }
            Reason::PathBlocked => "agents may not call this API under the gateway's policy",
            Reason::UnknownWorkspace => "no Databricks workspace is configured for this request",
            Reason::NoDatabricksIdentity => "the token does not name a Databricks user",
            Reason::ConsentRequired => "the user must consent to Databricks access first",
            Reason::TokenExchangeRejected => "Databricks refused to issue a token for this user",
            Reason::RateLimited => "too many requests; retry later",
            Reason::DependencyUnavailable => {
                "the identity gateway cannot serve this request safely right now; retry later"
            }
            Reason::BadRequest => "the request could not be understood",
            Reason::StatementBlocked => {
                "agents may not run SQL that changes permissions under the gateway's policy"
            }
            Reason::ToolBlocked => "agents may not call this MCP tool under the gateway's policy",
        }
    }

    /// True for the 401 family, which carries `WWW-Authenticate`.
    pub fn is_credential_problem(self) -> bool {
        self.status() == 401
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_statuses_follow_the_contract() {
        let mut codes: Vec<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), Reason::ALL.len());
        assert_eq!(Reason::MissingCredentials.status(), 401);
        assert_eq!(Reason::PathBlocked.status(), 403);
        assert_eq!(Reason::RateLimited.status(), 429);
        assert_eq!(Reason::DependencyUnavailable.status(), 503);
    }
}
