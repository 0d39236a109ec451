//! `--net vhost_user=on,socket=,vhost_mode=`: what is accepted (the original's keys), what is
//! refused (a TAP's keys, rate limits), and the API's JSON shape.

use super::*;

#[test]
fn vhost_user_net_as_the_original_takes_it() {
    let n = NetConfig::parse("vhost_user=on,socket=/run/vun.sock").unwrap();
    assert!(n.vhost_user);
    assert_eq!(n.vhost_socket.as_deref(), Some("/run/vun.sock"));
    assert_eq!(n.vhost_mode, VhostMode::Client);
    assert_eq!((n.num_queues, n.queue_size), (2, 256));
    let n = NetConfig::parse(
        "vhost_user=true,socket=/s,vhost_mode=Server,num_queues=4,queue_size=1024,\
         mac=52:54:00:aa:bb:cc,id=vnet0,mtu=1400,offload_tso=off,pci_device_id=5",
    )
    .unwrap();
    assert_eq!(n.vhost_mode, VhostMode::Server);
    assert_eq!((n.num_queues, n.queue_size, n.mtu), (4, 1024, Some(1400)));
    assert_eq!(n.mac.as_deref(), Some("52:54:00:aa:bb:cc"));
    assert_eq!(
        (n.pci_common.id.as_deref(), n.pci_common.pci_device_id),
        (Some("vnet0"), Some(5))
    );
    assert!(!n.offload_tso && n.offload_csum);
    // Empty values ask for nothing, as everywhere.
    assert!(NetConfig::parse("vhost_user=on,socket=/s,tap=,ip=,mask=").is_ok());
}

#[test]
fn a_taps_keys_do_not_go_with_vhost_user() {
    for (bad, why) in [
        ("vhost_user=on", "needs socket="),
        ("vhost_user=on,socket=", "needs socket="),
        (
            "vhost_user=on,socket=/s,tap=t0",
            "'tap' does not go with vhost_user=on",
        ),
        (
            "vhost_user=on,socket=/s,ip=10.0.0.1,mask=255.0.0.0",
            "'ip' does not go",
        ),
        (
            "vhost_user=on,socket=/s,mask=255.0.0.0",
            "'mask' does not go",
        ),
        (
            "vhost_user=on,socket=/s,host_mac=52:54:00:00:00:01",
            "'host_mac' does not go",
        ),
        ("vhost_user=on,socket=/s,fd=3", "'fd' does not go"),
        (
            "vhost_user=on,socket=/s,bw_size=1000,bw_refill_time=10",
            "'bw_size' does not go",
        ),
        (
            "vhost_user=on,socket=/s,ops_size=10,ops_refill_time=10",
            "'ops_size' does not go",
        ),
        (
            "vhost_user=on,socket=/s,iommu=on",
            "cannot be placed behind the IOMMU",
        ),
        (
            "vhost_user=on,socket=/s,vhost_mode=both",
            "client or server",
        ),
        ("vhost_user=on,socket=/s,num_queues=3", "even number"),
        ("vhost_user=on,socket=/s,queue_size=100", "power of two"),
        ("vhost_user=maybe,socket=/s", "vhost_user"),
        ("socket=/s", "needs vhost_user=on"),
        ("tap=t0,vhost_mode=server", "needs vhost_user=on"),
    ] {
        let e = NetConfig::parse(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
        assert!(e.starts_with(&format!("--net {bad}: ")), "{e}");
    }
    // Without vhost-user, vhost_mode=client is the default and harmless.
    assert!(NetConfig::parse("tap=t0,vhost_mode=client").is_ok());
}

#[test]
fn the_api_shape_is_the_originals() {
    let n = NetConfig::parse("vhost_user=on,socket=/s,vhost_mode=server").unwrap();
    let v = serde_json::to_value(&n).unwrap();
    assert_eq!(v["vhost_user"], true);
    assert_eq!(v["vhost_socket"], "/s");
    assert_eq!(v["vhost_mode"], "Server");
    let back: NetConfig = serde_json::from_value(v).unwrap();
    assert_eq!(back, n);
    // The same rules for a configuration from the API.
    let bad: NetConfig = serde_json::from_value(serde_json::json!({
        "vhost_user": true, "vhost_socket": "/s", "tap": "t0"
    }))
    .unwrap();
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("'tap' does not go with vhost_user=on"), "{e}");
    assert!(e.starts_with("--net socket=/s: "), "{e}");
    let bad: NetConfig = serde_json::from_value(serde_json::json!({"vhost_user": true})).unwrap();
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("needs socket="));
}

#[test]
fn vhost_user_net_needs_shared_memory() {
    let mut v: crate::VmConfig = serde_json::from_value(serde_json::json!({
        "payload": {"kernel": std::env::current_exe().unwrap()},
        "net": [{"vhost_user": true, "vhost_socket": "/s"}]
    }))
    .unwrap();
    let e = v.validate().unwrap_err().to_string();
    assert!(
        e.contains("--net vhost_user=on needs --memory shared=on"),
        "{e}"
    );
    v.memory.shared = true;
    v.validate().unwrap();
}
