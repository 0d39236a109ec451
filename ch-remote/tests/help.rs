//! `ch-remote`'s help, whole and per subcommand, is the original's word for word (the
//! reference texts beside this file were taken from the original's `ch-remote`), but for our
//! extensions (`send-migration --no-wait`), checked apart.

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

/// The original's help for `name` with our extensions: `send-migration --no-wait`.
fn with_extensions(name: &str, text: &str) -> String {
    if name != "send-migration" {
        return text.to_string();
    }
    let ours = text
        .replace(
            "Usage: ch-remote send-migration [send_migration_config]",
            "Usage: ch-remote send-migration [OPTIONS] [send_migration_config]",
        )
        .replace(
            "Options:\n  -h, --help  Print help\n",
            "Options:\n      --no-wait  Return once the migration has started, as the original's \
             ch-remote (by default: follow its progress until it completes or fails)\n  \
             -h, --help     Print help\n",
        );
    assert_ne!(ours, text, "the original's send-migration help has changed");
    ours
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
        assert_eq!(
            help(&[name]),
            with_extensions(name, text),
            "ch-remote {name} --help"
        );
        seen += 1;
    }
    assert_eq!(seen, 31);
}
