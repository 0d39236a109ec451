//! Postcopy when the source is lost: through a relay that cuts the fault connection, before
//! the destination has taken the VM (the source's VM runs on, nothing is kept at the
//! destination) and after (the destination stops the VM and its VMM ends with an error; the
//! source ends, saying the VM there is lost). Nothing hangs either way.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::migration::{
    boot, failed_and_runs_on, receive, relay_answers, send, wait_child, wait_listening,
};

/// Answers the destination has given on the main connection (Start, Config, State, Complete).
type Answers = Arc<AtomicUsize>;

/// Relays a migration from `listener` to `to`: the main connection as it is (counting its
/// answers), then the fault connection, slowly (64 KiB of pages per 2 ms, so that 256 MiB
/// would take seconds), cut in both directions once `cut_after` answers went back on the main
/// connection (at once if they have: only the fault connection's role goes through).
fn relay(listener: TcpListener, to: String, cut_after: usize) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let answers: Answers = Arc::new(AtomicUsize::new(0));
        let (src, _) = listener.accept().unwrap();
        let dst = TcpStream::connect(&to).unwrap();
        let main = {
            let answers = Arc::clone(&answers);
            std::thread::spawn(move || {
                relay_answers(src, dst, |n| answers.store(n, Ordering::SeqCst));
            })
        };
        let (mut src, _) = listener.accept().unwrap();
        let mut dst = TcpStream::connect(&to).unwrap();
        let mut role = [0u8; 2];
        src.read_exact(&mut role).unwrap();
        dst.write_all(&role).unwrap();
        let (mut from_src, mut to_dst) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let requests = std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_src, &mut to_dst);
        });
        let mut buf = vec![0u8; 64 << 10];
        while answers.load(Ordering::SeqCst) < cut_after {
            let n = match dst.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if src.write_all(&buf[..n]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for s in [&src, &dst] {
            let _ = s.shutdown(Shutdown::Both);
        }
        let _ = requests.join();
        let _ = main.join();
    })
}

#[test]
fn postcopy_survives_a_lost_source() {
    require_curl();
    let (mut a, mut a_out) = boot("postcopy-lost-src", false, false, &[]);
    let port = 20000 + ((std::process::id() + 29) % 20000);
    let dst_url = format!("tcp:127.0.0.1:{port}");

    // Cut before Complete: the destination refuses it, the source's VM runs on.
    let b = Vmm::start("postcopy-lost-dst1", &[]);
    let rx = receive(&b, &format!("receiver_url={dst_url},memory_mode=postcopy"));
    wait_listening(&dst_url);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let via = format!("tcp:{}", l.local_addr().unwrap());
    let link = relay(l, dst_url[4..].to_string(), 2);
    let tx = send(
        &a,
        &format!("destination_url={via},memory_mode=postcopy"),
        false,
    );
    let (code, err) = wait_child(tx);
    assert_eq!(code, Some(1), "send-migration: {err}");
    let (code, err) = wait_child(rx);
    assert_eq!(code, Some(1), "receive-migration: {err}");
    assert!(
        err.contains("the postcopy fault connection to the source is lost"),
        "{err}"
    );
    link.join().unwrap();
    failed_and_runs_on(&mut a, &mut a_out, &b);
    drop(b);

    // Cut after Complete: the VM is the destination's, which stops it and ends with an
    // error; the source ends too.
    let mut b = Vmm::start("postcopy-lost-dst2", &[]);
    let rx = receive(&b, &format!("receiver_url={dst_url},memory_mode=postcopy"));
    wait_listening(&dst_url);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let via = format!("tcp:{}", l.local_addr().unwrap());
    let link = relay(l, dst_url[4..].to_string(), 4);
    let started = Instant::now();
    let tx = send(
        &a,
        &format!("destination_url={via},memory_mode=postcopy"),
        true,
    );
    let (code, err) = wait_child(tx);
    assert_eq!(code, Some(0), "send-migration --no-wait: {err}");
    let (code, err) = wait_child(rx);
    assert_eq!(code, Some(0), "receive-migration: {err}");
    let dst = b.wait();
    assert_ne!(dst.code(), Some(0), "the destination ends with an error");
    assert!(
        dst.stderr.contains("postcopy: the source is lost"),
        "{}",
        dst.stderr
    );
    let src = a.wait();
    assert_eq!(src.code(), Some(0), "{}", src.stderr);
    assert!(src.stderr.contains("the VM there"), "{}", src.stderr);
    link.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "nothing waited long"
    );
}
