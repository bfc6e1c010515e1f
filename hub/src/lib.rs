//! synchub hub: watches each space's version row and pushes `sync_required` to every connected
//! agent over WebSockets; serves heads, manifests and blobs over HTTP; takes commits, force-syncs
//! and sync reports.
//!
//! `main.rs` parses the command line and calls into [`server`] (serve) or [`cli`] (token,
//! force-sync, ...). The database is behind [`store::Store`], blob bytes behind
//! [`blobs::BlobStore`]; [`broadcast`] holds the latest head of every space in memory.

pub mod blobs;
pub mod store;
