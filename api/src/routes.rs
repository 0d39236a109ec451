//! Paths, methods and status codes, as the original's: from an HTTP request to an
//! `ApiRequest`, and from the VMM's answer to an HTTP response. Errors are answered, as the
//! original does, with a JSON array of strings: the error chain from the top down, e.g.
//! `["Error from API","The VM could not be paused","VM is not running"]`.

use vm_config::{NetConfig, RestoreConfig};

use crate::http::{Method, Request, Response};
use crate::types::{ApiError, ApiRequest, ApiResponse, ApiResult};

pub const PREFIX: &str = "/api/v1/";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    VmmPing,
    VmmShutdown,
    VmCreate,
    VmBoot,
    VmInfo,
    VmCounters,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
    VmPowerButton,
    VmNmi,
    VmDelete,
    VmSnapshot,
    VmCoredump,
    VmRestore,
    VmSendMigration,
    VmReceiveMigration,
    /// Ours, an extension (not the original's).
    VmMigrationProgress,
    VmAddDisk,
    VmAddNet,
    VmRemoveDevice,
    VmResize,
    VmResizeZone,
    VmResizeDisk,
    VmAddVsock,
    VmAddPmem,
    VmAddFs,
    VmAddGenericVhostUser,
    /// One of the original's endpoints for something this VMM does not have yet.
    NotYet,
}

/// Every endpoint of the original, then our extensions: name, method, what we do with it.
pub const ENDPOINTS: &[(&str, Method, Endpoint)] = &[
    ("vmm.ping", Method::Get, Endpoint::VmmPing),
    ("vmm.shutdown", Method::Put, Endpoint::VmmShutdown),
    ("vm.create", Method::Put, Endpoint::VmCreate),
    ("vm.boot", Method::Put, Endpoint::VmBoot),
    ("vm.info", Method::Get, Endpoint::VmInfo),
    ("vm.counters", Method::Get, Endpoint::VmCounters),
    ("vm.pause", Method::Put, Endpoint::VmPause),
    ("vm.resume", Method::Put, Endpoint::VmResume),
    ("vm.shutdown", Method::Put, Endpoint::VmShutdown),
    ("vm.reboot", Method::Put, Endpoint::VmReboot),
    ("vm.power-button", Method::Put, Endpoint::VmPowerButton),
    ("vm.delete", Method::Put, Endpoint::VmDelete),
    ("vm.add-device", Method::Put, Endpoint::NotYet),
    ("vm.add-disk", Method::Put, Endpoint::VmAddDisk),
    ("vm.add-fs", Method::Put, Endpoint::VmAddFs),
    (
        "vm.add-generic-vhost-user",
        Method::Put,
        Endpoint::VmAddGenericVhostUser,
    ),
    ("vm.add-net", Method::Put, Endpoint::VmAddNet),
    ("vm.add-pmem", Method::Put, Endpoint::VmAddPmem),
    ("vm.add-user-device", Method::Put, Endpoint::NotYet),
    ("vm.add-vdpa", Method::Put, Endpoint::NotYet),
    ("vm.add-vsock", Method::Put, Endpoint::VmAddVsock),
    ("vm.remove-device", Method::Put, Endpoint::VmRemoveDevice),
    ("vm.resize", Method::Put, Endpoint::VmResize),
    ("vm.resize-disk", Method::Put, Endpoint::VmResizeDisk),
    ("vm.resize-zone", Method::Put, Endpoint::VmResizeZone),
    ("vm.snapshot", Method::Put, Endpoint::VmSnapshot),
    ("vm.restore", Method::Put, Endpoint::VmRestore),
    ("vm.coredump", Method::Put, Endpoint::VmCoredump),
    ("vm.nmi", Method::Put, Endpoint::VmNmi),
    ("vm.send-migration", Method::Put, Endpoint::VmSendMigration),
    (
        "vm.receive-migration",
        Method::Put,
        Endpoint::VmReceiveMigration,
    ),
    // Ours: the cyberus-technology fork's name, which libvirt's ch driver reads.
    (
        "vm.migration-progress",
        Method::Get,
        Endpoint::VmMigrationProgress,
    ),
];

