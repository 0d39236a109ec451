//! `cloud-hypervisor`: parse the command line into a `VmConfig`, run the VM, exit with its
//! outcome. Errors are one line naming the option and value, with exit code 1.

mod cli;
mod endpoints;
mod log_format;
mod logger;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ArgMatches;
use vmm::config::{
    BalloonConfig, ConsoleConfig, CpusConfig, DebugConsoleConfig, DiskConfig, FsConfig,
    GenericVhostUserConfig, LandlockConfig, MemoryConfig, NetConfig, NumaConfig, PayloadConfig,
    PciSegmentConfig, PlatformConfig, PmemConfig, RateLimitGroupConfig, RestoreConfig, RngConfig,
    RtcConfig, TpmConfig, VsockConfig,
};
use vmm::{ConfigError, EventMonitor, Outcome, VmConfig, VmmOptions};

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
                &format!("--{name}"),
                &value,
                "this option is not supported yet".into(),
            ));
        }
    }
    for name in cli::NOT_YET_FLAGS {
        if m.get_flag(name) {
            return Err(ConfigError::new(
                &format!("--{name}"),
                "",
                "this option is not supported yet".into(),
            ));
        }
    }
    let s = |name: &str| m.get_one::<String>(name).cloned();
    let cpus = CpusConfig::parse(&s("cpus").unwrap_or_default())?;
    let zones: Vec<&str> = m
        .get_many::<String>("memory-zone")
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let memory = MemoryConfig::parse_with_zones(&s("memory").unwrap_or_default(), &zones)?;
    let serial = ConsoleConfig::parse("--serial", &s("serial").unwrap_or_default())?;
    let console = ConsoleConfig::parse("--console", &s("console").unwrap_or_default())?;
    let debug_console = DebugConsoleConfig::parse(&s("debug-console").unwrap_or_default())?;
    // A repeatable option: each value parsed (`None`: not given).
    fn many<T>(
        m: &ArgMatches,
        name: &str,
        parse: impl Fn(&str) -> Result<T, ConfigError>,
    ) -> Result<Option<Vec<T>>, ConfigError> {
        m.get_many::<String>(name)
            .map(|values| values.map(|v| parse(v)).collect())
            .transpose()
    }
    let disks = many(m, "disk", DiskConfig::parse)?.unwrap_or_default();
    let net = many(m, "net", NetConfig::parse)?.unwrap_or_default();
    let pmem = many(m, "pmem", PmemConfig::parse)?.unwrap_or_default();
    let fs = many(m, "fs", FsConfig::parse)?.unwrap_or_default();
    let generic_vhost_user =
        many(m, "generic-vhost-user", GenericVhostUserConfig::parse)?.unwrap_or_default();
    let groups = many(m, "rate-limit-group", RateLimitGroupConfig::parse)?;
    let landlock_rules = many(m, "landlock-rules", LandlockConfig::parse)?;
    let numa = many(m, "numa", NumaConfig::parse)?;
    let pci_segments = many(m, "pci-segment", PciSegmentConfig::parse)?;
    let rng = RngConfig::parse(&s("rng").unwrap_or_default())?;
    let balloon = s("balloon").map(|b| BalloonConfig::parse(&b)).transpose()?;
    let vsock = s("vsock").map(|v| VsockConfig::parse(&v)).transpose()?;
    let platform = s("platform")
        .map(|p| PlatformConfig::parse(&p))
        .transpose()?;
    Ok(VmConfig {
        cpus,
        memory,
        payload: PayloadConfig {
            firmware: s("firmware").map(PathBuf::from),
            kernel: s("kernel").map(PathBuf::from),
            cmdline: s("cmdline"),
            initramfs: s("initramfs").map(PathBuf::from),
            extra: Default::default(),
        },
        serial,
        console,
        debug_console,
        iommu: false,
        disks,
        net,
        pmem,
        fs,
        generic_vhost_user,
        rng,
        watchdog: m.get_flag("watchdog"),
        balloon,
        vsock,
        platform,
        pvpanic: m.get_flag("pvpanic"),
        tpm: s("tpm").map(|t| TpmConfig::parse(&t)).transpose()?,
        rate_limit_groups: groups,
        landlock_enable: m.get_flag("landlock"),
        landlock_rules,
        numa,
        pci_segments,
        rtc: s("rtc").map(|r| RtcConfig::parse(&r)).transpose()?,
        unsupported: Default::default(),
    })
}

