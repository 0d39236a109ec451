//! Helpers for tests of saved states, here and in crates with PCI devices (feature
//! `test-utils`).

use serde_json::Value;

use crate::StateError;

/// Every JSON variant of `v` a corrupt or hostile state file could hold: each number replaced by
/// edge values and other types, each array shortened, emptied and lengthened, each field
/// dropped.
pub fn json_mutations(v: &Value) -> Vec<Value> {
    fn walk(v: &Value, path: &mut Vec<Value>, out: &mut Vec<(Vec<Value>, Option<Value>)>) {
        fn at(out: &mut Vec<(Vec<Value>, Option<Value>)>, p: &[Value], x: Option<Value>) {
            out.push((p.to_vec(), x));
        }
        match v {
            Value::Number(_) | Value::Bool(_) => {
                for x in [
                    serde_json::json!(0),
                    serde_json::json!(1),
                    serde_json::json!(3),
                    serde_json::json!(0xffff),
                    serde_json::json!(0x1_0000),
                    serde_json::json!(u32::MAX),
                    serde_json::json!(u64::MAX),
                    serde_json::json!(-1),
                    serde_json::json!(1.5),
                    serde_json::json!(true),
                    serde_json::json!("1"),
                    Value::Null,
                ] {
                    at(out, path, Some(x));
                }
            }
            Value::Array(a) => {
                let mut shorter = a.clone();
                shorter.pop();
                at(out, path, Some(Value::Array(shorter)));
                at(out, path, Some(Value::Array(vec![])));
                let mut longer = a.clone();
                longer.push(a.first().cloned().unwrap_or(serde_json::json!(0)));
                at(out, path, Some(Value::Array(longer)));
                for (i, x) in a.iter().enumerate() {
                    path.push(serde_json::json!(i));
                    walk(x, path, out);
                    path.pop();
                }
            }
            Value::Object(o) => {
                for (k, x) in o {
                    path.push(Value::String(k.clone()));
                    at(out, path, None);
                    walk(x, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    fn set(v: &mut Value, path: &[Value], x: &Option<Value>) {
        let (last, parents) = path.split_last().expect("a path");
        let mut cur = v;
        for p in parents {
            cur = match p {
                Value::String(k) => &mut cur[k.as_str()],
                Value::Number(n) => &mut cur[n.as_u64().unwrap() as usize],
                _ => unreachable!(),
            };
        }
        match (last, x) {
            (Value::String(k), None) => {
                cur.as_object_mut().unwrap().remove(k);
            }
            (Value::String(k), Some(x)) => cur[k.as_str()] = x.clone(),
            (Value::Number(n), Some(x)) => cur[n.as_u64().unwrap() as usize] = x.clone(),
            _ => unreachable!(),
        }
    }
    let mut edits = Vec::new();
    walk(v, &mut Vec::new(), &mut edits);
    let mut out: Vec<Value> = edits
        .iter()
        .filter(|(p, _)| !p.is_empty())
        .map(|(p, x)| {
            let mut m = v.clone();
            set(&mut m, p, x);
            m
        })
        .collect();
    out.extend([
        Value::Null,
        serde_json::json!([]),
        serde_json::json!("state"),
    ]);
    out
}

/// Feeds every mutation of `good` to `restore`: none may panic, and each refused one must
/// leave the object as `unchanged` says. Returns how many were taken and how many refused.
pub fn check_mutations<T: serde::de::DeserializeOwned>(
    good: &Value,
    mut restore: impl FnMut(&T) -> Result<(), StateError>,
    mut unchanged: impl FnMut() -> bool,
) -> (usize, usize) {
    let (mut taken, mut refused) = (0, 0);
    for m in json_mutations(good) {
        let Ok(s) = serde_json::from_value::<T>(m.clone()) else {
            refused += 1;
            continue;
        };
        match restore(&s) {
            Ok(()) => taken += 1,
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
                assert!(unchanged(), "refused state {m} changed the object: {e}");
            }
        }
    }
    (taken, refused)
}