/// The original's own message for a failed `name`: the second line of its error chain.
fn action_message(name: &str) -> &'static str {
    match name {
        "vm.boot" => "The VM could not boot",
        "vm.create" => "The VM could not be created",
        "vm.delete" => "The VM could not be deleted",
        "vm.info" | "vm.counters" => "The VM info is not available",
        "vm.pause" => "The VM could not be paused",
        "vm.resume" => "The VM could not resume",
        "vm.shutdown" => "The VM could not shutdown",
        "vm.reboot" => "The VM could not reboot",
        "vm.power-button" => "Error triggering power button",
        "vmm.shutdown" => "The VMM could not shutdown",
        "vm.add-device" => "The device could not be added to the VM",
        "vm.add-user-device" => "The user device could not be added to the VM",
        "vm.add-disk" => "The disk could not be added to the VM",
        "vm.add-fs" => "The fs could not be added to the VM",
        "vm.add-generic-vhost-user" => "The generic vhost-user device could not be added to the VM",
        "vm.add-net" => "The network device could not be added to the VM",
        "vm.add-pmem" => "The pmem device could not be added to the VM",
        "vm.add-vdpa" => "The vDPA device could not be added to the VM",
        "vm.add-vsock" => "The vsock device could not be added to the VM",
        "vm.remove-device" => "The device could not be removed from the VM",
        "vm.resize" => "The VM could not be resized",
        "vm.resize-disk" => "The disk could not be resized",
        "vm.resize-zone" => "The memory zone could not be resized",
        "vm.snapshot" => "The VM could not be snapshotted",
        "vm.restore" => "The VM could not be restored",
        "vm.coredump" => "The VM could not be coredumped",
        "vm.nmi" => "Error triggering NMI",
        "vm.send-migration" => "Error dispatching the migration worker",
        "vm.receive-migration" => "Error receiving migration",
        "vm.migration-progress" => "The migration progress is not available",
        _ => "The request failed",
    }
}

/// An error answer: `status` with the chain `lines` as a JSON array of strings.
pub fn error_chain(status: u16, lines: &[&str]) -> Response {
    // A list of strings always serialises.
    Response::new(status, serde_json::to_vec(lines).unwrap_or_default())
}

/// The error chain of `e` from the top: its message, then each source's.
fn chain_of(e: &dyn std::error::Error) -> Vec<String> {
    let mut lines = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        lines.push(s.to_string());
        source = s.source();
    }
    lines
}

/// Finds the endpoint for `method` and `path`; `Err` is the answer to send instead: 404
/// `["Not Found"]` for a path the original does not have, 400 `["Bad Request"]` for a method
/// the endpoint does not take (as the original answers both).
pub fn route(method: Method, path: &str) -> Result<(&'static str, Endpoint), Response> {
    let found = path
        .strip_prefix(PREFIX)
        .and_then(|name| ENDPOINTS.iter().find(|(n, _, _)| *n == name));
    let Some((name, allowed, ep)) = found else {
        return Err(error_chain(
            404,
            &["Not Found", &format!("no such path {path}")],
        ));
    };
    if method != *allowed {
        return Err(error_chain(
            400,
            &[
                "Bad Request",
                &format!("{name} takes {}, not {}", allowed.as_str(), method.as_str()),
            ],
        ));
    }
    Ok((name, *ep))
}

