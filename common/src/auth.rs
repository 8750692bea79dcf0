//! JWTs as API.md defines them: HS256, claims `sub`, `role`, `exp`.

use crate::domain::{Role, UserId};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The claims floodgate reads. `sub` is checked as a [`UserId`] on decode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: UserId,
    pub role: Role,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: UserId,
    pub role: Role,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Verifies tokens with one secret; cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// The caller, or why the token is refused (for logs, not for the response body).
    pub fn verify(&self, token: &str) -> Result<Caller, jsonwebtoken::errors::Error> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        Ok(Caller {
            user: data.claims.sub,
            role: data.claims.role,
        })
    }
}

/// Mints a token for `user` with `role`, valid for `ttl`.
pub fn mint(secret: &str, user: &UserId, role: Role, ttl: Duration) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    mint_expiring_at(secret, user, role, now + ttl.as_secs())
}

/// Mints a token whose `exp` is `exp` (seconds since the Unix epoch), even in the past.
pub fn mint_expiring_at(secret: &str, user: &UserId, role: Role, exp: u64) -> String {
    let claims = Claims {
        sub: user.clone(),
        role,
        exp,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding of plain claims cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef-test";

    #[test]
    fn round_trip_and_rejections() {
        let alice = UserId::parse("alice").unwrap();
        let v = Verifier::new(SECRET);
        let t = mint(SECRET, &alice, Role::Customer, Duration::from_secs(60));
        let c = v.verify(&t).unwrap();
        assert_eq!(c.user, alice);
        assert!(!c.is_admin());
        let forged = mint(
            "another-secret-of-16+",
            &alice,
            Role::Admin,
            Duration::from_secs(60),
        );
        assert!(v.verify(&forged).is_err());
        assert!(v.verify("not-a-token").is_err());
    }
}
