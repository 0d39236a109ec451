//! `vhost_user_block --block-backend "path=<image>,socket=<socket>,..."`: see lib.rs.

use vhost_user_block::config::{BackendConfig, SYNTAX};

const USAGE: &str = "usage: vhost_user_block --block-backend \
\"path=<image>,socket=<socket>[,num_queues=<n>][,queue_size=<n>][,readonly=on|off]\
[,direct=on|off][,poll_queue=on|off]\"";

/// One line on standard error, exit status 1.
fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("vhost_user_block: {msg}");
    std::process::exit(1);
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut args = std::env::args().skip(1);
    let mut value = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}\n\nLaunch a vhost-user-blk backend.\n--block-backend: {SYNTAX}");
                return;
            }
            "-V" | "--version" => {
                println!("vhost_user_block {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            "--block-backend" => match args.next() {
                Some(v) if value.is_none() => value = Some(v),
                Some(_) => die("--block-backend given twice"),
                None => die("--block-backend needs a value"),
            },
            _ => match a.strip_prefix("--block-backend=") {
                Some(v) if value.is_none() => value = Some(v.to_string()),
                Some(_) => die("--block-backend given twice"),
                None => die(format_args!("unknown argument {a:?} ({USAGE})")),
            },
        }
    }
    let Some(value) = value else {
        die(format_args!("--block-backend is required ({USAGE})"))
    };
    let config = BackendConfig::parse(&value).unwrap_or_else(|e| die(e));
    if let Err(e) = vhost_user_block::run(&config) {
        die(e);
    }
}