/// `--restore`, parsed and checked (`RestoreConfig::validate`); `None` when it is not given.
/// The VM's configuration comes from the snapshot, so a payload (the original would boot it
/// and ignore `--restore`) or an option of the VM's own (`--cpus`, `--serial`, ..., as the
/// original's command line refuses them) is refused. Errors name `--restore` and its whole value.
fn restore_from(m: &ArgMatches) -> Result<Option<RestoreConfig>, ConfigError> {
    let Some(raw) = m.get_one::<String>("restore") else {
        return Ok(None);
    };
    let err = |msg: String| ConfigError::new(RestoreConfig::OPTION, raw, msg);
    // The original boots the payload and ignores --restore; an option we take must act, so
    // the two together are refused.
    if let Some(name) = ["kernel", "firmware"]
        .into_iter()
        .find(|n| m.contains_id(n))
    {
        return Err(err(format!(
            "--{name} boots a new VM: it cannot be combined with a restore"
        )));
    }
    if let Some(name) = cli::VM_CONFIG
        .iter()
        .find(|name| m.value_source(name) == Some(clap::parser::ValueSource::CommandLine))
    {
        return Err(err(format!(
            "--{name} needs --kernel or --firmware: a restored VM's configuration is the snapshot's"
        )));
    }
    let config = RestoreConfig::parse(raw)?;
    config.validate().map_err(|e| err(e.msg))?;
    Ok(Some(config))
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
    // A seccomp violation's report goes to the log file as well as stderr.
    if let Some(f) = &log_file {
        seccomp::report_to(std::os::fd::AsRawFd::as_raw_fd(f));
    }
    // The value parser allows only the four values.
    if let Some(mode) = matches
        .get_one::<String>("seccomp")
        .and_then(|v| seccomp::Mode::parse(v))
    {
        seccomp::set_mode(mode);
    }
    let format = matches
        .get_one::<String>("log-format")
        .map_or(logger::DEFAULT_FORMAT, String::as_str);
    if let Err(e) = logger::init(matches.get_count("v"), log_file, format) {
        return fail(format!("--log-format {format}: {e}"));
    }
    std::panic::set_hook(Box::new(|info| {
        vmm::restore_terminal();
        eprintln!("cloud-hypervisor: internal error: {info}");
    }));

    let start = std::time::Instant::now();
    let config = match config_from(&matches) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let restore = match restore_from(&matches) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let s = |name: &str| matches.get_one::<String>(name).cloned();
    let api_socket = match s("api-socket")
        .map(|raw| endpoints::parse("--api-socket", &raw))
        .transpose()
    {
        Ok(ep) => ep,
        Err(e) => return fail(e),
    };
    // With an API socket, the VM may come later through vm.create; with --restore, it comes
    // from the snapshot.
    let config = (restore.is_none()
        && (api_socket.is_none()
            || config.payload.kernel.is_some()
            || config.payload.firmware.is_some()))
    .then_some(config);
    let monitor = match s("event-monitor") {
        Some(raw) => match endpoints::parse("--event-monitor", &raw)
            .map_err(|e| e.to_string())
            .and_then(|ep| {
                endpoints::event_monitor(&ep).map_err(|e| format!("--event-monitor {raw}: {e}"))
            }) {
            Ok(f) => Some(Box::new(f) as Box<dyn std::io::Write + Send>),
            Err(e) => return fail(e),
        },
        None => None,
    };
    let mut api_server = None;
    if let (Some(ep), Some(raw)) = (&api_socket, s("api-socket")) {
        let (listener, path) = match endpoints::api_listener(ep) {
            Ok(l) => l,
            Err(e) => return fail(format!("--api-socket {raw}: {e}")),
        };
        match api::ApiServer::new(listener, path) {
            Ok(server) => api_server = Some(server),
            Err(e) => return fail(format!("--api-socket {raw}: {e}")),
        }
    }
    // The API is served from the VMM's control loop; the socket file goes with the server.
    let result = vmm::run(VmmOptions {
        config,
        api: api_server,
        event_monitor: EventMonitor::new(monitor, start),
        no_shutdown: matches.get_flag("no-shutdown"),
        restore,
    });
    match result {
        Ok(Outcome::PowerOff | Outcome::Signal(_) | Outcome::ApiShutdown | Outcome::Migrated) => {
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}
