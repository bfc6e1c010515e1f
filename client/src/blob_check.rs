//! The one check every byte from the hub passes before the agent keeps it: its sha256 and size
//! against what the head or manifest announced. Large blobs are checked as they stream in
//! (a resumed one from its first byte on disk), small ones from a pack as a whole, the
//! manifest against the head's `data_hash`; cache entries and tree files are checked on disk
//! the same way (a forced sync, the tree audit).

use crate::error::{ClientError, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use synchub_protocol::{Head, Sha256Hex};

/// Checks bytes as they arrive against the hash (and size, when known) they were announced
/// with; [`BlobCheck::finish`] says whether they were all there and right.
pub(crate) struct BlobCheck {
    subject: Subject,
    expected: Sha256Hex,
    size: Option<u64>,
    hasher: Sha256,
    received: u64,
}

/// What is being checked, for the error message.
enum Subject {
    Blob,
    Manifest { space: String, version: u64 },
}

impl BlobCheck {
    /// A blob of `size` bytes named by its hash.
    pub(crate) fn blob(sha256: &Sha256Hex, size: u64) -> Self {
        Self::new(Subject::Blob, sha256.clone(), Some(size))
    }

    /// The canonical manifest of `head`: its hash is the head's `data_hash`.
    pub(crate) fn manifest(head: &Head) -> Self {
        let subject = Subject::Manifest {
            space: head.space.clone(),
            version: head.version,
        };
        Self::new(subject, head.data_hash.clone(), None)
    }

    fn new(subject: Subject, expected: Sha256Hex, size: Option<u64>) -> Self {
        BlobCheck {
            subject,
            expected,
            size,
            hasher: Sha256::new(),
            received: 0,
        }
    }

    fn what(&self) -> String {
        match &self.subject {
            Subject::Blob => format!("blob {}", self.expected),
            Subject::Manifest { space, version } => format!("manifest of {space} v{version}"),
        }
    }

    /// Takes the next bytes; fails as soon as there are more than announced.
    pub(crate) fn update(&mut self, bytes: &[u8]) -> Result<()> {
        self.received += bytes.len() as u64;
        if let Some(size) = self.size.filter(|size| self.received > *size) {
            return Err(ClientError::Protocol(format!(
                "{} is longer than its size {size}",
                self.what()
            )));
        }
        self.hasher.update(bytes);
        Ok(())
    }

    /// How many bytes were taken so far.
    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    /// All bytes are in: fails when fewer arrived than announced or the hash differs.
    pub(crate) fn finish(self) -> Result<()> {
        if let Some(size) = self.size.filter(|size| self.received < *size) {
            return Err(ClientError::Truncated(format!(
                "{} ({} of {size} bytes)",
                self.what(),
                self.received
            )));
        }
        let what = self.what();
        let actual = Sha256Hex::from_digest(self.hasher.finalize().into());
        if actual != self.expected {
            return Err(ClientError::HashMismatch {
                what,
                expected: self.expected,
                actual,
            });
        }
        Ok(())
    }

    /// Checks bytes that are all there at once.
    pub(crate) fn whole(mut self, bytes: &[u8]) -> Result<()> {
        self.update(bytes)?;
        self.finish()
    }
}

/// What a file on disk holds compared with the blob it should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnDisk {
    /// The right bytes.
    Intact,
    /// Other bytes (`size` of them): edited in place, or damaged.
    Corrupted {
        size: u64,
    },
    Missing,
}

/// Hashes the file at `path` and compares it with the blob `sha256` of `size` bytes.
pub(crate) fn check_file(path: &Path, sha256: &Sha256Hex, size: u64) -> std::io::Result<OnDisk> {
    match hash_file(path) {
        Ok((actual, n)) if actual == *sha256 && n == size => Ok(OnDisk::Intact),
        Ok((_, n)) => Ok(OnDisk::Corrupted { size: n }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(OnDisk::Missing),
        Err(e) => Err(e),
    }
}

/// sha256 and size of a file, read in 256 KiB chunks.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<(Sha256Hex, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((Sha256Hex::from_digest(hasher.finalize().into()), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_long_and_wrong_bytes_are_refused() {
        let body = b"0123456789";
        let sha = Sha256Hex::of(body);
        assert!(BlobCheck::blob(&sha, 10).whole(body).is_ok());
        let mut streamed = BlobCheck::blob(&sha, 10);
        for chunk in body.chunks(3) {
            streamed.update(chunk).unwrap();
        }
        assert_eq!(streamed.received(), 10);
        assert!(streamed.finish().is_ok());
        assert!(matches!(
            BlobCheck::blob(&sha, 10).whole(&body[..5]),
            Err(ClientError::Truncated(_))
        ));
        assert!(matches!(
            BlobCheck::blob(&sha, 10).whole(b"0123456789x"),
            Err(ClientError::Protocol(_))
        ));
        assert!(matches!(
            BlobCheck::blob(&sha, 10).whole(b"0123456780"),
            Err(ClientError::HashMismatch { .. })
        ));
    }

    #[test]
    fn files_on_disk_are_intact_corrupted_or_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let sha = Sha256Hex::of(b"hello");
        assert_eq!(check_file(&path, &sha, 5).unwrap(), OnDisk::Missing);
        std::fs::write(&path, b"hello").unwrap();
        assert_eq!(check_file(&path, &sha, 5).unwrap(), OnDisk::Intact);
        std::fs::write(&path, b"HELLO!").unwrap();
        assert_eq!(
            check_file(&path, &sha, 5).unwrap(),
            OnDisk::Corrupted { size: 6 }
        );
    }
}
