//! `ch-remote`'s help, whole and per subcommand, is the original's word for word (the
//! reference texts beside this file were taken from the original's `ch-remote`).

use std::process::Command;

const CH_REMOTE: &str = env!("CARGO_BIN_EXE_ch-remote");

fn help(args: &[&str]) -> String {
    let out = Command::new(CH_REMOTE)
        .args(args)
        .arg("--help")
        .output()
        .expect("running ch-remote");
    assert!(out.status.success(), "ch-remote {args:?} --help");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

#[test]
fn top_level_help_is_the_original() {
    assert_eq!(help(&[]), include_str!("ch-remote-help.txt"));
}

#[test]
fn subcommand_help_is_the_original() {
    let reference = include_str!("ch-remote-subcommands.txt");
    let mut seen = 0;
    for block in reference.split("=== ch-remote ").skip(1) {
        let (name, text) = block.split_once('\n').expect("a subcommand block");
        assert_eq!(help(&[name]), text, "ch-remote {name} --help");
        seen += 1;
    }
    assert_eq!(seen, 31);
}