/// The `ApiRequest` for `ep` with `body`; `Err` is the answer to send instead.
/// `fds`: the descriptors that came with the request; a restore's `net_fds` take them, in
/// order, each entry `num_fds` of them (as the original's ch-remote sends them); any other
/// request closes them.
pub fn request(
    name: &str,
    ep: Endpoint,
    body: &[u8],
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<ApiRequest, Response> {
    Ok(match ep {
        Endpoint::VmmPing => ApiRequest::VmmPing,
        Endpoint::VmmShutdown => ApiRequest::VmmShutdown,
        Endpoint::VmCreate => ApiRequest::VmCreate(Box::new(body_of(body, name, "VmConfig")?)),
        Endpoint::VmBoot => ApiRequest::VmBoot,
        Endpoint::VmInfo => ApiRequest::VmInfo,
        Endpoint::VmCounters => ApiRequest::VmCounters,
        Endpoint::VmPause => ApiRequest::VmPause,
        Endpoint::VmResume => ApiRequest::VmResume,
        Endpoint::VmShutdown => ApiRequest::VmShutdown,
        Endpoint::VmReboot => ApiRequest::VmReboot,
        Endpoint::VmPowerButton => ApiRequest::VmPowerButton,
        Endpoint::VmNmi => ApiRequest::VmNmi,
        Endpoint::VmDelete => ApiRequest::VmDelete,
        Endpoint::VmSnapshot => ApiRequest::VmSnapshot(body_of(body, name, "VmSnapshotConfig")?),
        Endpoint::VmCoredump => ApiRequest::VmCoredump(body_of(body, name, "VmCoredumpData")?),
        Endpoint::VmRestore => {
            let mut config: RestoreConfig = body_of(body, name, "RestoreConfig")?;
            // What this VMM cannot restore is a config that does not validate (400), before
            // the VMM is asked.
            config
                .validate()
                .map_err(|e| reply(name, Err(ApiError::Config(e))))?;
            give_net_fds(&mut config, fds)?;
            ApiRequest::VmRestore(config)
        }
        Endpoint::VmSendMigration => {
            ApiRequest::VmSendMigration(body_of(body, name, "SendMigrationData")?)
        }
        Endpoint::VmReceiveMigration => {
            ApiRequest::VmReceiveMigration(body_of(body, name, "ReceiveMigrationData")?)
        }
        Endpoint::VmMigrationProgress => ApiRequest::VmMigrationProgress,
        Endpoint::VmAddDisk => ApiRequest::VmAddDisk(Box::new(body_of(body, name, "DiskConfig")?)),
        Endpoint::VmAddNet => {
            let mut config: NetConfig = body_of(body, name, "NetConfig")?;
            take_net_fds(&mut config, fds)?;
            ApiRequest::VmAddNet(Box::new(config))
        }
        Endpoint::VmRemoveDevice => {
            ApiRequest::VmRemoveDevice(body_of(body, name, "VmRemoveDeviceData")?)
        }
        Endpoint::VmResize => ApiRequest::VmResize(body_of(body, name, "VmResize")?),
        Endpoint::VmResizeZone => ApiRequest::VmResizeZone(body_of(body, name, "VmResizeZone")?),
        Endpoint::VmResizeDisk => ApiRequest::VmResizeDisk(body_of(body, name, "VmResizeDisk")?),
        Endpoint::VmAddVsock => {
            ApiRequest::VmAddVsock(Box::new(body_of(body, name, "VsockConfig")?))
        }
        Endpoint::VmAddPmem => ApiRequest::VmAddPmem(Box::new(body_of(body, name, "PmemConfig")?)),
        Endpoint::VmAddFs => ApiRequest::VmAddFs(Box::new(body_of(body, name, "FsConfig")?)),
        Endpoint::VmAddGenericVhostUser => ApiRequest::VmAddGenericVhostUser(Box::new(body_of(
            body,
            name,
            "GenericVhostUserConfig",
        )?)),
        Endpoint::NotYet => return Err(reply(name, Err(ApiError::NotYet(name.to_string())))),
    })
}

/// Hands the descriptors received with a restore to its `net_fds` entries, `num_fds` each, in
/// order; 400 when the numbers differ. They stay open for the VMM's life (the restored net
/// devices use them, and a reboot of the VM opens them again).
fn give_net_fds(
    config: &mut RestoreConfig,
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<(), Response> {
    use std::os::fd::IntoRawFd;
    let wanted: usize = config.net_fds.iter().flatten().map(|n| n.num_fds).sum();
    if wanted != fds.len() {
        return Err(error_chain(
            400,
            &[
                "Bad Request",
                &format!(
                    "net_fds: {wanted} descriptor(s) named, {} received with the request",
                    fds.len()
                ),
            ],
        ));
    }
    let mut fds = fds.into_iter();
    for n in config.net_fds.iter_mut().flatten() {
        n.fds = Some(
            fds.by_ref()
                .take(n.num_fds)
                .map(IntoRawFd::into_raw_fd)
                .collect(),
        );
    }
    Ok(())
}

/// `vm.add-net`: the descriptors that came with the request (as `ch-remote add-net fd=...`
/// sends them) are the device's TAP queues, replacing whatever numbers `fds` names (the
/// client's own). Numbers without descriptors would name the VMM's own files: 400.
fn take_net_fds(config: &mut NetConfig, fds: Vec<std::os::fd::OwnedFd>) -> Result<(), Response> {
    use std::os::fd::IntoRawFd;
    if fds.is_empty() {
        if config.fds.as_ref().is_some_and(|f| !f.is_empty()) {
            return Err(error_chain(
                400,
                &[
                    "Bad Request",
                    "fds: no descriptors were received with the request (send them with SCM_RIGHTS)",
                ],
            ));
        }
        return Ok(());
    }
    config.fds = Some(fds.into_iter().map(IntoRawFd::into_raw_fd).collect());
    Ok(())
}

/// A request's JSON body as `T`, the schema the original's API document calls `what` (400 for
/// none, or one that does not read).
fn body_of<T: serde::de::DeserializeOwned>(
    body: &[u8],
    name: &str,
    what: &str,
) -> Result<T, Response> {
    if body.is_empty() {
        return Err(error_chain(
            400,
            &["Bad Request", &format!("{name} needs a {what} as its body")],
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| error_chain(400, &["Failed to deserialize JSON", &e.to_string()]))
}

fn json(value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => Response::new(200, body),
        Err(e) => error_chain(500, &["Internal Server Error", &e.to_string()]),
    }
}

/// The HTTP answer to the VMM's answer to `name`. Success is 204 with no body, except where
/// the original answers 200: `vmm.shutdown` (empty) and the endpoints with a JSON body.
pub fn reply(name: &str, result: ApiResult) -> Response {
    match result {
        Ok(ApiResponse::Empty) if name == "vmm.shutdown" => Response::new(200, Vec::new()),
        Ok(ApiResponse::Empty) => Response::new(204, Vec::new()),
        Ok(ApiResponse::Ping(p)) => json(&p),
        Ok(ApiResponse::Info(i)) => json(&i),
        Ok(ApiResponse::Counters(c)) => json(&c),
        Ok(ApiResponse::PciDevice(d)) => json(&d),
        Ok(ApiResponse::MigrationProgress(p)) => json(&p),
        Err(e) => {
            let mut lines = vec![
                "Error from API".to_string(),
                action_message(name).to_string(),
            ];
            match &e {
                ApiError::Chain(chain) => lines.extend(chain.iter().cloned()),
                e => lines.extend(chain_of(e)),
            }
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            error_chain(e.status(), &lines)
        }
    }
}

/// The answer to one complete request, with `handle` running what the VMM must run.
pub fn answer(
    req: &Request,
    fds: Vec<std::os::fd::OwnedFd>,
    handle: &mut dyn FnMut(ApiRequest) -> ApiResult,
) -> Response {
    let (name, ep) = match route(req.method, &req.path) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match request(name, ep, &req.body, fds) {
        Ok(r) => reply(name, handle(r)),
        Err(resp) => resp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{PciDeviceInfo, VmState};

    fn lines(r: &Response) -> Vec<String> {
        serde_json::from_slice(&r.body).expect("an error body is a JSON list of strings")
    }

    #[test]
    fn routes_follow_the_original() {
        assert_eq!(
            route(Method::Get, "/api/v1/vmm.ping").unwrap(),
            ("vmm.ping", Endpoint::VmmPing)
        );
        assert_eq!(
            route(Method::Put, "/api/v1/vm.power-button").unwrap().1,
            Endpoint::VmPowerButton
        );
        let r = route(Method::Put, "/api/v1/vmm.ping").unwrap_err();
        assert_eq!(r.status, 400);
        assert_eq!(lines(&r)[0], "Bad Request");
        for path in ["/api/v1/vm.bogus", "/api/v2/vmm.ping", "/", "/api/v1/"] {
            let r = route(Method::Get, path).unwrap_err();
            assert_eq!(r.status, 404, "{path}");
            assert_eq!(lines(&r)[0], "Not Found");
        }
    }

    #[test]
    fn bodies_and_errors() {
        let r = request("vm.create", Endpoint::VmCreate, b"{", Vec::new()).unwrap_err();
        assert_eq!(r.status, 400);
        assert_eq!(lines(&r)[0], "Failed to deserialize JSON");
        let r = request("vm.create", Endpoint::VmCreate, b"", Vec::new()).unwrap_err();
        assert_eq!(r.status, 400);
        let r = request(
            "vm.create",
            Endpoint::VmCreate,
            br#"{"payload": 3}"#,
            Vec::new(),
        )
        .unwrap_err();
        assert_eq!(r.status, 400);
        let r = request("vm.add-vdpa", Endpoint::NotYet, b"{}", Vec::new()).unwrap_err();
        assert_eq!(r.status, 501);
        assert!(matches!(
            request(
                "vm.create",
                Endpoint::VmCreate,
                br#"{"payload": {"kernel": "/k"}}"#,
                Vec::new()
            ),
            Ok(ApiRequest::VmCreate(_))
        ));
        let r = reply(
            "vm.pause",
            Err(ApiError::InvalidState {
                action: "pause",
                state: VmState::Created,
            }),
        );
        assert_eq!(r.status, 500);
        let l = lines(&r);
        assert_eq!(l[..2], ["Error from API", "The VM could not be paused"]);
        assert_eq!(l[2], "cannot pause the VM: it is Created");
        let r = reply("vm.info", Err(ApiError::VmNotCreated));
        assert_eq!(r.status, 404);
        assert_eq!(
            lines(&r),
            [
                "Error from API",
                "The VM info is not available",
                "VM is not created"
            ]
        );
        let e = vm_config::ConfigError::new("--cpus", "boot=0", "must be at least 1".into());
        let r = reply("vm.create", Err(ApiError::Config(e)));
        assert_eq!(r.status, 400);
        assert_eq!(
            lines(&r)[2..],
            [
                "Failed to validate config",
                "--cpus boot=0: must be at least 1"
            ]
        );
        let r = reply("vm.boot", Ok(ApiResponse::Empty));
        assert_eq!((r.status, r.body.len()), (204, 0));
        let r = reply("vm.restore", Ok(ApiResponse::Empty));
        assert_eq!((r.status, r.body.len()), (204, 0));
        let r = reply("vmm.shutdown", Ok(ApiResponse::Empty));
        assert_eq!((r.status, r.body.len()), (200, 0));
    }

    /// vm.restore: the body is a RestoreConfig; one that does not read is refused as
    /// vm.snapshot's, one this VMM cannot restore as a config that does not validate (400).
    #[test]
    fn restore_bodies() {
        assert_eq!(
            route(Method::Put, "/api/v1/vm.restore").unwrap(),
            ("vm.restore", Endpoint::VmRestore)
        );
        assert_eq!(
            route(Method::Get, "/api/v1/vm.restore").unwrap_err().status,
            400
        );
        let ask = |body: &[u8]| request("vm.restore", Endpoint::VmRestore, body, Vec::new());
        match ask(
            br#"{"source_url": "file:///s", "resume": true, "memory_restore_mode": "CopyOnWrite"}"#,
        ) {
            Ok(ApiRequest::VmRestore(c)) => {
                assert_eq!(c.source_url, "file:///s");
                assert!(c.resume && !c.prefault);
                assert_eq!(
                    c.memory_restore_mode,
                    vm_config::MemoryRestoreMode::CopyOnWrite
                );
            }
            other => panic!("{other:?}"),
        }
        for (body, first) in [
            (&b""[..], "Bad Request"),
            (b"{", "Failed to deserialize JSON"),
            (b"{}", "Failed to deserialize JSON"),
            (
                br#"{"source_url": "file:///s", "bogus": 1}"#,
                "Failed to deserialize JSON",
            ),
            (
                br#"{"source_url": "file:///s", "memory_restore_mode": "Lazy"}"#,
                "Failed to deserialize JSON",
            ),
        ] {
            let r = ask(body).unwrap_err();
            assert_eq!(r.status, 400, "{body:?}");
            assert_eq!(lines(&r)[0], first, "{body:?}");
        }
        for (body, why) in [
            (
                &br#"{"source_url": "file:///s", "prefault": true, "memory_restore_mode": "OnDemand"}"#[..],
                "--restore file:///s: 'prefault' cannot be combined with 'memory_restore_mode=ondemand'",
            ),
            (
                br#"{"source_url": "file:///s", "iommufd_fd": 3}"#,
                "--restore file:///s: iommufd_fd: VFIO devices are not supported by this VMM",
            ),
        ] {
            let r = ask(body).unwrap_err();
            assert_eq!(r.status, 400, "{body:?}");
            assert_eq!(
                lines(&r),
                [
                    "Error from API",
                    "The VM could not be restored",
                    "Failed to validate config",
                    why
                ]
            );
        }
    }

    /// `vm.migration-progress` (ours): GET only; 200 with the progress, its optional fields
    /// present only in the states they belong to; 404 with the usual chain before any
    /// migration.
    #[test]
    fn migration_progress_answers() {
        use crate::types::{MigrationProgress, MigrationState};
        assert_eq!(
            route(Method::Get, "/api/v1/vm.migration-progress").unwrap(),
            ("vm.migration-progress", Endpoint::VmMigrationProgress)
        );
        assert_eq!(
            route(Method::Put, "/api/v1/vm.migration-progress")
                .unwrap_err()
                .status,
            400
        );
        assert!(matches!(
            request(
                "vm.migration-progress",
                Endpoint::VmMigrationProgress,
                b"",
                Vec::new()
            ),
            Ok(ApiRequest::VmMigrationProgress)
        ));
        let mut p = MigrationProgress {
            state: MigrationState::Running,
            destination_url: "unix:/m.sock".into(),
            pass: 2,
            bytes: 4096,
            total_bytes: 1 << 20,
            dirty_bytes: 8192,
            memory_bytes: 1 << 28,
            elapsed_ms: 150,
            downtime_us: None,
            error: None,
        };
        let answer = |p: &MigrationProgress| {
            let r = reply(
                "vm.migration-progress",
                Ok(ApiResponse::MigrationProgress(Box::new(p.clone()))),
            );
            assert_eq!(r.status, 200);
            let back: MigrationProgress = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(&back, p, "reads back");
            String::from_utf8(r.body).unwrap()
        };
        assert_eq!(
            answer(&p),
            r#"{"state":"running","destination_url":"unix:/m.sock","pass":2,"bytes":4096,"total_bytes":1048576,"dirty_bytes":8192,"memory_bytes":268435456,"elapsed_ms":150}"#
        );
        p.state = MigrationState::Completed;
        p.downtime_us = Some(1234);
        assert_eq!(
            answer(&p),
            r#"{"state":"completed","destination_url":"unix:/m.sock","pass":2,"bytes":4096,"total_bytes":1048576,"dirty_bytes":8192,"memory_bytes":268435456,"elapsed_ms":150,"downtime_us":1234}"#
        );
        p.state = MigrationState::Failed;
        p.downtime_us = None;
        p.error = Some("cannot connect to unix:/m.sock: \"gone\"".into());
        let text = answer(&p);
        assert!(text.starts_with(r#"{"state":"failed","#), "{text}");
        assert!(
            text.ends_with(r#""error":"cannot connect to unix:/m.sock: \"gone\""}"#),
            "{text}"
        );
        // Unknown states and fields a newer VMM may add: the state is refused, the fields
        // are not.
        let newer = text.replace('}', r#","rate":5}"#);
        assert!(serde_json::from_str::<MigrationProgress>(&newer).is_ok());
        let odd = text.replace("failed", "paused");
        assert!(serde_json::from_str::<MigrationProgress>(&odd).is_err());
        let r = reply("vm.migration-progress", Err(ApiError::NoMigration));
        assert_eq!(r.status, 404);
        assert_eq!(
            lines(&r),
            [
                "Error from API",
                "The migration progress is not available",
                "No migration has been started"
            ]
        );
    }

    #[test]
    fn hotplug_bodies() {
        assert_eq!(
            route(Method::Put, "/api/v1/vm.add-disk").unwrap().1,
            Endpoint::VmAddDisk
        );
        assert_eq!(
            route(Method::Put, "/api/v1/vm.add-net").unwrap().1,
            Endpoint::VmAddNet
        );
        assert_eq!(
            route(Method::Put, "/api/v1/vm.remove-device").unwrap().1,
            Endpoint::VmRemoveDevice
        );
        match request(
            "vm.add-disk",
            Endpoint::VmAddDisk,
            br#"{"path": "/d.img", "id": "x"}"#,
            Vec::new(),
        ) {
            Ok(ApiRequest::VmAddDisk(d)) => {
                assert_eq!(
                    (d.path.to_str(), d.pci_common.id.as_deref()),
                    (Some("/d.img"), Some("x"))
                )
            }
            other => panic!("{other:?}"),
        }
        // `path` is optional, as in the original's schema (a vhost-user disk has none); the
        // VMM refuses a disk without one when it checks the configuration.
        match request("vm.add-disk", Endpoint::VmAddDisk, b"{}", Vec::new()) {
            Ok(ApiRequest::VmAddDisk(d)) => assert!(d.validate().is_err()),
            other => panic!("{other:?}"),
        }
        let r = request("vm.add-disk", Endpoint::VmAddDisk, b"[]", Vec::new()).unwrap_err();
        assert_eq!(r.status, 400, "not a DiskConfig");
        match request(
            "vm.remove-device",
            Endpoint::VmRemoveDevice,
            br#"{"id": "_disk0"}"#,
            Vec::new(),
        ) {
            Ok(ApiRequest::VmRemoveDevice(d)) => assert_eq!(d.id, "_disk0"),
            other => panic!("{other:?}"),
        }
        // fds named without descriptors would be the VMM's own files.
        let r = request(
            "vm.add-net",
            Endpoint::VmAddNet,
            br#"{"fds": [3]}"#,
            Vec::new(),
        )
        .unwrap_err();
        assert_eq!(r.status, 400);
        assert!(lines(&r)[1].contains("no descriptors"), "{:?}", lines(&r));
        // Received descriptors replace the numbers.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = std::os::fd::OwnedFd::from(a);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        match request(
            "vm.add-net",
            Endpoint::VmAddNet,
            br#"{"fds": [999]}"#,
            vec![fd],
        ) {
            Ok(ApiRequest::VmAddNet(n)) => {
                assert_eq!(n.fds, Some(vec![raw]));
                // SAFETY: the descriptor the request took over, closed once here.
                unsafe { libc::close(raw) };
            }
            other => panic!("{other:?}"),
        }
        let r = reply(
            "vm.add-disk",
            Ok(ApiResponse::PciDevice(PciDeviceInfo {
                id: "_disk1".into(),
                bdf: "0000:00:05.0".into(),
            })),
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.body, br#"{"id":"_disk1","bdf":"0000:00:05.0"}"#);
        let r = reply(
            "vm.remove-device",
            Err(ApiError::BadRequest("no device with id x".into())),
        );
        assert_eq!(r.status, 400);
        let r = reply("vm.resize", Err(ApiError::TooManyRequests("busy".into())));
        assert_eq!(r.status, 429);
    }
}
