//! The API thread: a current-thread tokio runtime running hyper's HTTP/1 server on the Unix
//! socket. Requests are forwarded to the VMM's control loop through a `vmm::api::ApiSender`.

use std::convert::Infallible;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use log::{debug, warn};
use thiserror::Error;
use tokio::sync::oneshot;
use vmm::api::{ApiError, ApiSender};

use crate::routes::{self, HttpResponse, MAX_BODY};

/// How long a client may take to send its headers, or its body.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The period of the timer that keeps per-request timers from waking the API thread.
const PACER_PERIOD: Duration = Duration::from_millis(500);
/// How long `shutdown` waits for answers still in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot start the API thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("cannot set up the API socket: {0}")]
    Socket(#[source] std::io::Error),
}

pub struct ApiServer {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// The socket file, removed on shutdown (`None` for a socket passed by fd).
    path: Option<PathBuf>,
}

async fn handle(req: Request<Incoming>, api: Arc<ApiSender>) -> Result<HttpResponse, Infallible> {
    let (name, ep) = match routes::route(req.method(), req.uri().path()) {
        Ok(r) => r,
        Err(resp) => return Ok(*resp),
    };
    let too_big = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY as u64);
    if too_big {
        return Ok(routes::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{name}: the body is larger than {MAX_BODY} bytes"),
        ));
    }
    // Most requests (every GET, most PUTs) have no body: no timer, no collecting then.
    let body = if hyper::body::Body::is_end_stream(req.body()) {
        bytes::Bytes::new()
    } else {
        match tokio::time::timeout(
            CLIENT_TIMEOUT,
            Limited::new(req.into_body(), MAX_BODY).collect(),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Ok(routes::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("{name}: the body is larger than {MAX_BODY} bytes"),
                ))
            }
            Ok(Err(e)) => {
                return Ok(routes::error(
                    StatusCode::BAD_REQUEST,
                    format!("{name}: {e}"),
                ))
            }
            Err(_) => {
                return Ok(routes::error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("{name}: the body did not arrive in time"),
                ))
            }
        }
    };
    let request = match routes::request(name, ep, &body) {
        Ok(r) => r,
        Err(resp) => return Ok(*resp),
    };
    let (tx, rx) = oneshot::channel();
    api.send(
        request,
        Box::new(move |result| {
            // The client may have gone; nothing to do then.
            let _ = tx.send(result);
        }),
    );
    let result = rx.await.unwrap_or(Err(ApiError::Gone));
    Ok(routes::reply(name, result))
}

async fn serve(
    listener: UnixListener,
    api: ApiSender,
    mut stop: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let api = Arc::new(api);
    let graceful = GracefulShutdown::new();
    // hyper arms a header-read timer (CLIENT_TIMEOUT) for every request on a connection. A
    // timer due earlier than any other makes tokio's time driver wake its own thread through
    // its event fd (one write and one extra epoll round per request). A timer that is always
    // due sooner (twice a second) keeps those registrations silent.
    let pacer = tokio::spawn(async {
        let mut tick = tokio::time::interval(PACER_PERIOD);
        loop {
            tick.tick().await;
        }
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let api = api.clone();
                    let svc = service_fn(move |req| handle(req, api.clone()));
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(CLIENT_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), svc);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            debug!("API connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of fds, most likely: back off instead of spinning.
                    warn!("API socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut stop => break,
        }
    }
    drop(listener);
    pacer.abort();
    // Let answers in flight (vmm.shutdown's own) reach their clients; close idle connections.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
    Ok(())
}

impl ApiServer {
    /// Serves the API on `listener` in a new thread. `path` is removed on shutdown.
    pub fn start(
        listener: UnixListener,
        path: Option<PathBuf>,
        api: ApiSender,
    ) -> Result<Self, ServerError> {
        listener
            .set_nonblocking(true)
            .map_err(ServerError::Socket)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ServerError::Thread)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("http-server".into())
            .spawn(move || {
                if let Err(e) = runtime.block_on(serve(listener, api, stop_rx)) {
                    log::error!("API server: {e}");
                }
            })
            .map_err(ServerError::Thread)?;
        Ok(ApiServer {
            stop: Some(stop_tx),
            thread: Some(thread),
            path,
        })
    }

    /// Stops accepting, lets answers in flight go out (at most a second), removes the socket.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}
