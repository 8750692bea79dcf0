//! JWTs as API.md defines them: HS256, claims `sub`, `role`, `exp`; `nbf` is honoured when
//! present, and `iss`/`aud` are required when configured. Clock skew of up to [`LEEWAY_SECS`]
//! is allowed on `exp` and `nbf`. Several secrets may verify (rotation); the first signs.

use crate::{
    Config,
    config::Secret,
    domain::{Role, UserId},
};
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
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// A string or an array of strings (RFC 7519); checked by the validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
}

/// Seconds of clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: UserId,
    pub role: Role,
    /// The token's `exp`: a stream opened with it is closed once it passes.
    pub expires_at: u64,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// A manager or an admin: catalog and stock work.
    pub fn can_manage(&self) -> bool {
        matches!(self.role, Role::Manager | Role::Admin)
    }

    /// A customer or an admin: placing orders (a manager's token is for stock work).
    pub fn can_order(&self) -> bool {
        matches!(self.role, Role::Customer | Role::Admin)
    }
}

/// Verifies tokens with every configured secret; cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<DecodingKey>,
    validation: Validation,
}

impl Verifier {
    /// One secret, no `iss`/`aud` requirement.
    pub fn new(secret: &str) -> Self {
        Self::build([secret], None, None)
    }

    /// The secrets, issuer and audience of `cfg`.
    pub fn from_config(cfg: &Config) -> Self {
        Self::build(
            cfg.jwt_verify_secrets.iter().map(Secret::expose),
            cfg.jwt_issuer.as_deref(),
            cfg.jwt_audience.as_deref(),
        )
    }

    fn build<'a>(
        secrets: impl IntoIterator<Item = &'a str>,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        // Without a configured audience, a token that names one is refused (it was meant
        // for someone else): jsonwebtoken's default.
        if let Some(aud) = audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Self {
            keys: secrets
                .into_iter()
                .map(|s| DecodingKey::from_secret(s.as_bytes()))
                .collect(),
            validation,
        }
    }

    /// The caller, or why the token is refused (for logs, not for the response body).
    /// Each secret is tried in turn while the signature is what fails.
    pub fn verify(&self, token: &str) -> Result<Caller, jsonwebtoken::errors::Error> {
        let mut last = jsonwebtoken::errors::ErrorKind::InvalidSignature.into();
        for key in &self.keys {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(data) => {
                    return Ok(Caller {
                        user: data.claims.sub,
                        role: data.claims.role,
                        expires_at: data.claims.exp,
                    });
                }
                Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }
}

/// Mints a token for `user` with `role`, valid for `ttl`.
pub fn mint(secret: &str, user: &UserId, role: Role, ttl: Duration) -> String {
    mint_expiring_at(secret, user, role, now_secs() + ttl.as_secs())
}

/// Mints a token whose `exp` is `exp` (seconds since the Unix epoch), even in the past.
pub fn mint_expiring_at(secret: &str, user: &UserId, role: Role, exp: u64) -> String {
    encode(
        secret,
        &Claims {
            sub: user.clone(),
            role,
            exp,
            nbf: None,
            iss: None,
            aud: None,
        },
    )
}

/// Mints a token as `cfg` verifies them: signed with its first secret, with its issuer
/// and audience, valid from now for `ttl`.
pub fn mint_for(cfg: &Config, user: &UserId, role: Role, ttl: Duration) -> String {
    let now = now_secs();
    encode(
        cfg.jwt_secret.expose(),
        &Claims {
            sub: user.clone(),
            role,
            exp: now + ttl.as_secs(),
            nbf: Some(now),
            iss: cfg.jwt_issuer.clone(),
            aud: cfg.jwt_audience.clone().map(serde_json::Value::String),
        },
    )
}

