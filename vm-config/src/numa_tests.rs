use super::*;

fn parse(raw: &str) -> Result<NumaConfig, ConfigError> {
    NumaConfig::parse(raw)
}

#[test]
fn nodes_parse_with_the_original_syntax() {
    let n = parse("guest_numa_id=1,cpus=[0-2,5],distances=[0@20,1@10],memory_zones=[a,b]").unwrap();
    assert_eq!(n.guest_numa_id, 1);
    assert_eq!(n.cpus, Some(vec![0, 1, 2, 5]));
    assert_eq!(
        n.distances,
        Some(vec![
            NumaDistance {
                destination: 0,
                distance: 20
            },
            NumaDistance {
                destination: 1,
                distance: 10
            }
        ])
    );
    assert_eq!(n.memory_zones, Some(vec!["a".to_string(), "b".to_string()]));
    let n = parse("guest_numa_id=0,cpus=3,memory_zones=z").unwrap();
    assert_eq!(
        (n.cpus, n.memory_zones),
        (Some(vec![3]), Some(vec!["z".into()]))
    );
    let json = serde_json::to_value(parse("guest_numa_id=0,cpus=[0]").unwrap()).unwrap();
    assert_eq!(json, serde_json::json!({"guest_numa_id": 0, "cpus": [0]}));
}

#[test]
fn bad_nodes_name_the_option_and_value() {
    for (raw, why) in [
        ("cpus=[0]", "guest_numa_id is required"),
        ("guest_numa_id=x,cpus=[0]", "must be a number"),
        ("guest_numa_id=0", "either device_id or cpus/memory_zones"),
        ("guest_numa_id=0,cpus=[]", "'' is not a number"),
        ("guest_numa_id=0,cpus=[3-1]", "not a rising range"),
        // Found by the config_options fuzzer: the range was expanded first (out of memory).
        (
            "guest_numa_id=0,cpus=[0-1919999999]",
            "cpus: '1919999999' is more than 253",
        ),
        ("guest_numa_id=0,cpus=254", "cpus: '254' is more than 253"),
        (
            "guest_numa_id=0,cpus=[0],distances=[1-20]",
            "not <node>@<distance>",
        ),
        (
            "guest_numa_id=0,cpus=[0],distances=[1@300]",
            "not <node>@<distance>",
        ),
        (
            "guest_numa_id=1,device_id=gpu0,cpus=[1]",
            "mutually exclusive with cpus and memory_zones",
        ),
        (
            "guest_numa_id=1,device_id=gpu0,memory_zones=[z]",
            "mutually exclusive with cpus and memory_zones",
        ),
        ("guest_numa_id=0,cpus=[0],bogus=1", "unknown key 'bogus'"),
    ] {
        let e = parse(raw).unwrap_err();
        assert_eq!((e.option.as_str(), e.value.as_str()), ("--numa", raw));
        assert!(e.msg.contains(why), "{raw}: {e}");
    }
}

