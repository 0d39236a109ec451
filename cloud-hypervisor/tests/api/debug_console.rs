//! `debug_console` through the API (`--debug-console`): the configuration as the original
//! shows it, the `__debug_console` node in the device tree, and the output file kept open
//! across a guest reboot (as the serial port's is).

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

#[test]
fn the_debug_console_writes_to_its_file_and_outlives_a_reboot() {
    let vmm = Vmm::start("debug-console", &[]);
    let serial = vmm.dir.join("serial.out");
    let out = vmm.dir.join("debug.out");
    let mut config: Value = serde_json::from_str(&guest_config(
        "debugcon debugcon_port=0x2f8 end=wait",
        &serial,
    ))
    .unwrap();
    config["debug_console"] = serde_json::json!({"mode": "File", "file": out, "iobase": 0x2f8});
    assert_eq!(
        vmm.curl("PUT", "vm.create", Some(&config.to_string())).0,
        204
    );
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_line(
        &serial,
        "SUMMARY passed=1 failed=0",
        1,
        Duration::from_secs(15),
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "DEBUGCON hello 0x2f8\n"
    );

    let info = vmm.ok_json("vm.info");
    assert_eq!(
        info["config"]["debug_console"],
        serde_json::json!({"mode": "File", "file": out, "iobase": 0x2f8}),
        "{info}"
    );
    assert_eq!(info["config"]["iommu"], false, "{info}");
    let tree = info["device_tree"].as_object().unwrap();
    for node in ["__debug_console", "__serial", "__ioapic"] {
        assert!(tree.contains_key(node), "no {node} in {tree:?}");
    }

    // The rebuilt VM writes on to the same file, after what the first boot wrote.
    assert_eq!(vmm.put("vm.reboot").0, 204);
    wait_line(
        &serial,
        "SUMMARY passed=1 failed=0",
        2,
        Duration::from_secs(15),
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "DEBUGCON hello 0x2f8\n".repeat(2)
    );
    assert_no_fail(&serial);
}

#[test]
fn a_debug_console_without_a_file_or_on_a_taken_port_is_refused() {
    let vmm = Vmm::start("debug-console-refused", &[]);
    let serial = vmm.dir.join("serial.out");
    let mut config: Value = serde_json::from_str(&guest_config("debugcon", &serial)).unwrap();
    config["debug_console"] = serde_json::json!({"mode": "File"});
    let (code, body) = vmm.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("--debug-console"), "{body}");

    // The serial port's: the boot fails naming the option, and the VMM goes on.
    config["debug_console"] = serde_json::json!({"mode": "Tty", "iobase": 0x3f8});
    assert_eq!(
        vmm.curl("PUT", "vm.create", Some(&config.to_string())).0,
        204
    );
    let (code, body) = vmm.put("vm.boot");
    assert!(code >= 400, "{code} {body}");
    assert!(
        body.contains("--debug-console iobase=0x3f8: another device has that I/O port"),
        "{body}"
    );
    vmm.ok_json("vmm.ping");
}
