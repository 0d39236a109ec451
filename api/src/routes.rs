//! Paths, methods and status codes: from an HTTP request to an `ApiRequest`, and from the
//! VMM's answer to an HTTP response.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use vmm::api::{ApiError, ApiRequest, ApiResponse, ApiResult};
use vmm::VmConfig;

/// The largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 1 << 20;

pub const PREFIX: &str = "/api/v1/";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    VmmPing,
    VmmShutdown,
    VmCreate,
    VmBoot,
    VmInfo,
    VmCounters,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
    VmPowerButton,
    VmDelete,
    /// One of the original's endpoints for something this VMM does not have yet.
    NotYet,
}

/// Every endpoint of the original: name, method, what we do with it.
pub const ENDPOINTS: &[(&str, Method, Endpoint)] = &[
    ("vmm.ping", Method::GET, Endpoint::VmmPing),
    ("vmm.shutdown", Method::PUT, Endpoint::VmmShutdown),
    ("vm.create", Method::PUT, Endpoint::VmCreate),
    ("vm.boot", Method::PUT, Endpoint::VmBoot),
    ("vm.info", Method::GET, Endpoint::VmInfo),
    ("vm.counters", Method::GET, Endpoint::VmCounters),
    ("vm.pause", Method::PUT, Endpoint::VmPause),
    ("vm.resume", Method::PUT, Endpoint::VmResume),
    ("vm.shutdown", Method::PUT, Endpoint::VmShutdown),
    ("vm.reboot", Method::PUT, Endpoint::VmReboot),
    ("vm.power-button", Method::PUT, Endpoint::VmPowerButton),
    ("vm.delete", Method::PUT, Endpoint::VmDelete),
    ("vm.add-device", Method::PUT, Endpoint::NotYet),
    ("vm.add-disk", Method::PUT, Endpoint::NotYet),
    ("vm.add-fs", Method::PUT, Endpoint::NotYet),
    ("vm.add-generic-vhost-user", Method::PUT, Endpoint::NotYet),
    ("vm.add-net", Method::PUT, Endpoint::NotYet),
    ("vm.add-pmem", Method::PUT, Endpoint::NotYet),
    ("vm.add-user-device", Method::PUT, Endpoint::NotYet),
    ("vm.add-vdpa", Method::PUT, Endpoint::NotYet),
    ("vm.add-vsock", Method::PUT, Endpoint::NotYet),
    ("vm.remove-device", Method::PUT, Endpoint::NotYet),
    ("vm.resize", Method::PUT, Endpoint::NotYet),
    ("vm.resize-disk", Method::PUT, Endpoint::NotYet),
    ("vm.resize-zone", Method::PUT, Endpoint::NotYet),
    ("vm.snapshot", Method::PUT, Endpoint::NotYet),
    ("vm.restore", Method::PUT, Endpoint::NotYet),
    ("vm.coredump", Method::PUT, Endpoint::NotYet),
    ("vm.nmi", Method::PUT, Endpoint::NotYet),
    ("vm.send-migration", Method::PUT, Endpoint::NotYet),
    ("vm.receive-migration", Method::PUT, Endpoint::NotYet),
];

pub type HttpResponse = Response<Full<Bytes>>;

fn response(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> HttpResponse {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if !r.body().is_empty_hint() {
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    r
}

trait EmptyHint {
    fn is_empty_hint(&self) -> bool;
}

impl EmptyHint for Full<Bytes> {
    fn is_empty_hint(&self) -> bool {
        hyper::body::Body::size_hint(self).exact() == Some(0)
    }
}

/// A one-line plain-text error.
pub fn error(status: StatusCode, msg: impl std::fmt::Display) -> HttpResponse {
    response(status, "text/plain", format!("{msg}\n").into_bytes())
}

/// Finds the endpoint for `path` and `method`; `Err` is the response to send instead.
pub fn route(method: &Method, path: &str) -> Result<(&'static str, Endpoint), Box<HttpResponse>> {
    let Some(name) = path.strip_prefix(PREFIX) else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!("no such path {path}"),
        )));
    };
    let Some((name, allowed, ep)) = ENDPOINTS.iter().find(|(n, _, _)| *n == name) else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint {name}"),
        )));
    };
    if method != allowed {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{name} takes {allowed}, not {method}"),
        );
        r.headers_mut()
            .insert(ALLOW, allowed.as_str().parse().expect("method name"));
        return Err(Box::new(r));
    }
    Ok((name, *ep))
}