#[test]
fn nodes_are_checked_against_each_other_and_the_vm() {
    let nodes =
        |raws: &[&str]| -> Vec<NumaConfig> { raws.iter().map(|r| parse(r).unwrap()).collect() };
    validate_nodes(
        &nodes(&[
            "guest_numa_id=0,cpus=[0],memory_zones=[a],distances=[1@20]",
            "guest_numa_id=1,cpus=[1],memory_zones=[b]",
        ]),
        &["a", "b"],
        2,
        1,
    )
    .unwrap();
    validate_nodes(
        &nodes(&[
            "guest_numa_id=0,cpus=[0],pci_segments=[0,2]",
            "guest_numa_id=1,cpus=[1],pci_segments=[1]",
        ]),
        &[],
        2,
        3,
    )
    .unwrap();
    for (raws, why) in [
        (
            &["guest_numa_id=0,cpus=[0]", "guest_numa_id=0,cpus=[1]"][..],
            "defined twice",
        ),
        (
            &["guest_numa_id=0,memory_zones=[c]"][..],
            "no --memory-zone has the id c",
        ),
        (
            &[
                "guest_numa_id=0,memory_zones=[a]",
                "guest_numa_id=1,memory_zones=[a]",
            ][..],
            "multiple NUMA nodes: 0 and 1",
        ),
        (&["guest_numa_id=0,cpus=[2]"][..], "not below max_vcpus (2)"),
        (
            &["guest_numa_id=0,cpus=[0]", "guest_numa_id=1,cpus=[0]"][..],
            "vCPU 0 belongs to multiple",
        ),
        (
            &["guest_numa_id=0,cpus=[0],distances=[5@20]"][..],
            "unknown destination NUMA node 5",
        ),
        (
            &["guest_numa_id=0,cpus=[0],distances=[0@10,0@10]"][..],
            "already set",
        ),
        (
            &["guest_numa_id=0,cpus=[0],distances=[0@20]"][..],
            "to itself is 10",
        ),
        (
            &[
                "guest_numa_id=0,cpus=[0],distances=[1@10]",
                "guest_numa_id=1,cpus=[1]",
            ][..],
            "above 10",
        ),
        (
            &["guest_numa_id=0,cpus=[0],pci_segments=[3]"][..],
            "segment 3: the VM has 3 PCI segment(s)",
        ),
        (
            &[
                "guest_numa_id=0,cpus=[0]",
                "guest_numa_id=1,cpus=[1],pci_segments=[0]",
            ][..],
            "segment 0 can only belong to NUMA node 0",
        ),
        (
            &[
                "guest_numa_id=0,cpus=[0],pci_segments=[1]",
                "guest_numa_id=1,cpus=[1],pci_segments=[1]",
            ][..],
            "PCI segment 1 belongs to multiple NUMA nodes: 0 and 1",
        ),
    ] {
        let e = validate_nodes(&nodes(raws), &["a", "b"], 2, 3).unwrap_err();
        assert_eq!(e.option, "--numa");
        assert!(e.msg.contains(why), "{raws:?}: {e}");
    }
}

#[test]
fn numa_in_vm_create() {
    let cfg: crate::VmConfig = serde_json::from_str(
        r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "memory": {"size": 0, "zones": [{"id": "a", "size": 4096}, {"id": "b", "size": 4096}]},
            "numa": [{"guest_numa_id": 0, "cpus": [0], "memory_zones": ["a"]},
                     {"guest_numa_id": 1, "cpus": [1], "memory_zones": ["b"],
                      "distances": [{"destination": 0, "distance": 20}]}]}"#,
    )
    .unwrap();
    assert_eq!(cfg.numa.as_ref().unwrap().len(), 2);
    let none: crate::VmConfig =
        serde_json::from_str(r#"{"payload": {"kernel": "/k"}, "numa": []}"#).unwrap();
    assert!(none.numa.is_none());
    let kernel = std::env::current_exe().unwrap();
    let mut bad: crate::VmConfig = serde_json::from_value(serde_json::json!({
        "payload": {"kernel": kernel},
        "numa": [{"guest_numa_id": 0, "memory_zones": ["x"]}]
    }))
    .unwrap();
    let e = bad.validate().unwrap_err();
    assert_eq!(e.option, "--numa", "{e}");
}

/// `device_id` (a generic initiator): a node of that device alone, with distances; the JSON as
/// the original writes it.
#[test]
fn generic_initiator_nodes() {
    let n = NumaConfig::parse("guest_numa_id=2,device_id=gpu0,distances=[0@30]").unwrap();
    assert_eq!(n.device_id.as_deref(), Some("gpu0"));
    assert_eq!((n.cpus.as_ref(), n.memory_zones.as_ref()), (None, None));
    let json = serde_json::to_value(&n).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"guest_numa_id": 2, "device_id": "gpu0",
            "distances": [{"destination": 0, "distance": 30}]})
    );
    let e = NumaConfig {
        device_id: Some(String::new()),
        ..n
    }
    .validate()
    .unwrap_err();
    assert!(e.contains("cannot be empty"), "{e}");
}
