//! Kiln's container isolation backends, `docker` and `podman`: each action
//! runs as the command of a fresh container of its `container-image`, with
//! the workspace bind-mounted at the same path. What the two share is
//! written once:
//!
//! - [`image`]: resolving an image to its digest with the action's
//!   credentials, and the metadata of the local image cache (one pull per
//!   digest, pulls in `prepare` before the action's clock starts);
//! - [`params`]: platform properties and limits → container parameters;
//! - [`network`]: `dockerNetwork=bridge` as the sandbox gives it (a
//!   private namespace with outbound access only), not the runtime's
//!   default bridge;
//! - [`supervise`]: the wait / stop-with-grace / OOM / remove sequence;
//! - [`trial`]: the container each backend starts when probed, in a
//!   one-file image made offline;
//! - [`warm`]: warm runners (`recycle-runner=true`): a container kept per
//!   runner, whose actions Kiln's agent starts inside it;
//! - [`gate`]: the docker gate, the root process an executor run as a
//!   user of its own reaches dockerd through, which forwards only what
//!   the `docker` backend asks for.
//!
//! [`docker`] drives the Docker Engine API with bollard; [`podman`] drives
//! the podman CLI. Both implement [`kiln_worker::Isolation`].
#![forbid(unsafe_code)]

pub mod docker;
pub mod gate;
pub mod image;
pub mod network;
pub mod params;
pub mod podman;
pub mod supervise;
pub mod trial;
pub mod warm;

pub use docker::{Docker, DockerConfig};
pub use image::{ImageConfig, Images, ResolvedImage};
pub use network::NetworkConfig;
pub use podman::{Podman, PodmanConfig};
