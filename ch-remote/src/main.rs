//! `ch-remote`: drives a running cloud-hypervisor through its API socket, with the original's
//! subcommands, arguments and help. Every subcommand sends its request, as the original's does:
//! for what this VMM lacks the server answers 501 with its reason. Errors are one line on
//! standard error, with exit code 1.
//!
//! Ours: `send-migration` then follows the migration through `vm.migration-progress` (an
//! extension of this VMM), printing its passes on standard error, and exits 0 once it has
//! completed, 1 if it failed; `--no-wait`, or a VMM without the endpoint (the original's),
//! returns once it has started, as the original's ch-remote does.

mod progress;
mod request;
mod subcommands;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use api::client::Client;
use api::http::Method;
use clap::ArgMatches;

use progress::{follow_migration, tells_progress, PROGRESS};
use request::body;
use subcommands::{command, NO_WAIT, SUBCOMMANDS};

fn run(m: &ArgMatches) -> Result<(), String> {
    let Some((name, sub_m)) = m.subcommand() else {
        return Err("no command given (see --help)".into());
    };
    let s = SUBCOMMANDS
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("unknown command {name}"))?;
    let socket = m
        .get_one::<String>("api-socket")
        .map(PathBuf::from)
        .ok_or("--api-socket <path> is required")?;
    let (body, fds) = body(s, sub_m)?;
    let mut client = Client::connect(&socket).map_err(|e| e.to_string())?;
    // Asked before the migration starts: whether the VMM tells its progress (the original's
    // does not), and, to ours, that someone will watch it (so the VMM waits, after a success,
    // until it has said so).
    let follow = s.name == "send-migration"
        && !sub_m.get_flag(NO_WAIT)
        && match client.call(Method::Get, PROGRESS, None) {
            Ok(reply) => tells_progress(&reply),
            Err(_) => {
                client = Client::connect(&socket).map_err(|e| e.to_string())?;
                false
            }
        };
    let reply = client
        .call_with_fds(s.method, s.endpoint, body.as_deref(), &fds)
        .map_err(|e| format!("{}: {e}", s.endpoint))?;
    if !(200..300).contains(&reply.status) {
        let mut msg = format!("{}: the VMM answered {}", s.endpoint, reply.status);
        for line in reply.error_lines() {
            msg.push_str(": ");
            msg.push_str(&line);
        }
        return Err(msg);
    }
    // The body as the VMM sent it and a newline, as the original's ch-remote prints it: for
    // every answer that has a body, an empty one included (vmm.shutdown's 200), not for 204.
    if reply.status != 204 {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&reply.body);
        let _ = out.write_all(b"\n");
    }
    if follow {
        follow_migration(client, &socket)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let m = match command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "ch-remote: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(1);
        }
    };
    match run(&m) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ch-remote: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::request::restore_request;

    fn body_of(args: &[&str]) -> Result<Value, String> {
        let m = command()
            .try_get_matches_from(["ch-remote"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        let (name, sub_m) = m.subcommand().unwrap();
        let s = SUBCOMMANDS.iter().find(|s| s.name == name).unwrap();
        let b = body(s, sub_m)?.0.unwrap_or_default();
        Ok(serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    #[test]
    fn bodies_follow_the_original_schemas() {
        assert_eq!(
            body_of(&["resize", "--cpus", "4", "--memory", "1G"]).unwrap(),
            serde_json::json!({"desired_vcpus": 4, "desired_ram": 1u64 << 30})
        );
        assert_eq!(
            body_of(&["resize-zone", "--id", "z0", "--size", "2M"]).unwrap(),
            serde_json::json!({"id": "z0", "desired_ram": 2u64 << 20})
        );
        assert_eq!(
            body_of(&["resize-disk", "--disk", "d0", "--size", "4096"]).unwrap(),
            serde_json::json!({"id": "d0", "desired_size": 4096})
        );
        assert_eq!(
            body_of(&["remove-device", "_disk0"]).unwrap(),
            serde_json::json!({"id": "_disk0"})
        );
        assert_eq!(
            body_of(&["snapshot", "file:///tmp/s"]).unwrap(),
            serde_json::json!({"destination_url": "file:///tmp/s"})
        );
        assert_eq!(
            body_of(&["restore", "source_url=file:///s,prefault=on"]).unwrap(),
            serde_json::json!({"source_url": "file:///s", "prefault": true,
                "memory_restore_mode": "Copy", "net_fds": null, "vfio_fds": null,
                "iommufd_fd": null, "resume": false, "zone_updates": []})
        );
        assert_eq!(
            body_of(&["add-vsock", "cid=3,socket=/tmp/v,id=[a,b]"]).unwrap(),
            serde_json::json!({"cid": 3, "socket": "/tmp/v", "id": "[a,b]", "pci_segment": 0})
        );
        // Sizes in bytes, as the API takes them (the original's VMM refuses "128M").
        assert_eq!(
            body_of(&["add-pmem", "file=/p,size=128M"]).unwrap()["size"],
            128u64 << 20
        );
        assert!(body_of(&["add-pmem", "file=/p,size=12Q"]).is_err());
        assert_eq!(
            body_of(&["add-disk", "path=/img,readonly=on"]).unwrap()["readonly"],
            true
        );
        // The migration enumerations in the API's spelling, as the original's ch-remote
        // sends them (checked by capturing its request), whatever the case given.
        let send = body_of(&[
            "send-migration",
            "destination_url=unix:/m,timeout_strategy=ignore,memory_mode=PRECOPY",
        ])
        .unwrap();
        assert_eq!(send["timeout_strategy"], "Ignore");
        assert_eq!(send["memory_mode"], "Precopy");
        assert_eq!(
            body_of(&[
                "receive-migration",
                "receiver_url=unix:/m,memory_mode=postcopy"
            ])
            .unwrap()["memory_mode"],
            "Postcopy"
        );
        let bad = body_of(&[
            "send-migration",
            "destination_url=unix:/m,timeout_strategy=wait",
        ]);
        assert_eq!(
            bad.unwrap_err(),
            "send-migration: timeout_strategy=wait: expected cancel or ignore"
        );
        assert!(body_of(&["add-fs", "novalue"]).is_err());
        assert!(body_of(&["resize", "--memory", "lots"]).is_err());
        assert!(body_of(&["add-disk", "path=/img,bogus=1"]).is_err());
        assert!(body_of(&["snapshot"]).is_err(), "snapshot needs its URL");
        assert_eq!(body_of(&["nmi"]).unwrap(), Value::Null);
    }

    /// `send-migration`: the original's syntax, plus `--no-wait` (what it prints:
    /// progress.rs).
    #[test]
    fn send_migration_takes_no_wait() {
        let m = command()
            .try_get_matches_from(["ch-remote", "send-migration", "unix:/m", "--no-wait"])
            .unwrap();
        let (_, sub) = m.subcommand().unwrap();
        assert!(sub.get_flag(NO_WAIT));
        assert_eq!(
            body_of(&["send-migration", "destination_url=unix:/m,downtime_ms=50"]).unwrap(),
            serde_json::json!({"destination_url": "unix:/m", "downtime_ms": 50})
        );
        assert!(command()
            .try_get_matches_from(["ch-remote", "info", "--no-wait"])
            .is_err());
    }

    /// `restore` takes `--restore`'s syntax; net_fds' descriptors leave the body (their count
    /// stays) and go beside it, in order; what the VMM refuses is sent for it to refuse.
    #[test]
    fn restore_sends_its_descriptors_beside_the_body() {
        let (body, fds) = restore_request(
            "source_url=file:///s,resume=on,memory_restore_mode=OnDemand,\
             net_fds=[net0@[3,4],net1@[5]]",
        )
        .unwrap();
        assert_eq!(fds, [3, 4, 5]);
        assert_eq!(body["resume"], true);
        assert_eq!(body["memory_restore_mode"], "OnDemand");
        assert_eq!(
            body["net_fds"],
            serde_json::json!([{"id": "net0", "num_fds": 2}, {"id": "net1", "num_fds": 1}])
        );
        let (body, fds) =
            restore_request("source_url=tcp://h/s,vfio_fds=[v0@7],iommufd_fd=8").unwrap();
        assert!(fds.is_empty());
        assert_eq!(body["source_url"], "tcp://h/s");
        assert_eq!(body["vfio_fds"], serde_json::json!([{"id": "v0", "fd": 7}]));
        assert_eq!(body["iommufd_fd"], 8);
        // Ours: net_macs go in the body as they are (no descriptors).
        let (body, fds) = restore_request(
            "source_url=file:///s,net_fds=[_net0@[3]],net_macs=[_net0@52:54:00:AB:cd:01]",
        )
        .unwrap();
        assert_eq!(fds, [3]);
        assert_eq!(
            body["net_macs"],
            serde_json::json!([{"id": "_net0", "mac": "52:54:00:ab:cd:01"}])
        );
        assert!(body_of(&[
            "restore",
            "source_url=file:///s,net_macs=[_net0@01:00:5e:00:00:01]"
        ])
        .unwrap_err()
        .contains("multicast"));
        let e = body_of(&["restore", "prefault=on"]).unwrap_err();
        assert_eq!(e, "--restore prefault=on: source_url missing");
        assert!(body_of(&["restore", "source_url=file:///s,net_fds=[net0]"]).is_err());
        assert!(body_of(&["restore", "source_url=file:///s,memory_restore_mode=x"]).is_err());
        assert!(body_of(&["restore"]).is_err(), "restore needs its config");
    }
}
