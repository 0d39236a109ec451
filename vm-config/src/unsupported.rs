//! The parts of the original's `VmConfig` that this VMM does not implement yet (disks, net,
//! rng, balloon, fs, generic_vhost_user, debug_console and iommu are real fields of
//! `VmConfig` now). The API accepts them only absent, `null`, empty or at their default, and refuses anything else naming the
//! field, so a client never believes it got a device it did not.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ConfigError;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UnsupportedConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_devices: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdpa: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sgx_epc: Option<Value>,
    /// Any other top-level key: refused unless it asks for nothing, as in every object.
    #[serde(flatten, skip_serializing)]
    pub other: crate::Extra,
}

/// Whether `v` asks for nothing: null, false, an empty list or object.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

impl UnsupportedConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.other.check("")?;
        let fields: [(&'static str, &Option<Value>); 4] = [
            ("devices", &self.devices),
            ("user_devices", &self.user_devices),
            ("vdpa", &self.vdpa),
            ("sgx_epc", &self.sgx_epc),
        ];
        for (name, value) in fields {
            let Some(v) = value else { continue };
            if is_empty(v) {
                continue;
            }
            return Err(ConfigError::new(
                name,
                &crate::extra::shown(v),
                "this field is not supported yet".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_top_level_keys_are_refused_unless_they_ask_for_nothing() {
        let c: UnsupportedConfig =
            serde_json::from_str(r#"{"ivshmem": null, "preserved_fds": []}"#).unwrap();
        c.validate().unwrap();
        let c: UnsupportedConfig = serde_json::from_str(r#"{"ivshmem": {"size": 1}}"#).unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.option, "ivshmem");
    }

    #[test]
    fn refuses_what_is_not_there_and_names_it() {
        let ok: UnsupportedConfig =
            serde_json::from_str(r#"{"vsock": null, "devices": [], "sgx_epc": null}"#).unwrap();
        ok.validate().unwrap();
        for (json, field) in [
            (r#"{"sgx_epc": [{"id": "e", "size": 4096}]}"#, "sgx_epc"),
            (r#"{"vdpa": [{"path": "/dev/vhost-vdpa-0"}]}"#, "vdpa"),
        ] {
            let c: UnsupportedConfig = serde_json::from_str(json).unwrap();
            let e = c.validate().unwrap_err();
            assert_eq!(e.option, field, "{json}");
            assert!(e.to_string().contains("not supported yet"), "{e}");
        }
    }
}
