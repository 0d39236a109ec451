//! Virtio device activations and resets on their way to the event monitor (the original's
//! `virtio-device` events): queued by the vCPU whose access made them, written by the control
//! loop. A guest can reset and start a device in a loop, and each event is a write to the
//! event file, so at most `PER_SECOND` go through in any one-second window; the rest are
//! counted and the control loop says how many it dropped.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Events a second that reach the event monitor.
pub const PER_SECOND: u32 = 100;
const WINDOW: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct DeviceEvents {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    events: Vec<(String, &'static str)>,
    window: Option<Instant>,
    in_window: u32,
    dropped: u64,
}

impl DeviceEvents {
    /// Queues `event` of device `id`, made at `now`; false if it was dropped.
    pub fn push(&self, id: &str, event: &'static str, now: Instant) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.window.is_none_or(|w| now.duration_since(w) >= WINDOW) {
            q.window = Some(now);
            q.in_window = 0;
        }
        if q.in_window >= PER_SECOND {
            q.dropped += 1;
            return false;
        }
        q.in_window += 1;
        q.events.push((id.to_string(), event));
        true
    }

    /// The queued events in order, and how many were dropped since the last call.
    pub fn take(&self) -> (Vec<(String, &'static str)>, u64) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        (
            std::mem::take(&mut q.events),
            std::mem::take(&mut q.dropped),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest resetting a device 10 000 times in a second gets `PER_SECOND` events through;
    /// the next second starts afresh.
    #[test]
    fn a_reset_loop_is_capped() {
        let d = DeviceEvents::default();
        let t0 = Instant::now();
        let queued = (0..10_000)
            .filter(|i| d.push("_disk0", "reset", t0 + Duration::from_micros(*i)))
            .count();
        assert_eq!(queued, PER_SECOND as usize);
        let (events, dropped) = d.take();
        assert_eq!((events.len(), dropped), (PER_SECOND as usize, 10_000 - 100));
        assert_eq!(events[0], ("_disk0".to_string(), "reset"));
        assert!(d.push("__rng", "activated", t0 + WINDOW));
        assert_eq!(d.take(), (vec![("__rng".to_string(), "activated")], 0));
    }
}