/// Signs any claims (tests forge odd ones with it).
pub fn encode(secret: &str, claims: &Claims) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding of plain claims cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef-test-0123456789abcdef";

    #[test]
    fn round_trip_and_rejections() {
        let alice = UserId::parse("alice").unwrap();
        let v = Verifier::new(SECRET);
        let t = mint(SECRET, &alice, Role::Customer, Duration::from_secs(60));
        let c = v.verify(&t).unwrap();
        assert_eq!(c.user, alice);
        assert!(!c.is_admin());
        let forged = mint(
            "another-secret-of-32-bytes-or-more-1234",
            &alice,
            Role::Admin,
            Duration::from_secs(60),
        );
        assert!(v.verify(&forged).is_err());
        assert!(v.verify("not-a-token").is_err());
    }

    fn config(pairs: &[(&str, &str)]) -> Config {
        let map: std::collections::HashMap<_, _> = pairs.iter().copied().collect();
        Config::from_lookup(|k| map.get(k).map(|v| v.to_string())).unwrap()
    }

    const NEW: &str = "the-new-secret-that-signs-from-now-on";
    const OLD: &str = "the-old-secret-still-verifying-a-while";

    #[test]
    fn the_first_secret_signs_and_every_secret_verifies() {
        let alice = UserId::parse("alice").unwrap();
        let both = config(&[("FLOODGATE_JWT_SECRET", &format!("{NEW},{OLD}"))]);
        let v = Verifier::from_config(&both);
        let hour = Duration::from_secs(3600);
        assert!(v.verify(&mint(OLD, &alice, Role::Admin, hour)).is_ok());
        let fresh = mint_for(&both, &alice, Role::Admin, hour);
        assert!(v.verify(&fresh).is_ok());
        // Once the old secret is dropped, its tokens stop verifying; new ones still do.
        let only_new = Verifier::from_config(&config(&[("FLOODGATE_JWT_SECRET", NEW)]));
        assert!(only_new.verify(&fresh).is_ok());
        assert!(
            only_new
                .verify(&mint(OLD, &alice, Role::Admin, hour))
                .is_err()
        );
    }

    #[test]
    fn nbf_exp_iss_and_aud_are_checked() {
        let alice = UserId::parse("alice").unwrap();
        let v = Verifier::new(NEW);
        let claims = |nbf: Option<u64>, exp: u64| Claims {
            sub: alice.clone(),
            role: Role::Customer,
            exp,
            nbf,
            iss: None,
            aud: None,
        };
        let now = now_secs();
        // Not yet valid beyond the leeway: refused; within it: accepted.
        let early = encode(NEW, &claims(Some(now + 60), now + 120));
        assert_eq!(
            *v.verify(&early).unwrap_err().kind(),
            jsonwebtoken::errors::ErrorKind::ImmatureSignature
        );
        assert!(
            v.verify(&encode(NEW, &claims(Some(now + 2), now + 120)))
                .is_ok()
        );
        let expired = encode(NEW, &claims(None, now - 60));
        assert_eq!(
            *v.verify(&expired).unwrap_err().kind(),
            jsonwebtoken::errors::ErrorKind::ExpiredSignature
        );
        // A token for another audience is refused even when none is configured.
        let mut other = claims(None, now + 60);
        other.aud = Some(serde_json::json!("someone-else"));
        assert!(v.verify(&encode(NEW, &other)).is_err());

        // Configured issuer and audience: required, and minted tokens carry them.
        let strict = config(&[
            ("FLOODGATE_JWT_SECRET", NEW),
            ("FLOODGATE_JWT_ISSUER", "https://id.shop.example"),
            ("FLOODGATE_JWT_AUDIENCE", "floodgate"),
        ]);
        let v = Verifier::from_config(&strict);
        let ttl = Duration::from_secs(60);
        assert!(
            v.verify(&mint_for(&strict, &alice, Role::Customer, ttl))
                .is_ok()
        );
        assert!(v.verify(&mint(NEW, &alice, Role::Customer, ttl)).is_err());
        let mut wrong = claims(None, now + 60);
        wrong.iss = Some("https://elsewhere".into());
        wrong.aud = Some(serde_json::json!(["floodgate"]));
        assert!(v.verify(&encode(NEW, &wrong)).is_err());
        wrong.iss = Some("https://id.shop.example".into());
        assert!(
            v.verify(&encode(NEW, &wrong)).is_ok(),
            "aud may be an array"
        );
    }
}
