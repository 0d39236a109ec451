//! Entry points for fuzzing (`fuzz/`, target `api_requests`) and for the bounded
//! mutation test in `cargo test`: bytes as a client could send them go through what the server
//! does with them: framing (`http::parse`, on a stream cut into arbitrary pieces), routing,
//! body decoding (`vm.create`'s VmConfig), the answer and its encoding. Nothing may panic, and
//! every answer must be in the original's wire form.

use crate::http::{self, Parsed, Response};
use crate::routes;
use crate::types::{ApiError, ApiRequest, ApiResponse, ApiResult, VmmPingResponse};

/// What the stub VMM answers: a success or an error, chosen by `seed`, for every request.
fn stub(seed: u8) -> impl FnMut(ApiRequest) -> ApiResult {
    let mut n = seed;
    move |_req| {
        n = n.wrapping_add(1);
        match n % 4 {
            0 => Ok(ApiResponse::Empty),
            1 => Ok(ApiResponse::Ping(VmmPingResponse {
                build_version: "v".into(),
                version: "v".into(),
                pid: 1,
                features: Vec::new(),
            })),
            2 => Err(ApiError::VmNotRunning),
            _ => Err(ApiError::Failed("\"quoted\"\n".into())),
        }
    }
}

/// Checks that `out` holds answers in the original's form, back to back.
fn check_answers(mut out: &[u8]) {
    while !out.is_empty() {
        assert!(out.starts_with(b"HTTP/1.1 "), "not a status line");
        let head_end = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete head")
            + 4;
        let head = std::str::from_utf8(&out[..head_end]).expect("an ASCII head");
        let code: u16 = head[9..12].parse().expect("a status code");
        assert_eq!(&head[12..15], " \r\n", "no reason phrase");
        let len = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map(|v| v.parse::<usize>().expect("a length"))
            .unwrap_or(0);
        assert_eq!(
            len == 0 && !head.contains("Content-Length"),
            code == 100 || code == 204
        );
        let body = &out[head_end..head_end + len];
        if code >= 400 {
            let lines: Vec<String> =
                serde_json::from_slice(body).expect("an error body is a list of strings");
            assert!(!lines.is_empty());
        }
        out = &out[head_end + len..];
    }
}

/// Feeds `data` to the server's request path. The first byte chooses how the stream is cut
/// into reads; the rest is the stream.
pub fn fuzz_requests(data: &[u8]) {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut % 64) + 1;
    let mut handle = stub(cut);
    let mut input = Vec::new();
    let mut out = Vec::new();
    let mut closed = false;
    for piece in stream.chunks(step) {
        if closed {
            break;
        }
        input.extend_from_slice(piece);
        let mut used = 0;
        while used < input.len() {
            match http::parse(&input[used..]) {
                Parsed::Partial { continue_now } => {
                    if continue_now {
                        Response::continue_100().encode(&mut out);
                    }
                    break;
                }
                Parsed::Complete { request, len } => {
                    assert!(
                        len > 0 && used + len <= input.len(),
                        "a request takes bytes"
                    );
                    used += len;
                    let mut resp = routes::answer(&request, Vec::new(), &mut handle);
                    resp.close = request.close;
                    resp.encode(&mut out);
                    if request.close {
                        closed = true;
                        break;
                    }
                }
                Parsed::Invalid(_) => {
                    let mut resp = routes::error_chain(400, &["Bad Request", "fuzz"]);
                    resp.close = true;
                    resp.encode(&mut out);
                    closed = true;
                    break;
                }
            }
        }
        input.drain(..used);
        assert!(
            input.len() <= http::MAX_HEAD + http::MAX_BODY + step,
            "a partial request never outgrows the limits"
        );
    }
    check_answers(&out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests every endpoint sees, as seeds.
    fn seeds() -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        for (name, method, _) in crate::ENDPOINTS {
            v.push(
                format!(
                    "{} /api/v1/{name} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{{}}",
                    method.as_str()
                )
                .into_bytes(),
            );
        }
        v.push(
            b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 60\r\n\r\n\
              {\"payload\":{\"kernel\":\"/k\"},\"cpus\":{\"boot_vcpus\":1,\"max_vcpus\":1}}"
                .to_vec(),
        );
        v.push(b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\nGET / HTTP/1.1\r\n\r\n".to_vec());
        v
    }

    /// A bounded mutation run in every `cargo test`: the seeds, then byte flips, inserts,
    /// deletions and splices of them, each cut at every read size. The fuzz target runs the
    /// same entry point for as long as one likes.
    #[test]
    fn mutated_requests_never_panic() {
        let seeds = seeds();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for cut in [0u8, 1, 5, 63] {
            for s in &seeds {
                let mut data = vec![cut];
                data.extend_from_slice(s);
                fuzz_requests(&data);
            }
        }
        for _ in 0..4000 {
            let mut s = seeds[(next() as usize) % seeds.len()].clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % (s.len() + 1);
                match next() % 4 {
                    0 if at < s.len() => s[at] = next() as u8,
                    1 => s.insert(at, next() as u8),
                    2 if at < s.len() => {
                        s.remove(at);
                    }
                    _ => {
                        let other = &seeds[(next() as usize) % seeds.len()];
                        let from = (next() as usize) % other.len();
                        s.splice(at..at, other[from..].iter().copied().take(40));
                    }
                }
            }
            let mut data = vec![next() as u8];
            data.extend_from_slice(&s);
            fuzz_requests(&data);
        }
    }
}
