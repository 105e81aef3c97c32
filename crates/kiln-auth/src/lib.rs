//! Who may do what. A request's credential (an API key from the key file,
//! or the shared executor fleet's token) becomes a [`Caller`] with an
//! organisation and [`Capabilities`], decided once at the edge by
//! [`AuthLayer`]; services read the caller from the request's extensions
//! rather than reading headers again.
//!
//! Until a key is made, a server on a loopback address (or started with
//! `--allow-unauthenticated`) lets callers without a credential in, as a
//! single user's machine expects; once a key exists, every request needs
//! one (revoking every key does not reopen the server).

pub mod caller;
pub mod capability;
pub mod credential;
pub mod keys;
pub mod layer;
pub mod token;

pub use caller::{AuthConfig, Authenticator, Caller, Refusal, API_KEY_HEADER, FOR_ORG_HEADER};
pub use capability::{Capabilities, Capability};
pub use credential::Credential;
pub use keys::{ApiKey, KeyError, KeyFile, KeyInfo};
pub use layer::AuthLayer;
pub use token::ExecutorToken;
