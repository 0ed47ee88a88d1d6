//! HS256 JSON Web Tokens: minting (`chatgate token`) and verifying (HTTP and `/ws`).
//!
//! A token names its user with `userId` (string or number) or `sub`, and must
//! carry `exp`. Only HS256 is accepted: `alg: none`, other algorithms, forged
//! signatures, expired and not-yet-valid tokens are refused.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value, json};

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    /// Forged, malformed, another algorithm, no `exp`, …: the detail (the
    /// library's words) goes to the debug log, never to the client.
    #[error("invalid token")]
    Invalid(String),
    #[error("token names no user (userId or sub)")]
    NoUser,
    #[error("cannot sign token: {0}")]
    Sign(String),
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
}

impl Identity {
    /// Time left before the token expires (zero when already past).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.expires_at.saturating_sub(unix_now()))
    }
}

/// Whether a `userId` string names a user: not blank, and no NUL (which
/// PostgreSQL text cannot store). Kept verbatim: " alice" is not "alice".
pub fn names_a_user(user_id: &str) -> bool {
    !user_id.trim().is_empty() && !user_id.contains('\0')
}

/// Signs and verifies tokens with one HS256 secret.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Auth {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        Auth { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), validation }
    }

    /// A random 256-bit secret, hex encoded (the embedded default without `--jwt-secret`).
    pub fn random_secret() -> String {
        let bytes: [u8; 32] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A token for `user_id` valid for `ttl`.
    pub fn mint(&self, user_id: &str, ttl: Duration) -> Result<String, AuthError> {
        let now = unix_now();
        let claims = json!({ "userId": user_id, "iat": now, "exp": now + ttl.as_secs().max(1) });
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Sign(e.to_string()))
    }

    /// Verifies a token and names its user.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &self.decoding, &self.validation).map_err(|e| match e
                .kind()
            {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => {
                    tracing::debug!(error = %e, "token refused");
                    AuthError::Invalid(e.to_string())
                }
            })?;
        let claims = data.claims;
        let user_id = [claims.get("userId"), claims.get("sub")]
            .into_iter()
            .flatten()
            .find_map(|v| match v {
                Value::String(s) if names_a_user(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .ok_or(AuthError::NoUser)?;
        // A NumericDate may have a fraction (RFC 7519 §2): the socket expires at its whole second.
        let expires_at = claims
            .get("exp")
            .and_then(|exp| {
                exp.as_u64().or_else(|| exp.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f as u64))
            })
            .unwrap_or(0);
        Ok(Identity { user_id, expires_at })
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The secret kept in `path` (trailing newline dropped), made first (a random
/// one, mode 0600, never overwritten) when the file does not exist. Returns
/// the secret and whether it was made now.
pub fn stored_secret(path: &std::path::Path) -> std::io::Result<(String, bool)> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let secret = Auth::random_secret();
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(mut file) => {
            file.write_all(format!("{secret}\n").as_bytes())?;
            file.sync_all()?;
            Ok((secret, true))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let kept = std::fs::read_to_string(path)?;
            let kept = kept.trim_end_matches(['\n', '\r']).to_string();
            if kept.is_empty() {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"));
            }
            Ok((kept, false))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], alg: Algorithm, claims: Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn accepts_user_id_string_number_and_sub() {
        let auth = Auth::new(b"s");
        let exp = unix_now() + 60;
        assert_eq!(
            auth.verify(&sign(b"s", Algorithm::HS256, json!({"userId": "u1", "exp": exp}))).unwrap().user_id,
            "u1"
        );
        assert_eq!(
            auth.verify(&sign(b"s", Algorithm::HS256, json!({"userId": 42, "exp": exp}))).unwrap().user_id,
            "42"
        );
        assert_eq!(auth.verify(&sign(b"s", Algorithm::HS256, json!({"sub": "u2", "exp": exp}))).unwrap().user_id, "u2");
        assert_eq!(auth.verify(&auth.mint("u3", Duration::from_secs(60)).unwrap()).unwrap().user_id, "u3");
    }

    #[test]
    fn a_fractional_exp_is_its_whole_second() {
        let auth = Auth::new(b"s");
        let exp = unix_now() + 60;
        let identity =
            auth.verify(&sign(b"s", Algorithm::HS256, json!({"userId": "u", "exp": exp as f64 + 0.75}))).unwrap();
        assert_eq!(identity.expires_at, exp);
        assert!(identity.remaining() > Duration::from_secs(50), "{:?}", identity.remaining());
    }

    #[test]
    fn refuses_bad_tokens() {
        let auth = Auth::new(b"s");
        let exp = unix_now() + 60;
        let forged = sign(b"other", Algorithm::HS256, json!({"userId": "u", "exp": exp}));
        let expired = sign(b"s", Algorithm::HS256, json!({"userId": "u", "exp": unix_now() - 5}));
        let no_exp = sign(b"s", Algorithm::HS256, json!({"userId": "u"}));
        let hs512 = sign(b"s", Algorithm::HS512, json!({"userId": "u", "exp": exp}));
        let not_yet = sign(b"s", Algorithm::HS256, json!({"userId": "u", "exp": exp, "nbf": unix_now() + 30}));
        let no_user = sign(b"s", Algorithm::HS256, json!({"exp": exp}));
        // alg: none — header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJ1c2VySWQiOiJ1IiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        for token in [forged, no_exp, hs512, none.to_string(), "garbage".into()] {
            let refused = auth.verify(&token);
            assert!(matches!(refused, Err(AuthError::Invalid(_))), "{token}");
            // The client is told no more than that.
            assert_eq!(refused.unwrap_err().to_string(), "invalid token");
        }
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
        assert_eq!(auth.verify(&not_yet), Err(AuthError::NotYetValid));
        assert_eq!(auth.verify(&no_user), Err(AuthError::NoUser));
        let nul_user = sign(b"s", Algorithm::HS256, json!({"userId": "a\u{0}b", "exp": exp}));
        assert_eq!(auth.verify(&nul_user), Err(AuthError::NoUser));
        let padded = sign(b"s", Algorithm::HS256, json!({"userId": " u ", "exp": exp}));
        assert_eq!(auth.verify(&padded).unwrap().user_id, " u ");
        assert_eq!(auth.verify(""), Err(AuthError::Missing));
    }

    #[test]
    fn a_stored_secret_is_made_once_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chatgate.secret");
        let (first, made) = stored_secret(&path).unwrap();
        assert!(made && first.len() == 64);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(stored_secret(&path).unwrap(), (first, false));
        std::fs::write(&path, "").unwrap();
        assert!(stored_secret(&path).is_err(), "an empty secret file is refused");
    }
}
