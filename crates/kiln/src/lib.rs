//! The `kiln` binary's library half: configuration and server assembly,
//! so integration tests can start a whole server in-process.
#![forbid(unsafe_code)]

pub mod config;
mod connections;
pub mod executor;
pub mod isolation;
pub mod serve;
pub mod tls;
