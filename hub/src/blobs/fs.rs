//! Filesystem backend of [`super::BlobStore`]: the embedded default.
