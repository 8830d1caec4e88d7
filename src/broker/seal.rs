//! Tokens at rest in Redis are sealed with XChaCha20-Poly1305 under the cache key; the key id is
//! stored beside the ciphertext and the Redis key name is the AAD, so a value copied to another
//! user's key does not open.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::secret::Key32;

/// AEAD for cache values.
pub struct Sealer {
    aead: XChaCha20Poly1305,
    key_id: String,
}

const SEAL_VERSION: u8 = 1;

impl Sealer {
    pub fn new(key: &Key32) -> Sealer {
        Sealer {
            aead: XChaCha20Poly1305::new(key.expose().into()),
            key_id: key.fingerprint(),
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// `version || len(key_id) || key_id || nonce || ciphertext`, AAD = `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        use rand::RngCore;
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .ok()?;
        let mut out = Vec::with_capacity(2 + self.key_id.len() + 24 + ct.len());
        out.push(SEAL_VERSION);
        out.push(self.key_id.len() as u8);
        out.extend_from_slice(self.key_id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Some(out)
    }

    /// Opens a sealed value; `None` for another key id, another AAD, or any tampering.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEAL_VERSION {
            return None;
        }
        let (&kid_len, rest) = rest.split_first()?;
        let kid_len = kid_len as usize;
        if rest.len() < kid_len + 24 {
            return None;
        }
        let (kid, rest) = rest.split_at(kid_len);
        if kid != self.key_id.as_bytes() {
            return None;
        }
        let (nonce, ct) = rest.split_at(24);
        self.aead
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_are_bound_to_key_and_aad() {
        let s = Sealer::new(&Key32::generate());
        let sealed = s.seal(b"token", b"aegis:v1:tok:a:alice").unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"token"));
        assert_eq!(s.open(&sealed, b"aegis:v1:tok:a:alice").unwrap(), b"token");
        assert!(s.open(&sealed, b"aegis:v1:tok:a:bob").is_none());
        let other = Sealer::new(&Key32::generate());
        assert!(other.open(&sealed, b"aegis:v1:tok:a:alice").is_none());
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(s.open(&flipped, b"aegis:v1:tok:a:alice").is_none());
    }
}
