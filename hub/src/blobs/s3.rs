//! S3-compatible backend of [`super::BlobStore`], through object_store.
