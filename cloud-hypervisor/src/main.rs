//! `cloud-hypervisor`: parse the command line into a `VmConfig`, run the VM, exit with its
//! outcome. Errors are one line naming the option and value, with exit code 1.

mod cli;
mod logger;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ArgMatches;
use vmm::config::{
    ConsoleConfig, CpusConfig, DiskConfig, MemoryConfig, NetConfig, PayloadConfig, RngConfig,
};
use vmm::{ConfigError, VmConfig};

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    vmm::restore_terminal();
    eprintln!("cloud-hypervisor: {msg}");
    ExitCode::from(1)
}

fn config_from(m: &ArgMatches) -> Result<VmConfig, ConfigError> {
    for name in cli::NOT_YET {
        if m.value_source(name) == Some(clap::parser::ValueSource::CommandLine) {
            let value = m
                .get_many::<String>(name)
                .map(|v| v.cloned().collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            return Err(ConfigError::new(
                cli_name(name),
                &value,
                "this option is not supported yet".into(),
            ));
        }
    }
    for name in cli::NOT_YET_FLAGS {
        if m.get_flag(name) {
            return Err(ConfigError::new(
                cli_name(name),
                "",
                "this option is not supported yet".into(),
            ));
        }
    }
    let s = |name: &str| m.get_one::<String>(name).cloned();
    let cpus = CpusConfig::parse(&s("cpus").unwrap_or_default())?;
    let memory = MemoryConfig::parse(&s("memory").unwrap_or_default())?;
    let serial = ConsoleConfig::parse("--serial", &s("serial").unwrap_or_default())?;
    let console = ConsoleConfig::parse("--console", &s("console").unwrap_or_default())?;
    let disks = m
        .get_many::<String>("disk")
        .into_iter()
        .flatten()
        .map(|d| DiskConfig::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    let net = m
        .get_many::<String>("net")
        .into_iter()
        .flatten()
        .map(|n| NetConfig::parse(n))
        .collect::<Result<Vec<_>, _>>()?;
    let rng = RngConfig::parse(&s("rng").unwrap_or_default())?;
    Ok(VmConfig {
        cpus,
        memory,
        payload: PayloadConfig {
            firmware: s("firmware").map(PathBuf::from),
            kernel: s("kernel").map(PathBuf::from),
            cmdline: s("cmdline"),
            initramfs: s("initramfs").map(PathBuf::from),
        },
        serial,
        console,
        disks,
        net,
        rng,
    })
}

/// `&'static` spelling of `--name` for the options in `cli`'s tables.
fn cli_name(name: &str) -> &'static str {
    Box::leak(format!("--{name}").into_boxed_str())
}

fn main() -> ExitCode {
    let matches = match cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return fail(format!(
                "{} (see --help)",
                first.trim_start_matches("error: ")
            ));
        }
    };

    let log_file = match matches.get_one::<String>("log-file") {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Some(f),
            Err(e) => return fail(format!("--log-file {path}: cannot create: {e}")),
        },
        None => None,
    };
    logger::init(
        matches.get_count("v"),
        log_file,
        matches
            .get_one::<String>("log-format")
            .cloned()
            .unwrap_or_else(|| logger::DEFAULT_FORMAT.to_string()),
    );
    std::panic::set_hook(Box::new(|info| {
        vmm::restore_terminal();
        eprintln!("cloud-hypervisor: internal error: {info}");
    }));

    let config = match config_from(&matches) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match vmm::run(config) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
