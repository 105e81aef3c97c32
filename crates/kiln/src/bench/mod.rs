//! Load generators that measure a running Kiln server from the outside, over
//! its real gRPC API. They live in the binary (`kiln bench ...`) so anyone can
//! check a deployment's numbers against the machine's ceilings.
//!
//! `cas` measures the storage path: ByteStream for large blobs, the batch
//! RPCs for many small ones, and the per-call cost of ByteStream on small
//! blobs (`calls`), which is how Bazel 4 moves every blob. `exec` measures
//! the fixed cost of remote execution with trivial actions; `isolation`
//! what each isolation type adds to it, next to the raw tools.

mod calls;
pub mod cas;
mod data;
pub mod exec;
pub mod isolation;
mod report;
