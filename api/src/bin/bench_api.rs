//! `bench-api SOCKET [REQUESTS]`: requests/s and latency percentiles of `vmm.ping` and
//! `vm.info` on one keep-alive connection to a running VMM's API socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api::client::Client;
use api::http::Method;

fn bench(client: &mut Client, endpoint: &str, n: usize) -> Result<(), String> {
    // Warm up the connection and the VMM's paths.
    for _ in 0..n.min(1000) {
        client
            .call(Method::Get, endpoint, None)
            .map_err(|e| e.to_string())?;
    }
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let r = client
            .call(Method::Get, endpoint, None)
            .map_err(|e| e.to_string())?;
        lat.push(t.elapsed());
        if r.status != 200 {
            return Err(format!("{endpoint}: status {}", r.status));
        }
    }
    let total = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{endpoint:12} {n} requests: {:.0} req/s, p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        n as f64 / total.as_secs_f64(),
        us(pct(0.50)),
        us(pct(0.99)),
        us(lat[lat.len() - 1])
    );
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(sock) = args.next().map(PathBuf::from) else {
        eprintln!("usage: bench-api SOCKET [REQUESTS]");
        return ExitCode::from(1);
    };
    let n = args.next().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let run = || -> Result<(), String> {
        let mut client = Client::connect(&sock).map_err(|e| e.to_string())?;
        bench(&mut client, "vmm.ping", n)?;
        bench(&mut client, "vm.info", n)
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-api: {e}");
            ExitCode::from(1)
        }
    }
}