/// The `ApiRequest` for `ep` with `body`; `Err` is the response to send instead.
pub fn request(name: &str, ep: Endpoint, body: &[u8]) -> Result<ApiRequest, Box<HttpResponse>> {
    Ok(match ep {
        Endpoint::VmmPing => ApiRequest::VmmPing,
        Endpoint::VmmShutdown => ApiRequest::VmmShutdown,
        Endpoint::VmCreate => {
            let config: VmConfig = serde_json::from_slice(body).map_err(|e| {
                Box::new(error(
                    StatusCode::BAD_REQUEST,
                    format!("vm.create: invalid VmConfig: {e}"),
                ))
            })?;
            ApiRequest::VmCreate(Box::new(config))
        }
        Endpoint::VmBoot => ApiRequest::VmBoot,
        Endpoint::VmInfo => ApiRequest::VmInfo,
        Endpoint::VmCounters => ApiRequest::VmCounters,
        Endpoint::VmPause => ApiRequest::VmPause,
        Endpoint::VmResume => ApiRequest::VmResume,
        Endpoint::VmShutdown => ApiRequest::VmShutdown,
        Endpoint::VmReboot => ApiRequest::VmReboot,
        Endpoint::VmPowerButton => ApiRequest::VmPowerButton,
        Endpoint::VmDelete => ApiRequest::VmDelete,
        Endpoint::NotYet => {
            return Err(Box::new(error(
                StatusCode::NOT_IMPLEMENTED,
                format!("{name} is not supported yet"),
            )))
        }
    })
}

fn json(value: &impl serde::Serialize) -> HttpResponse {
    match serde_json::to_vec(value) {
        Ok(body) => response(StatusCode::OK, "application/json", body),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The HTTP response for the VMM's answer to `name`.
pub fn reply(name: &str, result: ApiResult) -> HttpResponse {
    match result {
        Ok(ApiResponse::Empty) => response(StatusCode::NO_CONTENT, "", Vec::new()),
        Ok(ApiResponse::Ping(p)) => json(&p),
        Ok(ApiResponse::Info(i)) => json(&i),
        Ok(ApiResponse::Counters(c)) => json(&c),
        Err(e) => {
            let status = match e {
                ApiError::VmNotCreated => StatusCode::NOT_FOUND,
                ApiError::InvalidState { .. } => StatusCode::METHOD_NOT_ALLOWED,
                ApiError::VmAlreadyCreated => StatusCode::CONFLICT,
                ApiError::Config(_) => StatusCode::BAD_REQUEST,
                ApiError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
                ApiError::Gone => StatusCode::SERVICE_UNAVAILABLE,
            };
            error(status, format!("{name}: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_follow_the_original() {
        assert_eq!(
            route(&Method::GET, "/api/v1/vmm.ping").unwrap(),
            ("vmm.ping", Endpoint::VmmPing)
        );
        assert_eq!(
            route(&Method::PUT, "/api/v1/vm.power-button").unwrap().1,
            Endpoint::VmPowerButton
        );
        let r = route(&Method::PUT, "/api/v1/vmm.ping").unwrap_err();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "GET");
        for path in ["/api/v1/vm.bogus", "/api/v2/vmm.ping", "/", "/api/v1/"] {
            let r = route(&Method::GET, path).unwrap_err();
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        }
    }

    #[test]
    fn bodies_and_errors() {
        let r = request("vm.create", Endpoint::VmCreate, b"{").unwrap_err();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = request("vm.create", Endpoint::VmCreate, br#"{"payload": 3}"#).unwrap_err();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = request("vm.add-disk", Endpoint::NotYet, b"{}").unwrap_err();
        assert_eq!(r.status(), StatusCode::NOT_IMPLEMENTED);
        assert!(matches!(
            request(
                "vm.create",
                Endpoint::VmCreate,
                br#"{"payload": {"kernel": "/k"}}"#
            ),
            Ok(ApiRequest::VmCreate(_))
        ));
        let r = reply(
            "vm.pause",
            Err(ApiError::InvalidState {
                action: "pause",
                state: vmm::api::VmState::Created,
            }),
        );
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            reply("vm.info", Err(ApiError::VmNotCreated)).status(),
            StatusCode::NOT_FOUND
        );
        let r = reply("vm.boot", Ok(ApiResponse::Empty));
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert!(r.headers().get(CONTENT_TYPE).is_none());
    }
}
