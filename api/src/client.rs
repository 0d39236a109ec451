//! A blocking HTTP/1.1 client for the API socket, on one keep-alive connection (`ch-remote`,
//! the benchmark). It reads answers with `httparse`, so it takes the original server's form
//! (`HTTP/1.1 200 ` with no reason phrase) as well as ours.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::http::Method;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("API socket: {0}")]
    Io(#[from] io::Error),
    #[error("cannot pass the file descriptors {fds:?} on the API socket: {source}")]
    SendFds {
        fds: Vec<RawFd>,
        #[source]
        source: io::Error,
    },
    #[error("the server closed the connection before answering in full")]
    Closed,
    #[error("malformed answer from the server: {0}")]
    Malformed(String),
}

/// One answer: status code and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// The lines of an error answer: the original's JSON list of strings, or the body as text
    /// for a server that answers otherwise.
    pub fn error_lines(&self) -> Vec<String> {
        match serde_json::from_slice::<Vec<String>>(&self.body) {
            Ok(lines) => lines,
            Err(_) => {
                let text = String::from_utf8_lossy(&self.body).trim().to_string();
                if text.is_empty() {
                    Vec::new()
                } else {
                    vec![text]
                }
            }
        }
    }
}

pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
        Ok(Client {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// `method /api/v1/<endpoint>` with an optional JSON body, sent in one write.
    pub fn call(
        &mut self,
        method: Method,
        endpoint: &str,
        body: Option<&[u8]>,
    ) -> Result<Reply, ClientError> {
        self.call_with_fds(method, endpoint, body, &[])
    }

    /// `call`, with `fds` passed beside the request (SCM_RIGHTS, attached to its first bytes,
    /// as the original's ch-remote sends them); the descriptors stay open here.
    pub fn call_with_fds(
        &mut self,
        method: Method,
        endpoint: &str,
        body: Option<&[u8]>,
        fds: &[RawFd],
    ) -> Result<Reply, ClientError> {
        let mut req = Vec::with_capacity(128 + body.map_or(0, <[u8]>::len));
        let _ = write!(
            req,
            "{} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n",
            method.as_str()
        );
        if let Some(b) = body {
            let _ = write!(
                req,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            );
        }
        req.extend_from_slice(b"\r\n");
        if let Some(b) = body {
            req.extend_from_slice(b);
        }
        let mut sent = 0;
        if !fds.is_empty() {
            sent =
                self.stream
                    .send_with_fds(&[&req[..]], fds)
                    .map_err(|e| ClientError::SendFds {
                        fds: fds.to_vec(),
                        source: io::Error::from_raw_os_error(e.errno()),
                    })?;
        }
        self.stream.write_all(&req[sent..])?;
        self.read_reply()
    }

    fn read_reply(&mut self) -> Result<Reply, ClientError> {
        loop {
            // A `100 Continue` is skipped; anything else is the answer.
            if let Some((reply, used)) = parse_reply(&self.buf)? {
                self.buf.drain(..used);
                if reply.status != 100 {
                    return Ok(reply);
                }
                continue;
            }
            let len = self.buf.len();
            self.buf.resize(len + 4096, 0);
            let n = match self.stream.read(&mut self.buf[len..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    self.buf.truncate(len);
                    return Err(e.into());
                }
            };
            self.buf.truncate(len + n);
            if n == 0 {
                return Err(ClientError::Closed);
            }
        }
    }
}

/// The answer at the start of `buf`, with the bytes it took, once it is all there.
fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ClientError::Malformed(e.to_string())),
    };
    let status = resp.code.unwrap_or(0);
    let mut length = 0usize;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| ClientError::Malformed("bad Content-Length".into()))?;
        }
    }
    if buf.len() < head + length {
        return Ok(None);
    }
    Ok(Some((
        Reply {
            status,
            body: buf[head..head + length].to_vec(),
        },
        head + length,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_servers_forms() {
        // The original's (and ours): no reason phrase.
        let two = b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\
                    Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 204 \r\n";
        let (r, used) = parse_reply(two).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        assert_eq!(&two[used..], b"HTTP/1.1 204 \r\n");
        let (r, _) =
            parse_reply(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 5\r\n\r\n[\"x\"]")
                .unwrap()
                .unwrap();
        assert_eq!(r.status, 500);
        assert_eq!(r.error_lines(), ["x"]);
        assert!(parse_reply(b"HTTP/1.1 200 \r\nContent-Length: 3\r\n\r\n{}")
            .unwrap()
            .is_none());
        assert!(parse_reply(b"garbage\r\n\r\n").is_err());
        let plain = Reply {
            status: 500,
            body: b"went wrong\n".to_vec(),
        };
        assert_eq!(plain.error_lines(), ["went wrong"]);
    }
}
