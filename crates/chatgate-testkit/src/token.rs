//! Tokens for tests and the bench: valid ones minted with the gateway's own
//! [`chatgate::auth::Auth`], and crafted bad ones (wrong secret, `alg: none`, expired).

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

/// A token for `user` signed with `secret`, valid for `ttl`.
pub fn mint(secret: &str, user: &str, ttl: Duration) -> anyhow::Result<String> {
    Ok(chatgate::auth::Auth::new(secret.as_bytes()).mint(user, ttl)?)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// HS256 token with arbitrary claims signed with `secret`.
pub fn signed(secret: &[u8], claims: Value) -> String {
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).expect("HS256 signs")
}

/// A well-formed token signed with the wrong secret.
pub fn forged(user: &str) -> String {
    signed(b"not-the-secret", json!({ "userId": user, "exp": unix_now() + 3600 }))
}

/// `{"alg":"none"}` with a valid-looking payload and no signature.
pub fn alg_none(user: &str) -> String {
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64(json!({ "userId": user, "exp": unix_now() + 3600 }).to_string().as_bytes());
    format!("{header}.{payload}.")
}

/// A token correctly signed with `secret` that expired a minute ago.
pub fn expired(secret: &str, user: &str) -> String {
    signed(secret.as_bytes(), json!({ "userId": user, "iat": unix_now() - 120, "exp": unix_now() - 60 }))
}

/// Base64url without padding.
fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}
