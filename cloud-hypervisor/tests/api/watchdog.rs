//! `--watchdog` (`"watchdog": true`): the original's virtio-watchdog. The test guest
//! (`test=watchdog`) pings it three times and then stops, as a hung guest would; the VMM resets
//! the VM (the original's 15 s check, 20 s without a ping), which boots again.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

#[test]
fn a_guest_that_stops_pinging_is_reset() {
    require_curl();
    let dir = crate::common::scratch("watchdog-events");
    let monitor = dir.join("events.json");
    let vmm = Vmm::start(
        "watchdog",
        &["--event-monitor", &format!("path={}", monitor.display())],
    );
    let serial = vmm.dir.join("serial.out");
    let mut config: Value = serde_json::from_str(&guest_config("watchdog", &serial)).unwrap();
    config["watchdog"] = true.into();
    assert_eq!(
        vmm.curl("PUT", "vm.create", Some(&config.to_string())).0,
        204
    );
    assert_eq!(vmm.put("vm.boot").0, 204);
    let info = vmm.ok_json("vm.info");
    assert_eq!(info["config"]["watchdog"], true, "{info}");
    assert!(
        info["device_tree"]["__watchdog"].is_object(),
        "vm.info lists the watchdog: {info}"
    );
    wait_line(&serial, "WATCHDOG ping 3 ok", 1, Duration::from_secs(15));
    wait_line(&serial, "WATCHDOG stopped", 1, Duration::from_secs(5));
    let stopped = Instant::now();
    // Reset between 20 s (the timeout) and 35 s (the next 15 s check after it): the guest
    // boots again and pings anew.
    wait_line(&serial, "READY", 2, Duration::from_secs(45));
    let after = stopped.elapsed();
    assert!(
        after >= Duration::from_secs(19),
        "reset after {after:?}: too early"
    );
    let ev = events(&monitor);
    assert!(
        ev.iter().any(|e| e == "vm:rebooting") && ev.iter().any(|e| e == "vm:rebooted"),
        "{ev:?}"
    );
    wait_line(&serial, "WATCHDOG ping 1 ok", 2, Duration::from_secs(15));
    assert_eq!(vmm.state(), "Running");
}
