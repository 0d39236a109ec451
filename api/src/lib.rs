//! The REST API of the original Cloud Hypervisor: HTTP/1.1 on a Unix socket, JSON bodies.
//!
//! `server`: one thread with a current-thread tokio runtime runs `hyper`'s HTTP/1 server; each
//! request becomes a `vmm::api::ApiRequest` sent to the VMM's control loop, whose answer comes
//! back on a per-request channel. `client`: the same protocol from the other end, for
//! `ch-remote` and the benchmark.

pub mod client;
mod routes;
mod server;

pub use routes::{Endpoint, ENDPOINTS, MAX_BODY};
pub use server::{ApiServer, ServerError};
