//! Wire and API types shared by the synchub hub and its agents.
//!
//! This crate is pure: serde types, the manifest's one canonical encoding and hash, the pack
//! stream format and path validation. No I/O and no async runtime, so both sides (and any other
//! program that wants to talk to a hub) can depend on it without pulling in a server.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod api;
pub mod bounds;
pub mod collision;
pub mod delta;
pub mod error_chain;
pub mod frames;
pub mod hash;
pub mod held;
pub mod manifest;
pub mod pack;
pub mod path;

pub use api::*;
pub use bounds::{BoundError, MAX_BLOBS_PER_QUERY, MAX_MESSAGE_LEN};
pub use collision::{PathCollision, check_collisions};
pub use delta::{DELTA_CONTENT_TYPE, DeltaError, ManifestDelta};
pub use error_chain::error_chain;
pub use frames::*;
pub use hash::{HashError, Sha256Hex};
pub use held::{HeldChange, HeldDecision, HeldRecord};
pub use manifest::{Manifest, ManifestEntry, ManifestError};
pub use path::{PathError, validate_path};

/// Version of the WebSocket protocol carried in `hello` and `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The space key system 1 already bumps in `sync_metadata`; the hub's default space.
pub const DEFAULT_SPACE: &str = "global_version";

/// Longest accepted space name, in bytes.
pub const MAX_SPACE_LEN: usize = 64;

/// Checks a space name: 1..=64 bytes of ASCII letters, digits, `_`, `-` and `.`.
pub fn validate_space(space: &str) -> Result<(), PathError> {
    let ok = !space.is_empty()
        && space.len() <= MAX_SPACE_LEN
        && space
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && space != "."
        && space != "..";
    if ok {
        Ok(())
    } else {
        Err(PathError::InvalidSpace(space.chars().take(80).collect()))
    }
}
