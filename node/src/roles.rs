//! Role tokens: who may read and change what.
//!
//! Every API token has one role. Roles are ordered, each one allowed what
//! the one below it is:
//!
//! - `viewer`: read licenses, models, history, usage, cluster status, the
//!   dashboard, metrics and the lineage graph;
//! - `auditor`: also read and export the audit log;
//! - `admin`: also change anything (licenses, models, keys, membership,
//!   exceptions).
//!
//! Tokens are kept only as SHA-256 digests; a lookup compares digests, so its
//! timing says nothing about the token.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a token may do. `Viewer < Auditor < Admin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read configuration, status, the dashboard and metrics.
    Viewer,
    /// A viewer that may also read the audit log.
    Auditor,
    /// May do everything.
    Admin,
}

impl Role {
    /// Whether a token of this role may do what `needed` may.
    pub fn permits(self, needed: Role) -> bool {
        self >= needed
    }

    /// The role's name as written in settings and error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request was not authorized.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No bearer token, or one no role holds.
    #[error("missing or invalid token")]
    Unauthenticated,
    /// A known token whose role is below the one needed.
    #[error("token `{actor}` has role {has}; this needs {needed}")]
    Forbidden {
        /// The token's actor name.
        actor: String,
        /// The token's role.
        has: Role,
        /// The role the call needs.
        needed: Role,
    },
}

/// An authenticated caller: the actor name recorded in history and its role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's actor name.
    pub actor: String,
    /// The token's role.
    pub role: Role,
}

/// The tokens a node accepts, by digest.
#[derive(Clone, Debug, Default)]
pub struct TokenSet {
    entries: Vec<([u8; 32], Principal)>,
}

impl TokenSet {
    /// Builds the set from `(actor, plain token, role)`; only digests are kept.
    pub fn new<'a>(tokens: impl IntoIterator<Item = (&'a str, &'a str, Role)>) -> Self {
        let entries = tokens
            .into_iter()
            .map(|(actor, token, role)| {
                (
                    Sha256::digest(token.trim().as_bytes()).into(),
                    Principal {
                        actor: actor.to_string(),
                        role,
                    },
                )
            })
            .collect();
        Self { entries }
    }

    /// The caller an `authorization` header value (`Bearer <token>`) names.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<&Principal, AuthError> {
        let token = authorization
            .map(str::trim)
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or(AuthError::Unauthenticated)?;
        self.authenticate_token(token)
    }

    /// The caller a plain token names (one sent other than as a bearer
    /// header, e.g. from the dashboard's sign-in form).
    pub fn authenticate_token(&self, token: &str) -> Result<&Principal, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Unauthenticated);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.entries
            .iter()
            .find(|(hash, _)| *hash == digest)
            .map(|(_, p)| p)
            .ok_or(AuthError::Unauthenticated)
    }

    /// The caller, if its token holds at least `needed`.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        needed: Role,
    ) -> Result<Principal, AuthError> {
        Self::permit(self.authenticate(authorization)?, needed)
    }

    /// The caller of a plain token, if it holds at least `needed`.
    pub fn authorize_token(&self, token: &str, needed: Role) -> Result<Principal, AuthError> {
        Self::permit(self.authenticate_token(token)?, needed)
    }

    fn permit(p: &Principal, needed: Role) -> Result<Principal, AuthError> {
        if p.role.permits(needed) {
            Ok(p.clone())
        } else {
            Err(AuthError::Forbidden {
                actor: p.actor.clone(),
                has: p.role,
                needed,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> TokenSet {
        TokenSet::new([
            ("ops", "tga_admin", Role::Admin),
            ("audit", "tga_audit", Role::Auditor),
            ("grafana", "tga_view", Role::Viewer),
        ])
    }

    #[test]
    fn each_role_permits_itself_and_those_below() {
        assert!(Role::Admin.permits(Role::Auditor) && Role::Admin.permits(Role::Viewer));
        assert!(Role::Auditor.permits(Role::Viewer) && !Role::Auditor.permits(Role::Admin));
        assert!(!Role::Viewer.permits(Role::Auditor) && !Role::Viewer.permits(Role::Admin));
    }

    #[test]
    fn a_token_gets_its_role_and_no_more() {
        let s = set();
        let p = s.authorize(Some("Bearer tga_view"), Role::Viewer);
        assert_eq!(p.map(|p| p.actor), Ok("grafana".to_string()));
        assert_eq!(
            s.authorize(Some("Bearer tga_view"), Role::Auditor),
            Err(AuthError::Forbidden {
                actor: "grafana".into(),
                has: Role::Viewer,
                needed: Role::Auditor
            })
        );
        assert!(matches!(
            s.authorize(Some("Bearer tga_audit"), Role::Admin),
            Err(AuthError::Forbidden { .. })
        ));
        assert!(s.authorize(Some("Bearer tga_admin"), Role::Admin).is_ok());
    }

    #[test]
    fn missing_wrong_or_malformed_tokens_are_unauthenticated() {
        let s = set();
        for h in [
            None,
            Some(""),
            Some("Bearer "),
            Some("tga_admin"),
            Some("Bearer nope"),
            Some("Basic tga_admin"),
        ] {
            assert_eq!(
                s.authorize(h, Role::Viewer),
                Err(AuthError::Unauthenticated),
                "{h:?}"
            );
        }
    }

    #[test]
    fn a_plain_token_is_authorized_like_a_bearer_one() {
        let s = set();
        assert_eq!(
            s.authorize_token(" tga_view\n", Role::Viewer)
                .map(|p| p.actor),
            Ok("grafana".to_string())
        );
        assert!(matches!(
            s.authorize_token("tga_view", Role::Admin),
            Err(AuthError::Forbidden { .. })
        ));
        for t in ["", "  ", "nope", "Bearer tga_view"] {
            assert_eq!(
                s.authorize_token(t, Role::Viewer),
                Err(AuthError::Unauthenticated),
                "{t:?}"
            );
        }
    }
}
