//! HTTP/1.1 on the wire, as the original's server speaks it: requests are parsed with
//! `httparse` (they may arrive in any number of pieces, and several on one connection);
//! answers are written in the original's exact form, because its client (`api_client`, also
//! embedded in other tools) reads them byte by byte:
//!
//! ```text
//! HTTP/1.1 200 \r\n                      status code, a space, no reason phrase
//! Server: Cloud Hypervisor API\r\n
//! Connection: keep-alive\r\n
//! Content-Type: application/json\r\n     on every status but 100 and 204,
//! Content-Length: 47\r\n                 with a length of 0 when there is no body
//! \r\n
//! {"build_version":...}
//! ```
//!
//! The original's client takes the status code as everything between `HTTP/1.1 ` and the first
//! CR, trimmed, and looks for `Content-Length: ` with that exact case; without that header it
//! reads no body at all.

/// The largest request body accepted, as in the original (4 MiB); a larger one is refused with
/// 400 and the connection closed.
pub const MAX_BODY: usize = 4 << 20;
/// The most a request's line and headers may take.
pub const MAX_HEAD: usize = 16 << 10;
/// The most headers a request may have.
const MAX_HEADERS: usize = 32;

pub const SERVER_NAME: &str = "Cloud Hypervisor API";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    /// Any other method: every endpoint refuses it.
    Other,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Other => "OTHER",
        }
    }
}

/// One complete request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub body: Vec<u8>,
    /// The client asked for the connection to end after the answer (`Connection: close`, or
    /// HTTP/1.0 without keep-alive).
    pub close: bool,
}

/// What `parse` found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed. `continue_now` is true when the head is complete and asks for
    /// `Expect: 100-continue`: the client waits for a `100` before sending the body.
    Partial { continue_now: bool },
    /// A whole request that took `len` bytes of the buffer.
    Complete { request: Request, len: usize },
    /// The bytes are not a request this server takes; the answer is 400 with this reason and
    /// the connection ends (there is no telling where the next request would start).
    Invalid(String),
}

/// Parses the request at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Parsed::Invalid(format!("the request head is over {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => {
            return Parsed::Partial {
                continue_now: false,
            }
        }
        Err(e) => return Parsed::Invalid(format!("malformed request: {e}")),
    };
    if head_len > MAX_HEAD {
        return Parsed::Invalid(format!("the request head is over {MAX_HEAD} bytes"));
    }
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("PUT") => Method::Put,
        _ => Method::Other,
    };
    // `httparse` checked the version: 1.0 or 1.1.
    let http10 = req.version == Some(0);
    let mut content_length = 0usize;
    let mut seen_length = None;
    let mut close = http10;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                // Two lengths that differ leave the request's end in doubt.
                Ok(n) if seen_length.is_some_and(|m| m != n) => {
                    return Parsed::Invalid("two different Content-Length headers".into())
                }
                Ok(n) => {
                    content_length = n;
                    seen_length = Some(n);
                }
                Err(_) => return Parsed::Invalid(format!("bad Content-Length '{value}'")),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Invalid(format!("Transfer-Encoding '{value}' is not supported"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    if content_length > MAX_BODY {
        return Parsed::Invalid(format!(
            "the body of {content_length} bytes is over the limit of {MAX_BODY}"
        ));
    }
    let path = req.path.unwrap_or("/");
    // The query string plays no part in routing.
    let path = path.split_once('?').map_or(path, |(p, _)| p).to_string();
    let len = head_len + content_length;
    if buf.len() < len {
        return Parsed::Partial {
            continue_now: expect_continue,
        };
    }
    Parsed::Complete {
        request: Request {
            method,
            path,
            body: buf[head_len..len].to_vec(),
            close,
        },
        len,
    }
}

/// One answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// Ends the connection after this answer (`Connection: close` instead of `keep-alive`).
    pub close: bool,
}

impl Response {
    pub fn new(status: u16, body: Vec<u8>) -> Self {
        Response {
            status,
            body,
            close: false,
        }
    }

    /// `100 Continue`, sent before the body of a request that expects it.
    pub fn continue_100() -> Self {
        Response::new(100, Vec::new())
    }

    /// Appends the answer in wire form to `out` (one buffer, so one write sends it).
    pub fn encode(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        let connection = if self.close { "close" } else { "keep-alive" };
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {} \r\nServer: {SERVER_NAME}\r\nConnection: {connection}\r\n",
            self.status
        );
        if self.status != 100 && self.status != 204 {
            let _ = write!(
                out,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                self.body.len()
            );
        }
        out.extend_from_slice(b"\r\n");
        if self.status != 100 && self.status != 204 {
            out.extend_from_slice(&self.body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf) {
            Parsed::Complete { request, len } => (request, len),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answers_in_the_originals_form() {
        let mut out = Vec::new();
        Response::new(200, b"{\"a\":1}".to_vec()).encode(&mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\
              Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
        out.clear();
        Response::new(204, Vec::new()).encode(&mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n"
        );
        out.clear();
        Response::new(200, Vec::new()).encode(&mut out);
        assert!(out.ends_with(b"Content-Length: 0\r\n\r\n"), "{out:?}");
    }

    #[test]
    fn requests_in_pieces_and_pipelined() {
        // As the original's client sends them: head, then Content-Length, then the body.
        let full = b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
                     Content-Length: 2\r\n\r\n{}GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n";
        for cut in 0..60 {
            assert!(
                matches!(parse(&full[..cut]), Parsed::Partial { .. }),
                "cut at {cut}"
            );
        }
        let (r, len) = complete(full);
        assert_eq!(r.method, Method::Put);
        assert_eq!(r.path, "/api/v1/vm.create");
        assert_eq!(r.body, b"{}");
        assert!(!r.close);
        let (r, rest) = complete(&full[len..]);
        assert_eq!(
            (r.method, r.path.as_str()),
            (Method::Get, "/api/v1/vmm.ping")
        );
        assert_eq!(len + rest, full.len());
    }

    #[test]
    fn connection_and_expect_headers() {
        let (r, _) = complete(b"GET /x?y=1 HTTP/1.0\r\n\r\n");
        assert!(r.close);
        assert_eq!(r.path, "/x");
        let (r, _) = complete(b"GET /x HTTP/1.1\r\nconnection: Close\r\n\r\n");
        assert!(r.close);
        let (r, _) = complete(b"DELETE /x HTTP/1.1\r\n\r\n");
        assert_eq!(r.method, Method::Other);
        assert_eq!(
            parse(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"),
            Parsed::Partial { continue_now: true }
        );
    }

    #[test]
    fn refuses_what_it_cannot_frame() {
        for bad in [
            &b"PUT /x HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..],
            b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            b"\x00\x01garbage\r\n\r\n",
            b"GET /x HTTP/2.0\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        ] {
            assert!(matches!(parse(bad), Parsed::Invalid(_)), "{bad:?}");
        }
        let long = vec![b'a'; MAX_HEAD + 10];
        let mut req = b"GET /".to_vec();
        req.extend_from_slice(&long);
        assert!(matches!(parse(&req), Parsed::Invalid(_)));
    }
}
