//! The JSON bodies of every API endpoint, decoded as the server decodes them; an accepted
//! `vm.create` configuration is validated and goes through the JSON round trip `vm.info` and a
//! snapshot's `config.json` make.
//!
//! Input: a selector byte (the endpoint, in `api::ENDPOINTS` order), then the body.

use api::{ApiRequest, ENDPOINTS};

pub fn bodies(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let (name, _, ep) = ENDPOINTS[usize::from(sel) % ENDPOINTS.len()];
    if let Ok(ApiRequest::VmCreate(mut c)) = api::routes::request(name, ep, body, Vec::new()) {
        let _ = c.validate();
        let json = serde_json::to_vec(&c).expect("an accepted VmConfig serialises");
        let _: vm_config::VmConfig =
            serde_json::from_slice(&json).expect("an accepted VmConfig reads back");
    }
}

/// Seeds: bodies as the original's `ch-remote` and API users send them.
pub fn seeds() -> Vec<Vec<u8>> {
    let bodies: &[(&str, &str)] = &[
        (
            "vm.create",
            r#"{"cpus":{"boot_vcpus":2,"max_vcpus":4},"memory":{"size":1073741824,"shared":true,"hotplug_method":"VirtioMem","hotplug_size":1073741824},"payload":{"kernel":"/boot/vmlinux","cmdline":"console=ttyS0 root=/dev/vda1","initramfs":"/boot/initrd"},"disks":[{"path":"/var/img/os.qcow2","readonly":false,"num_queues":2,"queue_size":128,"id":"disk0"}],"net":[{"tap":"tap0","mac":"52:54:00:12:34:56","ip":"192.168.249.1","mask":"255.255.255.0","num_queues":2,"queue_size":256}],"rng":{"src":"/dev/urandom"},"serial":{"mode":"Tty"},"console":{"mode":"Off"},"balloon":{"size":0,"deflate_on_oom":true},"vsock":{"cid":3,"socket":"/tmp/vsock"},"pvpanic":true,"watchdog":true}"#,
        ),
        (
            "vm.create",
            r#"{"payload":{"firmware":"/fw/hypervisor-fw"},"memory":{"size":536870912},"pmem":[{"file":"/tmp/p.img","size":134217728,"discard_writes":true}],"platform":{"num_pci_segments":1,"serial_number":"s","uuid":"1e8aa0a3-7eb5-4c8c-a5b5-3e2fd3c6d13f"},"landlock_enable":true,"landlock_rules":[{"path":"/tmp","access":"rw"}]}"#,
        ),
        (
            "vm.add-disk",
            r#"{"path":"/var/img/data.raw","readonly":true,"id":"data0"}"#,
        ),
        (
            "vm.add-net",
            r#"{"tap":"tap1","mac":"52:54:00:00:00:02","id":"net1"}"#,
        ),
        (
            "vm.add-pmem",
            r#"{"file":"/tmp/pmem.img","size":2097152,"id":"pmem0"}"#,
        ),
        (
            "vm.add-generic-vhost-user",
            r#"{"socket":"/tmp/g.sock","queue_sizes":[256],"device_type":2,"id":"g0"}"#,
        ),
        (
            "vm.add-vsock",
            r#"{"cid":4,"socket":"/tmp/vs.sock","id":"vsock1"}"#,
        ),
        ("vm.remove-device", r#"{"id":"disk0"}"#),
        (
            "vm.resize",
            r#"{"desired_vcpus":4,"desired_ram":2147483648,"desired_balloon":0}"#,
        ),
        ("vm.snapshot", r#"{"destination_url":"file:///var/snap"}"#),
        ("vm.coredump", r#"{"destination_url":"file:///var/core"}"#),
        (
            "vm.resize-disk",
            r#"{"id":"disk0","desired_size":2147483648}"#,
        ),
        (
            "vm.restore",
            r#"{"source_url":"file:///var/snap","prefault":false,"memory_restore_mode":"OnDemand","resume":true}"#,
        ),
        (
            "vm.send-migration",
            r#"{"destination_url":"unix:/tmp/mig.sock","local":false,"downtime_ms":50}"#,
        ),
        (
            "vm.receive-migration",
            r#"{"receiver_url":"unix:/tmp/mig.sock"}"#,
        ),
        ("vm.boot", ""),
    ];
    bodies
        .iter()
        .map(|(name, body)| {
            let sel = ENDPOINTS
                .iter()
                .position(|(n, _, _)| n == name)
                .expect("an endpoint");
            let mut v = vec![sel as u8];
            v.extend_from_slice(body.as_bytes());
            v
        })
        .collect()
}

/// Seeds for `api_requests`: each endpoint requested as `ch-remote` does (the first byte sets
/// the read size: 64 bytes), with the bodies above where there is one.
pub fn request_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let bodies = seeds();
    for (i, (name, method, _)) in ENDPOINTS.iter().enumerate() {
        let body = bodies
            .iter()
            .find(|b| usize::from(b[0]) == i)
            .map_or(&[][..], |b| &b[1..]);
        let mut r = vec![63u8];
        r.extend_from_slice(
            format!(
                "{} /api/v1/{name} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                method.as_str(),
                body.len()
            )
            .as_bytes(),
        );
        r.extend_from_slice(body);
        out.push(r);
    }
    out
}
