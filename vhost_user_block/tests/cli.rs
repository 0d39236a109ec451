//! The binary's command line: a bad option or an image that cannot be served is one line on
//! standard error naming the option and value, exit status 1.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_vhost_user_block");

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_command_lines_are_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let good = format!("path={},socket={}", img.display(), sock.display());
    let missing = format!(
        "path={},socket={}",
        dir.path().join("nope.img").display(),
        sock.display()
    );
    for (args, want) in [
        (vec![], "--block-backend is required"),
        (vec!["--disk", "x"], "unknown argument \"--disk\""),
        (vec!["--block-backend"], "--block-backend needs a value"),
        (
            vec!["--block-backend", "path=/x,socket=/y,num_queues=0"],
            "--block-backend: num_queues=0: expected 1 to 64",
        ),
        (
            vec!["--block-backend", "socket=/y"],
            "--block-backend: path= is required",
        ),
        (
            vec!["--block-backend", &good, "--block-backend", &good],
            "--block-backend given twice",
        ),
        (vec!["--block-backend", &missing], "--block-backend: path="),
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("vhost_user_block: "), "{err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(!sock.exists());
}

#[test]
fn help_and_version() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("--block-backend"), "{out}");
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("vhost_user_block "), "{out}");
}
