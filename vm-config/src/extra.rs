//! Keys of the original's configuration objects that this VMM does not model (a net device's
//! `vdpa` keys, ...). Each object keeps the keys it does not know, and validation refuses
//! every one that asks for something, naming it: a client never believes it got what it did
//! not. A key at its "nothing" value (null, false, 0, an empty string, list or object), as the
//! original's own clients send its defaults, is accepted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ConfigError;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Extra(pub BTreeMap<String, Value>);

/// Whether `v` asks for nothing.
pub(crate) fn is_nothing(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_u64() == Some(0) || n.as_i64() == Some(0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// `v` as JSON, cut to a line.
pub(crate) fn shown(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 80 {
        let mut cut = 77;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

impl Extra {
    /// Refuses the first key that asks for something, as `<object>.<key>` (`<key>` for the
    /// top level, `object` empty).
    pub fn check(&self, object: &str) -> Result<(), ConfigError> {
        match self.0.iter().find(|(_, v)| !is_nothing(v)) {
            None => Ok(()),
            Some((k, v)) => Err(ConfigError::new(
                &if object.is_empty() {
                    k.clone()
                } else {
                    format!("{object}.{k}")
                },
                &shown(v),
                "this field is not supported yet".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_passes_and_anything_else_is_named() {
        let e: Extra = serde_json::from_str(
            r#"{"affinity": null, "a": false, "b": 0, "c": "", "d": [], "e": {}}"#,
        )
        .unwrap();
        e.check("cpus").unwrap();
        for (json, key) in [
            (
                r#"{"affinity": [{"vcpu": 0, "host_cpus": [1]}]}"#,
                "cpus.affinity",
            ),
            (r#"{"x": true}"#, "cpus.x"),
            (r#"{"x": 3}"#, "cpus.x"),
            (r#"{"x": "Vcpu"}"#, "cpus.x"),
        ] {
            let e: Extra = serde_json::from_str(json).unwrap();
            let err = e.check("cpus").unwrap_err();
            assert_eq!(err.option, key, "{json}");
            assert!(err.to_string().contains("not supported yet"), "{err}");
        }
    }
}
