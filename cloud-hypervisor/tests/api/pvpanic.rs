//! `--pvpanic` (`"pvpanic": true`): the test guest (`test=pvpanic`) finds the device by its
//! IDs, reads the supported events from its BAR and reports a panic; the VMM writes the
//! original's `guest`/`panic` event and the VM runs on.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

#[test]
fn a_guest_panic_is_reported_and_the_vm_runs_on() {
    require_curl();
    let dir = crate::common::scratch("pvpanic-events");
    let monitor = dir.join("events.json");
    let vmm = Vmm::start(
        "pvpanic",
        &["--event-monitor", &format!("path={}", monitor.display())],
    );
    let serial = vmm.dir.join("serial.out");
    let mut config: Value =
        serde_json::from_str(&guest_config("pvpanic pvpanic_then=wait", &serial)).unwrap();
    config["pvpanic"] = true.into();
    assert_eq!(
        vmm.curl("PUT", "vm.create", Some(&config.to_string())).0,
        204
    );
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_line(&serial, "READY", 1, Duration::from_secs(15));
    let text = serial_text(&serial);
    assert!(text.contains("PVPANIC reported"), "{text}");
    assert!(text.contains("PASS pvpanic-events"), "{text}");
    assert_no_fail(&serial);

    // The original's event: source "guest", event "panic", the event's name. The device
    // tells the control loop, which writes the event, while the guest goes on: the guest's
    // line can come first.
    let panics = |raw: &str| -> Vec<Value> {
        serde_json::Deserializer::from_str(raw)
            .into_iter::<Value>()
            // A read can catch an event half written.
            .map_while(Result::ok)
            .filter(|e| e["source"] == "guest" && e["event"] == "panic")
            .collect()
    };
    let read = || std::fs::read_to_string(&monitor).unwrap_or_default();
    crate::common::wait_until(
        Duration::from_secs(10),
        "no guest panic event in the event monitor's file",
        || !panics(&read()).is_empty(),
    );
    // Still one, a moment later.
    std::thread::sleep(Duration::from_millis(100));
    let raw = read();
    let panics = panics(&raw);
    assert_eq!(panics.len(), 1, "{raw}");
    assert_eq!(panics[0]["properties"]["event"], "panic", "{raw}");

    // The VMM and the VM go on.
    vmm.ok_json("vmm.ping");
    assert_eq!(vmm.state(), "Running");
    let info = vmm.ok_json("vm.info");
    assert_eq!(info["config"]["pvpanic"], true, "{info}");
    let node = &info["device_tree"]["__pvpanic"];
    assert!(
        node["pci_bdf"]
            .as_str()
            .is_some_and(|b| b.starts_with("0000:00:")),
        "vm.info lists the device with its PCI address: {info}"
    );
}
