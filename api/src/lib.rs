//! The REST API of the original Cloud Hypervisor: HTTP/1.1 on a Unix socket, JSON bodies, in
//! the original's exact wire form.
//!
//! - `types`: what a request asks of the VMM and what it answers, independent of HTTP.
//! - `http`: requests parsed from the wire, answers written to it.
//! - `routes`: paths and methods to requests; answers and error chains to HTTP.
//! - `server`: the listening socket and its connections, served from the VMM's control loop.
//! - `client`: the same protocol from the other end, for `ch-remote` and the benchmark.

pub mod client;
pub mod fuzz;
pub mod http;
pub mod routes;
pub mod server;
pub mod types;

pub use routes::{Endpoint, ENDPOINTS};
pub use server::ApiServer;
pub use types::*;
