//! Runs `scripts/api-contract` (the responses of a live VMM checked against docs/openapi.yaml)
//! as part of the test suite.

use std::path::Path;
use std::process::Command;

use super::common::{guest, VMM};

/// A Python that has the contract script's two modules (pyenv's may lack Debian's packages).
fn python() -> &'static str {
    for py in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(py)
            .args(["-c", "import jsonschema, yaml"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return py;
        }
    }
    panic!("no python3 with jsonschema and yaml: install python3-jsonschema and python3-yaml");
}

#[test]
fn responses_match_the_openapi_document() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(python())
        .arg(root.join("scripts/api-contract"))
        .arg(VMM)
        .arg(&guest().elf_pvh)
        .current_dir(&root)
        .output()
        .expect("running scripts/api-contract");
    assert!(
        out.status.success(),
        "contract check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The contract checker itself: it must reject deliberately wrong answers (a bad state, a
/// missing or extra field, a wrong type, an undocumented status, a body on 204, the wrong
/// Content-Type) and accept right ones, or a passing contract run would prove nothing.
#[test]
fn the_contract_checker_rejects_wrong_answers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(python())
        .arg(root.join("scripts/api-contract"))
        .arg("--self-test")
        .current_dir(&root)
        .output()
        .expect("running scripts/api-contract --self-test");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("0 misjudged"), "{text}");
}
