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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_base64() {
        let s = "6cj1RvbVBWr0NVyNHRuy8hK7mnHS6+DtmnOfUM+bX30=";
        assert_eq!(s.parse::<PublicKey>().unwrap().to_string(), s);
    }

    #[test]
    fn short_and_garbled_keys_are_refused_with_the_reason() {
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyError::Length(3)));
        assert_eq!("not base64!".parse::<PublicKey>(), Err(KeyError::Base64));
    }
}
