//! Kiln's blob storage. One small trait, [`BlobStore`], that every backend
//! implements and every feature wraps: the crash-safe [`DiskStore`], the
//! bounded [`MemoryStore`], and [`TieredStore`] composing the two. Stores
//! know keys and bytes; REAPI semantics (digest checks, the Action Cache's
//! completeness) live in `kiln-cas`.
#![forbid(unsafe_code)]

mod aligned;
pub mod digest;
pub mod disk;
mod error;
mod memory;
mod store;
mod tiered;

pub use digest::{Digest, DigestFunction, DigestParseError, Hasher, Key, Namespace};
pub use disk::{DiskStore, DiskStoreConfig, Durability, RecoveryReport};
pub use error::{Result, StoreError};
pub use memory::MemoryStore;
pub use store::{Blob, BlobStore, BlobWriter, BufferingWriter, Pieces, Retention, StoreUsage};
pub use tiered::TieredStore;
