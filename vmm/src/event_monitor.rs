//! `--event-monitor`: a stream of lifecycle events as JSON objects, shaped like the original's:
//! `{"timestamp": {"secs", "nanos"}, "source", "event", "properties"}`, each followed by a blank
//! line. Timestamps count from the VMM's start.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use log::warn;
use serde::Serialize;

#[derive(Serialize)]
struct Timestamp {
    secs: u64,
    nanos: u32,
}

#[derive(Serialize)]
struct Event<'a> {
    timestamp: Timestamp,
    source: &'a str,
    event: &'a str,
    properties: Option<&'a BTreeMap<String, String>>,
}

pub struct EventMonitor {
    sink: Option<Box<dyn Write + Send>>,
    start: Instant,
}

impl EventMonitor {
    pub fn new(sink: Option<Box<dyn Write + Send>>, start: Instant) -> Self {
        EventMonitor { sink, start }
    }

    pub fn emit(&mut self, source: &str, event: &str) {
        self.emit_with(source, event, None);
    }

    pub fn emit_with(
        &mut self,
        source: &str,
        event: &str,
        properties: Option<&BTreeMap<String, String>>,
    ) {
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        let t: Duration = self.start.elapsed();
        let ev = Event {
            timestamp: Timestamp {
                secs: t.as_secs(),
                nanos: t.subsec_nanos(),
            },
            source,
            event,
            properties,
        };
        let written = serde_json::to_vec_pretty(&ev)
            .map_err(std::io::Error::other)
            .and_then(|mut bytes| {
                bytes.extend_from_slice(b"\n\n");
                sink.write_all(&bytes)?;
                sink.flush()
            });
        if let Err(e) = written {
            warn!("event monitor: {e}; no more events will be written");
            self.sink = None;
        }
    }
}

/// An event's properties from key-value pairs.
pub fn properties<const N: usize>(kv: [(&str, String); N]) -> BTreeMap<String, String> {
    kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn events_have_the_original_shape() {
        let out = Shared::default();
        let mut m = EventMonitor::new(Some(Box::new(out.clone())), Instant::now());
        m.emit("vmm", "starting");
        let mut props = BTreeMap::new();
        props.insert("id".to_string(), "x".to_string());
        m.emit_with("vm", "booted", Some(&props));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&text)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["source"], "vmm");
        assert_eq!(events[0]["event"], "starting");
        assert!(events[0]["properties"].is_null());
        assert!(events[0]["timestamp"]["secs"].is_u64());
        assert!(events[0]["timestamp"]["nanos"].is_u64());
        assert_eq!(events[1]["properties"]["id"], "x");
    }
}
