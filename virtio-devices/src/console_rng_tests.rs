//! virtio-rng and virtio-console driven through a real split ring (the fake driver of
//! `crate::tests`): the rng fills writable buffers only; the console transmits to its sink,
//! receives host input, and signals size changes.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use crate::tests::{Ring, DATA, NEXT, WRITE};
use crate::{Console, ConsoleSize, Rng, VirtioDevice};

#[test]
fn rng_fills_writable_buffers_only() {
    let mut rng = Rng::new(std::fs::File::open("/dev/urandom").unwrap());
    let mut r = Ring::start(&mut rng, 0, 1);
    r.desc(0, DATA, 4096, WRITE, 0);
    assert_eq!(r.submit(0), Some(4096));
    let mut buf = vec![0u8; 4096];
    r.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().any(|&b| b != buf[0]));
    r.desc(0, DATA, 4096, 0, 0);
    assert_eq!(r.submit(0), Some(0));
    r.desc(0, 1 << 40, 4096, WRITE, 0);
    assert_eq!(r.submit(0), Some(0));
    r.desc(0, DATA, u32::MAX, WRITE, 0);
    assert_eq!(r.submit(0), Some(64 * 1024));
    rng.reset();
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn console_transmits_to_the_sink() {
    let sink = Sink::default();
    let mut c = Console::new(Some(Box::new(sink.clone())), None, ConsoleSize::new(80, 25));
    let mut r = Ring::start(&mut c, 1, 2);
    r.mem.write_slice(b"hello", GuestAddress(DATA)).unwrap();
    r.mem
        .write_slice(b" world", GuestAddress(DATA + 0x100))
        .unwrap();
    r.desc(0, DATA, 5, NEXT, 1);
    r.desc(1, DATA + 0x100, 6, NEXT, 2);
    r.desc(2, 1 << 40, 6, 0, 0);
    assert_eq!(r.submit(0), Some(0));
    assert_eq!(&*sink.0.lock().unwrap(), b"hello world");
    c.reset();
}

#[test]
fn console_size_changes_bump_the_generation_and_interrupt_only_while_running() {
    let size = ConsoleSize::new(100, 40);
    let mut c = Console::new(None, None, size.clone());
    assert_ne!(c.features() & crate::F_CONSOLE_SIZE, 0);
    let cfg = |c: &Console| {
        let mut b = [0u8; 4];
        c.read_config(0, &mut b);
        (
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
        )
    };
    assert_eq!(cfg(&c), (100, 40));
    let g0 = c.config_generation();
    // Before the driver starts the device: new size and generation, nobody to interrupt.
    assert!(size.set(120, 30));
    assert_eq!(cfg(&c), (120, 30));
    assert_ne!(c.config_generation(), g0);
    let r = Ring::start(&mut c, 1, 2);
    let g1 = c.config_generation();
    assert!(!size.set(120, 30), "same size is no change");
    assert_eq!(c.config_generation(), g1);
    assert_eq!(r.irq.config.load(Ordering::SeqCst), 0);
    assert!(size.set(132, 50));
    assert_eq!(cfg(&c), (132, 50));
    assert_ne!(c.config_generation(), g1);
    assert_eq!(r.irq.config.load(Ordering::SeqCst), 1);
    // After a reset (and once the device is gone) changes no longer interrupt.
    c.reset();
    assert!(size.set(80, 24));
    assert_eq!(r.irq.config.load(Ordering::SeqCst), 1);
    drop(c);
    assert_eq!(
        Arc::strong_count(&r.irq),
        1,
        "the device's interrupt was released"
    );
}

#[test]
fn console_receives_host_input() {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    use std::os::fd::FromRawFd;
    // SAFETY: fresh fds we own.
    let (rd, mut wr) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let mut c = Console::new(None, Some(rd), ConsoleSize::new(80, 25));
    let mut r = Ring::start(&mut c, 0, 2);
    // Input before any buffer: kept until the driver adds one.
    wr.write_all(b"abc").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(r.used_idx(), 0);
    r.desc(0, DATA, 2, WRITE | NEXT, 1);
    r.desc(1, DATA + 0x100, 64, WRITE, 0);
    assert_eq!(r.submit(0), Some(3));
    let mut b = [0u8; 2];
    r.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert_eq!(&b, b"ab");
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(DATA + 0x100)).unwrap(),
        b'c'
    );
    // A read-only receive buffer takes nothing; end of input closes it without spinning.
    wr.write_all(b"xyz").unwrap();
    r.desc(0, DATA, 64, 0, 0);
    assert_eq!(r.submit(0), Some(0));
    drop(wr);
    r.desc(0, DATA, 64, WRITE, 0);
    assert_eq!(r.submit(0), Some(3));
    c.reset();
}
