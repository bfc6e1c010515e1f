//! synchub hub: watches each space's version row and pushes `sync_required` to every connected
//! agent over WebSockets; serves heads, manifests and blobs over HTTP; takes commits, force-syncs
//! and sync reports.
//!
//! `main.rs` parses the command line and calls [`cli::run`]; [`server::start`] runs a hub (tests
//! start one in-process). The database is behind [`store::Store`], blob bytes behind
//! [`blobs::BlobStore`]; [`broadcast`] holds the latest head of every space in memory and
//! [`ws`] is the task of one agent's socket.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod admission;
pub mod alerts;
pub mod api;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod blob_access;
pub mod blobs;
pub mod broadcast;
pub mod cli;
pub mod clients;
pub mod config;
pub mod connections;
pub mod domain;
pub mod error;
pub mod fleet;
pub mod fsck;
pub mod gc;
pub mod held;
pub mod manifests;
pub mod reports;
pub mod server;
pub mod shared_io;
pub mod sources;
pub mod state;
pub mod store;
pub mod tls;
pub mod versions;
pub mod ws;
