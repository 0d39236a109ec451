//! A restore's `net_macs` (ours): a new guest MAC address for net devices of the snapshot, so
//! each clone of one snapshot shows its own address. `--restore ...,net_macs=[<id>@<mac>,...]`
//! on the command line (and `ch-remote restore`), `"net_macs": [{"id", "mac"}]` in
//! `vm.restore`'s body, beside the original's `net_fds` (whose syntax has no room for it).

use serde::{Deserialize, Serialize};

/// One net device's new guest MAC address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoredNetMac {
    /// The snapshot's net device (its `id`, e.g. `_net0`).
    pub id: String,
    /// A unicast MAC address, `12:34:56:78:9a:bc`.
    pub mac: String,
}

/// A guest MAC address as `--net mac=` takes it: six two-digit hex bytes, unicast; lower case.
pub(crate) fn guest_mac(v: &str) -> Result<String, String> {
    crate::devices::mac_address(v)
}

/// Checks `net_macs` as a whole: every id given, each once, every address a unicast MAC. The
/// errors start with `net_macs:` and name the entry. Whether the snapshot has such net devices
/// is for the VMM to say once it has read the snapshot's configuration.
pub(crate) fn check_net_macs(macs: &[RestoredNetMac]) -> Result<(), String> {
    for (i, m) in macs.iter().enumerate() {
        if m.id.is_empty() {
            return Err(format!("net_macs: entry {i} has an empty id"));
        }
        guest_mac(&m.mac).map_err(|e| format!("net_macs: {}: {e}", m.id))?;
        if macs[..i].iter().any(|o| o.id == m.id) {
            return Err(format!(
                "net_macs: net device '{}' is given more than one MAC",
                m.id
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RestoreConfig;

    fn parse_err(raw: &str) -> String {
        RestoreConfig::parse(raw).unwrap_err().to_string()
    }

    fn invalid(raw: &str) -> String {
        RestoreConfig::parse(raw)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn net_macs_from_the_command_line() {
        let c = RestoreConfig::parse(
            "source_url=file:///s,net_fds=[_net0@[3]],net_macs=[_net0@52:54:00:AB:cd:01,net1@02:00:00:00:00:02]",
        )
        .unwrap();
        assert_eq!(
            c.net_macs,
            [
                RestoredNetMac {
                    id: "_net0".into(),
                    mac: "52:54:00:ab:cd:01".into()
                },
                RestoredNetMac {
                    id: "net1".into(),
                    mac: "02:00:00:00:00:02".into()
                }
            ]
        );
        c.validate().unwrap();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v["net_macs"],
            serde_json::json!([
                {"id": "_net0", "mac": "52:54:00:ab:cd:01"},
                {"id": "net1", "mac": "02:00:00:00:00:02"}
            ])
        );
        // Not given: not in the JSON either (the original's body, unchanged).
        let c = RestoreConfig::parse("source_url=file:///s").unwrap();
        assert!(c.net_macs.is_empty());
        assert!(serde_json::to_value(&c).unwrap().get("net_macs").is_none());
    }

    #[test]
    fn bad_net_macs_are_one_line_naming_option_and_value() {
        assert_eq!(
            parse_err("source_url=file:///s,net_macs=[_net0@52:54:00:12:34]"),
            "--restore source_url=file:///s,net_macs=[_net0@52:54:00:12:34]: net_macs: _net0: \
             '52:54:00:12:34' is not a MAC address (want six hex bytes like 12:34:56:78:9a:bc) \
             (expected [<id>@<mac>,...])"
        );
        assert_eq!(
            parse_err("source_url=file:///s,net_macs=[_net0@01:00:5e:00:00:01]"),
            "--restore source_url=file:///s,net_macs=[_net0@01:00:5e:00:00:01]: net_macs: _net0: \
             01:00:5e:00:00:01 is a multicast address (expected [<id>@<mac>,...])"
        );
        for bad in [
            "net_macs=[]",
            "net_macs=_net0@52:54:00:12:34:56",
            "net_macs=[@52:54:00:12:34:56]",
            "net_macs=[_net0]",
            "net_macs=[_net0@]",
            "net_macs=[_net0@zz:54:00:12:34:56]",
            "net_macs=[_net0@52:54:00:12:34:56:78]",
            "net_macs=[_net0@ff:ff:ff:ff:ff:ff]",
        ] {
            let raw = format!("source_url=file:///s,{bad}");
            let e = parse_err(&raw);
            assert!(e.starts_with(&format!("--restore {raw}: net_macs")), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        assert_eq!(
            invalid(
                "source_url=file:///s,net_macs=[_net0@52:54:00:12:34:56,_net0@52:54:00:12:34:57]"
            ),
            "--restore file:///s: net_macs: net device '_net0' is given more than one MAC"
        );
    }

    /// The API's body is checked alike (a 400 before the VMM is asked).
    #[test]
    fn json_net_macs_validate_alike() {
        let ok: RestoreConfig = serde_json::from_str(
            r#"{"source_url": "file:///s", "net_macs": [{"id": "_net0", "mac": "52:54:00:12:34:56"}]}"#,
        )
        .unwrap();
        ok.validate().unwrap();
        for (body, why) in [
            (
                r#"[{"id": "_net0", "mac": "52:54:00:12:34"}]"#,
                "is not a MAC address",
            ),
            (
                r#"[{"id": "_net0", "mac": "33:33:00:00:00:01"}]"#,
                "multicast",
            ),
            (r#"[{"id": "", "mac": "52:54:00:12:34:56"}]"#, "empty id"),
        ] {
            let c: RestoreConfig = serde_json::from_str(&format!(
                r#"{{"source_url": "file:///s", "net_macs": {body}}}"#
            ))
            .unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with("--restore file:///s: net_macs: "), "{e}");
            assert!(e.contains(why), "{e}");
        }
        // An entry is exactly {id, mac}.
        assert!(serde_json::from_str::<RestoreConfig>(
            r#"{"source_url": "file:///s", "net_macs": [{"id": "_net0"}]}"#
        )
        .is_err());
        assert!(serde_json::from_str::<RestoreConfig>(
            r#"{"source_url": "file:///s", "net_macs": [{"id": "a", "mac": "52:54:00:12:34:56", "x": 1}]}"#
        )
        .is_err());
    }
}
