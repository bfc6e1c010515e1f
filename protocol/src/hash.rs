//! The sha256 digest as it travels: 64 lowercase hex characters, validated on parse so that a
//! `Sha256Hex` in hand is always well formed (it is used in URLs and as a file name).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Hex(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashError {
    #[error("invalid sha256 {0:?}: expected 64 lowercase hex characters")]
    Invalid(String),
}

impl Sha256Hex {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_digest(Sha256::digest(bytes).into())
    }

    pub fn from_digest(digest: [u8; 32]) -> Self {
        Sha256Hex(hex::encode(digest))
    }

    /// The digest of nothing: the data hash of an empty manifest.
    pub fn empty() -> Self {
        Self::of(b"")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Sha256Hex {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Sha256Hex(s.to_owned()))
        } else {
            Err(HashError::Invalid(s.chars().take(80).collect()))
        }
    }
}

impl TryFrom<String> for Sha256Hex {
    type Error = HashError;
    fn try_from(s: String) -> Result<Self, HashError> {
        s.parse()
    }
}

impl From<Sha256Hex> for String {
    fn from(h: Sha256Hex) -> String {
        h.0
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Hex({})", &self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        assert_eq!(
            Sha256Hex::of(b"abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "abc",
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
            "../../../../etc/passwd0000000000000000000000000000000000000000000",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015adX",
        ] {
            assert!(bad.parse::<Sha256Hex>().is_err(), "{bad:?} accepted");
        }
        assert!(serde_json::from_str::<Sha256Hex>("\"zz\"").is_err());
    }
}
