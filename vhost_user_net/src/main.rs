//! `vhost_user_net --net-backend "ip=,mask=,socket=,num_queues=,queue_size=,tap=,client=on|off"`:
//! a vhost-user-net backend, as the original Cloud Hypervisor ships one. It opens (or creates)
//! a TAP with one queue per queue pair, gives it its address, serves one VMM over the socket
//! (listening there, or connecting with `client=on`), moves the guest's frames between its
//! rings and the TAP, and exits when the VMM goes. Bad options: one line naming the option,
//! exit status 1.

mod backend;
mod config;
mod pair;

use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::info;
use net_util::Tap;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::NetBackend;
use crate::config::BackendConfig;

/// How long `client=on` keeps trying to reach a VMM that is not listening yet.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("{0}")]
    Config(#[from] vm_config::ConfigError),
    #[error("--net-backend tap={0}: {1}")]
    Tap(String, net_util::TapError),
    #[error("{0}")]
    Setup(std::io::Error),
    #[error("vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("--net-backend socket={0}: {1}")]
    Socket(String, String),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = clap::Command::new("vhost_user_net")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Launch a vhost-user-net backend.")
        .arg_required_else_help(true)
        .arg(
            clap::Arg::new("net-backend")
                .long("net-backend")
                .help(config::SYNTAX)
                .num_args(1)
                .required(true),
        )
        .get_matches();
    let raw = args
        .get_one::<String>("net-backend")
        .cloned()
        .unwrap_or_default();
    match run(&raw) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost_user_net: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The TAP's queues, set up as the configuration says (address, MAC, MTU, up).
fn open_tap(cfg: &BackendConfig) -> Result<Vec<Tap>, RunError> {
    let name = cfg.tap.as_deref().unwrap_or("vmtap%d");
    let err = |e| RunError::Tap(name.to_string(), e);
    let taps = Tap::open(name, cfg.pairs()).map_err(err)?;
    let tap = &taps[0];
    match (cfg.ip, cfg.mask) {
        (IpAddr::V4(ip), IpAddr::V4(mask)) => tap.set_ip(ip, mask).map_err(err)?,
        (IpAddr::V6(ip), IpAddr::V6(mask)) => {
            let prefix = u128::from(mask).leading_ones() as u8;
            tap.set_ipv6(ip, prefix).map_err(err)?
        }
        // The configuration refuses an address and a mask of two families.
        _ => {}
    }
    if let Some(m) = cfg.host_mac {
        tap.set_mac(m).map_err(err)?;
    }
    if let Some(mtu) = cfg.mtu {
        tap.set_mtu(mtu).map_err(err)?;
    }
    tap.enable().map_err(err)?;
    Ok(taps)
}

fn run(raw: &str) -> Result<(), RunError> {
    let cfg = BackendConfig::parse(raw)?;
    let taps = open_tap(&cfg)?;
    let tap_name = taps[0].name().to_string();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<
        vhost_user_backend::bitmap::BitmapMmapRegion,
    >::new());
    let backend = Arc::new(NetBackend::new(&cfg, taps, mem.clone()).map_err(RunError::Setup)?);
    let mut daemon = VhostUserDaemon::new("vhost_user_net".into(), backend.clone(), mem)
        .map_err(RunError::Daemon)?;
    for (i, h) in daemon.get_epoll_handlers().iter().enumerate() {
        backend.set_epoll(i, std::os::fd::AsRawFd::as_raw_fd(&**h));
    }
    let socket = cfg.socket.display().to_string();
    info!(
        "TAP {tap_name} ({}/{}), {} queue pair(s), socket {socket} ({})",
        cfg.ip,
        cfg.mask,
        cfg.pairs(),
        if cfg.client { "client" } else { "server" }
    );
    if cfg.client {
        let start = Instant::now();
        loop {
            match daemon.start_client(&socket) {
                Ok(()) => break,
                Err(_) if start.elapsed() < CONNECT_WAIT => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return Err(RunError::Socket(socket, e.to_string())),
            }
        }
    } else {
        let mut listener = Listener::new(&cfg.socket, true)
            .map_err(|e| RunError::Socket(socket.clone(), e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| RunError::Socket(socket.clone(), e.to_string()))?;
    }
    let result = daemon.wait();
    backend.stop_workers();
    // The VMM hanging up is how a session ends.
    match result {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(RunError::Daemon(e)),
    }
}
