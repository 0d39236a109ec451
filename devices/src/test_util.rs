//! Test doubles shared by the device tests.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::{StateError, Stateful, VmRequests};

/// Counts power-off and reset requests.
#[derive(Default)]
pub struct Requests {
    power_off: AtomicU32,
    reset: AtomicU32,
}

impl Requests {
    /// (power-offs, resets) since the last call.
    pub fn take(&self) -> (u32, u32) {
        (
            self.power_off.swap(0, Ordering::SeqCst),
            self.reset.swap(0, Ordering::SeqCst),
        )
    }
}

impl VmRequests for Requests {
    fn power_off(&self) {
        self.power_off.fetch_add(1, Ordering::SeqCst);
    }
    fn reset(&self) {
        self.reset.fetch_add(1, Ordering::SeqCst);
    }
}

/// The device's state through JSON and back, as a state file carries it; the state read back is
/// the one written.
pub fn json_round_trip<D: Stateful>(dev: &D) -> D::State {
    let state = dev.state();
    let json = serde_json::to_string(&state).unwrap();
    let back: D::State = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state, "JSON round trip of {}", D::NAME);
    back
}

/// Feeds `dev` states made wrong from its own in every way we can think of: other versions,
/// each field missing or replaced by a value of the wrong type or out of range, an unknown field,
/// text that is not a state. Each is refused (by serde or by `restore`) without a panic, and a
/// refusal by `restore` leaves the device as it was. A replacement that is valid for its field
/// (an empty FIFO, say) is restored, and the device put back.
pub fn check_refusals<D: Stateful>(dev: &mut D) {
    check_refusals_with(dev, |a, b| a == b);
}

/// [`check_refusals`] for a device whose state moves on its own (a timer): `unchanged(before,
/// now)` says whether the device is still as it was.
pub fn check_refusals_with<D: Stateful>(
    dev: &mut D,
    unchanged: impl Fn(&D::State, &D::State) -> bool,
) {
    let before = dev.state();
    let good = serde_json::to_value(&before).unwrap();
    let version = good["version"].as_u64().unwrap() as u32;

    for found in [0, version + 1, u32::MAX] {
        let mut s = good.clone();
        s["version"] = found.into();
        let s: D::State = serde_json::from_value(s).unwrap();
        assert_eq!(
            dev.restore(&s),
            Err(StateError::Version {
                device: D::NAME,
                found,
                supported: version,
            })
        );
        assert!(
            unchanged(&before, &dev.state()),
            "{}: a refused version changed it",
            D::NAME
        );
    }

    let replacements = [
        serde_json::json!("x"),
        serde_json::json!(-1),
        serde_json::json!(256),
        serde_json::json!(1u64 << 40),
        serde_json::json!(null),
        serde_json::json!(true),
        serde_json::json!([]),
        serde_json::json!([1, 2, 3]),
        serde_json::json!(vec![0x41; 65]),
        serde_json::json!(vec![0; 129]),
        serde_json::json!(vec![300; 128]),
        serde_json::json!({}),
    ];
    let fields: Vec<String> = good.as_object().unwrap().keys().cloned().collect();
    for field in &fields {
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove(field);
        assert!(
            serde_json::from_value::<D::State>(missing).is_err(),
            "{}: a state without `{field}` was read",
            D::NAME
        );
        for r in &replacements {
            let mut s = good.clone();
            s[field] = r.clone();
            let Ok(s) = serde_json::from_value::<D::State>(s) else {
                continue;
            };
            match dev.restore(&s) {
                Ok(()) => dev.restore(&before).unwrap(),
                Err(_) => assert!(
                    unchanged(&before, &dev.state()),
                    "{}: a refused `{field}: {r}` changed it",
                    D::NAME
                ),
            }
        }
    }

    let mut unknown = good.clone();
    unknown["bogus"] = 1.into();
    assert!(
        serde_json::from_value::<D::State>(unknown).is_err(),
        "{}: an unknown field was accepted",
        D::NAME
    );
    for text in ["", "{", "[]", "null", "42", "\"state\""] {
        assert!(
            serde_json::from_str::<D::State>(text).is_err(),
            "{}: `{text}` was read as a state",
            D::NAME
        );
    }
    assert!(unchanged(&before, &dev.state()));
}

/// A sink whose output a test reads back (clones share it).
#[derive(Clone, Default)]
pub struct Shared(pub Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A sink whose reader has gone: every write fails.
pub struct Broken;

impl Write for Broken {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::BrokenPipe))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
