//! WireGuard keys: 32 bytes, written as standard base64 (44 characters), the format of
//! `wg genkey` / `wg pubkey`. Pure.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A Curve25519 public key. Not secret: printed and logged freely.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64")]
    Base64,
    #[error("decodes to {0} bytes, a key has 32")]
    Length(usize),
}

pub fn decode_key(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

pub fn encode_key(k: &[u8; 32]) -> String {
    STANDARD.encode(k)
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode_key(s).map(PublicKey)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode_key(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A Curve25519 private key. Never printed: `Debug` hides it.
#[derive(Clone)]
pub struct PrivateKey(pub [u8; 32]);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<secret>)")
    }
}

impl PrivateKey {
    /// A new random key, clamped as `wg genkey` prints it.
    pub fn generate() -> PrivateKey {
        use rand_core::RngCore;
        let mut k = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut k);
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        PrivateKey(k)
    }

    pub fn public(&self) -> PublicKey {
        let secret = boringtun::x25519::StaticSecret::from(self.0);
        PublicKey(boringtun::x25519::PublicKey::from(&secret).to_bytes())
    }

    pub fn to_base64(&self) -> String {
        encode_key(&self.0)
    }

    /// The key of slot `slot` of pool `pool`, derived from the pool's 32-byte secret (what
    /// `appliance provision` keeps and the pool's user-data carries): SHA-256 over a label,
    /// the secret, the pool name and the slot, clamped. Every member of the pool can derive
    /// every slot key of its pool, and no key of anything else (README "Trust model").
    pub fn for_slot(secret: &[u8; 32], pool: &str, slot: u32) -> PrivateKey {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"appliance pool slot key v1\0");
        h.update(secret);
        h.update(pool.as_bytes());
        h.update([0]);
        h.update(slot.to_be_bytes());
        let mut k: [u8; 32] = h.finalize().into();
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        PrivateKey(k)
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode_key(s).map(PrivateKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_base64() {
        let s = "6cj1RvbVBWr0NVyNHRuy8hK7mnHS6+DtmnOfUM+bX30=";
        assert_eq!(s.parse::<PublicKey>().unwrap().to_string(), s);
    }

    #[test]
    fn public_key_matches_wg_pubkey_for_a_known_pair() {
        // Pair made with `wg genkey | tee k | wg pubkey` (wireguard-tools 1.0.20210914).
        let private: PrivateKey = "AKJjz/CfPmr/9gHKILEiAShBWbid0apMxtuByI43EGc="
            .parse()
            .unwrap();
        assert_eq!(
            private.public().to_string(),
            "1nE7Va0QzFM6HwnWNX6LFyqkPZDBqPd1ib73nKyCE2Y="
        );
    }

    #[test]
    fn generated_keys_are_clamped_like_wg_genkey() {
        let k = PrivateKey::generate();
        assert_eq!(k.0[0] & 7, 0);
        assert_eq!(k.0[31] & 0xc0, 0x40);
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }

    #[test]
    fn short_and_garbled_keys_are_refused_with_the_reason() {
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyError::Length(3)));
        assert_eq!("not base64!".parse::<PublicKey>(), Err(KeyError::Base64));
    }
}
