//! Types that hold secrets and cannot be printed.
//!
//! Keys and tokens live in these wrappers from the moment they are read until they are used, so
//! a stray `{:?}` in a log line, an error message or a panic prints `[redacted]` instead of the
//! secret. None of them implements `Display` or `Serialize`.

use std::fmt;

use base64::Engine;
use zeroize::Zeroize;

/// A 32-byte symmetric key (audit HMAC, cache AEAD) or Ed25519 seed.
#[derive(Clone)]
pub struct Key32([u8; 32]);

impl Key32 {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Key32(bytes)
    }

    /// Decodes standard base64 text (surrounding whitespace ignored) holding exactly 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, &'static str> {
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| "is not valid standard base64")?;
        if raw.len() != 32 {
            let len_ok = raw.is_empty();
            raw.zeroize();
            return Err(if len_ok {
                "is empty"
            } else {
                "must decode to exactly 32 bytes"
            });
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&raw);
        raw.zeroize();
        Ok(Key32(key))
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short, non-reversible identifier of the key (first 8 bytes of its SHA-256, in hex).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.0);
        hex::encode(&digest[..8])
    }

    /// Generates a fresh random key.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Key32(key)
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

impl Drop for Key32 {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Key32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key32([redacted])")
    }
}

/// A secret string: a bearer token, a console password, a refresh token.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: String) -> Self {
        SecretString(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Short SHA-256 fingerprint (first 8 bytes), safe to log and to audit.
    pub fn fingerprint(&self) -> [u8; 8] {
        fingerprint(self.0.as_bytes())
    }
}

impl Drop for SecretString {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// First 8 bytes of SHA-256 of `data`.
pub fn fingerprint(data: &[u8]) -> [u8; 8] {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(data);
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_secret() {
        let key = Key32::from_bytes([7u8; 32]);
        assert_eq!(format!("{key:?}"), "Key32([redacted])");
        let token = SecretString::new("dapi-secret-value".into());
        assert!(!format!("{token:?}").contains("secret-value"));
    }

    #[test]
    fn base64_keys_must_be_32_bytes() {
        let good = Key32::generate().to_base64();
        assert!(Key32::from_base64(&format!("  {good}\n")).is_ok());
        assert_eq!(
            Key32::from_base64("AAAA").unwrap_err(),
            "must decode to exactly 32 bytes"
        );
        assert_eq!(Key32::from_base64("").unwrap_err(), "is empty");
        assert_eq!(
            Key32::from_base64("not base64!").unwrap_err(),
            "is not valid standard base64"
        );
    }
}
