//! `vm.restore`'s body and `--restore`'s value: where a snapshot is and how to bring it back,
//! with the original's field names.

use serde::{Deserialize, Serialize};

use crate::restore_mac::{check_net_macs, guest_mac, RestoredNetMac};
use crate::{ConfigError, OptionParser};

/// How guest RAM comes back from the snapshot's `memory-ranges` file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryRestoreMode {
    /// The original's default: the file is read into freshly allocated guest RAM before the
    /// VM runs.
    #[default]
    Copy,
    /// The original's: pages are loaded from the file on the guest's (or a device's) first
    /// touch (userfaultfd); refused where the host has no userfaultfd.
    OnDemand,
    /// Ours: guest RAM is a private (copy-on-write) mapping of the file itself, so restores of
    /// one snapshot share the pages none of them wrote; refused for memory configurations it
    /// cannot serve (shared RAM, huge pages).
    CopyOnWrite,
}

/// A net device's new file descriptors (the original's `RestoredNetConfig`). The descriptors
/// travel beside the request (SCM_RIGHTS), never in the JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredNetConfig {
    pub id: String,
    #[serde(default)]
    pub num_fds: usize,
    /// Ignored from JSON (as the original's: a number in JSON is no descriptor).
    #[serde(default, skip_serializing)]
    pub fds: Option<Vec<i32>>,
}

/// The original's `RestoreConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// `file:///` and the snapshot directory.
    pub source_url: String,
    /// Copy mode: populate all of guest RAM up front.
    #[serde(default)]
    pub prefault: bool,
    #[serde(default)]
    pub memory_restore_mode: MemoryRestoreMode,
    #[serde(default)]
    pub net_fds: Option<Vec<RestoredNetConfig>>,
    /// VFIO is not supported: any entry is refused.
    #[serde(default)]
    pub vfio_fds: Option<Vec<serde_json::Value>>,
    /// VFIO is not supported: refused when given.
    #[serde(default)]
    pub iommufd_fd: Option<serde_json::Value>,
    /// Resume the VM once restored (otherwise it comes up paused).
    #[serde(default)]
    pub resume: bool,
    /// `{"id", "host_numa_node"}`: a memory zone of the snapshot moved to another host NUMA
    /// node (`zone_updates()` reads them).
    #[serde(default)]
    pub zone_updates: Vec<serde_json::Value>,
    /// Ours: a new guest MAC address for net devices of the snapshot (`net_macs`, see
    /// `restore_mac`); absent from the JSON when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net_macs: Vec<RestoredNetMac>,
}

impl MemoryRestoreMode {
    /// `copy`, `ondemand` (the original's, in any case) or `copyonwrite` (ours).
    fn from_option(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "copy" => Some(Self::Copy),
            "ondemand" => Some(Self::OnDemand),
            "copyonwrite" => Some(Self::CopyOnWrite),
            _ => None,
        }
    }
}

impl RestoreConfig {
    pub const OPTION: &'static str = "--restore";
    /// The original's help for `--restore` and `ch-remote restore`, word for word.
    pub const SYNTAX: &'static str = "Restore from a VM snapshot. \nRestore parameters \"source_url=<source_url>,prefault=on|off,memory_restore_mode=copy|ondemand,net_fds=<list_of_net_ids_with_their_associated_fds>,vfio_fds=<list_of_vfio_ids_with_their_associated_fd>,iommufd_fd=<fd>,resume=true|false,zone_updates=<list_of_updates>\"\n        \n`source_url` should be a valid URL (e.g file:///foo/bar or tcp://192.168.1.10/foo) \n`prefault` controls eager prefaulting for the copy-based restore path (disabled by default) \n`memory_restore_mode=copy` preserves the existing eager read-copy restore behavior, while `memory_restore_mode=ondemand` enables lazy demand paging and fails restore if userfaultfd support is unavailable \n`net_fds` is a list of net ids with new file descriptors. Only net devices backed by FDs directly are needed as input.\n`vfio_fds` is a list of VFIO device ids each paired with a new cdev file descriptor, e.g. vfio_fds=[vfio0@5,vfio1@6]. Use this to restore a VFIO device onto a different sysfs path or host. Requires `iommufd_fd`.\n`iommufd_fd` is a new iommufd file descriptor for the restored VM. The one saved in the snapshot does not survive serialization.\n `resume` controls whether the VM will be directly resumed after restore \n `zone_updates` can be used to update NUMA memory zones. Expects a list of elements in the form `id@host_numa_node`";
    pub const KEYS: &'static [&'static str] = &[
        "source_url",
        "prefault",
        "memory_restore_mode",
        "net_fds",
        "vfio_fds",
        "iommufd_fd",
        "resume",
        "zone_updates",
        "net_macs",
    ];

    /// `--restore`'s value (and `ch-remote restore`'s argument), with the original's keys:
    /// `source_url=<url>,prefault=on|off,memory_restore_mode=copy|ondemand|copyonwrite,
    /// net_fds=[<id>@[<fd>,...],...],vfio_fds=[<id>@<fd>,...],iommufd_fd=<fd>,resume=on|off,
    /// zone_updates=[<id>@<host_numa_node>,...]`, and ours, `net_macs=[<id>@<mac>,...]`. Only the syntax is checked here; `validate`
    /// says what this VMM cannot do.
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(Self::OPTION, raw, Self::KEYS, &[])?;
        let source_url = p
            .get("source_url")
            .ok_or_else(|| p.error("source_url missing"))?;
        let memory_restore_mode = match p.get("memory_restore_mode") {
            None => MemoryRestoreMode::default(),
            Some(m) => MemoryRestoreMode::from_option(&m).ok_or_else(|| {
                p.error(format!(
                    "memory_restore_mode={m}: must be copy, ondemand or copyonwrite"
                ))
            })?,
        };
        let net_fds = p
            .tuple_list("net_fds", "<id>@[<fd>,...]", fd_list)?
            .map(|list| {
                list.into_iter()
                    .map(|(id, fds)| RestoredNetConfig {
                        id,
                        num_fds: fds.len(),
                        fds: Some(fds),
                    })
                    .collect()
            });
        let vfio_fds = p.tuple_list("vfio_fds", "<id>@<fd>", fd)?.map(|list| {
            list.into_iter()
                .map(|(id, fd)| serde_json::json!({ "id": id, "fd": fd }))
                .collect()
        });
        let iommufd_fd = p
            .get("iommufd_fd")
            .map(|v| {
                fd(&v)
                    .map(serde_json::Value::from)
                    .map_err(|m| p.error(format!("iommufd_fd: {m}")))
            })
            .transpose()?;
        let zone_updates = p
            .tuple_list("zone_updates", "<id>@<host_numa_node>", |v| {
                v.parse::<u32>()
                    .map_err(|_| format!("'{v}' is not a host NUMA node number"))
            })?
            .unwrap_or_default()
            .into_iter()
            .map(|(id, node)| serde_json::json!({ "id": id, "host_numa_node": node }))
            .collect();
        let net_macs = p
            .tuple_list("net_macs", "<id>@<mac>", guest_mac)?
            .unwrap_or_default()
            .into_iter()
            .map(|(id, mac)| RestoredNetMac { id, mac })
            .collect();
        Ok(RestoreConfig {
            source_url,
            prefault: p.toggle("prefault", false)?,
            memory_restore_mode,
            net_fds,
            vfio_fds,
            iommufd_fd,
            resume: p.toggle("resume", false)?,
            zone_updates,
            net_macs,
        })
    }

    /// Refuses what this VMM cannot restore, whichever way the config came (command line or
    /// API): the original's refusal of `prefault` with on-demand restore, VFIO (`vfio_fds`,
    /// `iommufd_fd`) and NUMA zone updates. The errors name
    /// `--restore` and the source URL. `net_fds` (ids unique, matching the snapshot's net
    /// devices) are for the VMM to check once it has read the snapshot's config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::new(Self::OPTION, &self.source_url, m);
        // The source URL is checked where it is read, with the original's error ("Could not
        // extract path from URL"), not here.
        if self.memory_restore_mode == MemoryRestoreMode::OnDemand && self.prefault {
            return Err(err(
                "'prefault' cannot be combined with 'memory_restore_mode=ondemand'".into(),
            ));
        }
        if self.vfio_fds.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(err(
                "vfio_fds: VFIO devices are not supported by this VMM".into()
            ));
        }
        if self.iommufd_fd.is_some() {
            return Err(err(
                "iommufd_fd: VFIO devices are not supported by this VMM".into(),
            ));
        }
        crate::zone_updates(&self.zone_updates).map_err(err)?;
        check_net_macs(&self.net_macs).map_err(err)?;
        Ok(())
    }
}

/// A file descriptor number (the original reads a u64 and keeps it as an i32).
fn fd(v: &str) -> Result<i32, String> {
    v.parse::<i32>()
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| format!("'{v}' is not a file descriptor number"))
}

/// The most descriptors one list may name (a NIC takes one per queue pair): a range is checked
/// against it before it is expanded (`0-2000000000` would otherwise take gigabytes).
const MAX_FDS: usize = 1024;

/// `[3,4]`, `3`, or ranges `[3-5]` (3, 4, 5), as the original's integer lists.
fn fd_list(v: &str) -> Result<Vec<i32>, String> {
    let inner = v.trim().trim_start_matches('[').trim_end_matches(']');
    let mut fds = Vec::new();
    for item in inner.split(',') {
        match item.split_once('-') {
            None if fds.len() >= MAX_FDS => {
                return Err(format!("more than {MAX_FDS} descriptors"));
            }
            None => fds.push(fd(item)?),
            Some((a, b)) => {
                let (a, b) = (fd(a)?, fd(b)?);
                if a >= b {
                    return Err(format!("'{item}' is not a rising range"));
                }
                if (b - a) as usize >= MAX_FDS - fds.len() {
                    return Err(format!("'{item}': more than {MAX_FDS} descriptors"));
                }
                fds.extend(a..=b);
            }
        }
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(raw: &str) -> String {
        RestoreConfig::parse(raw).unwrap_err().to_string()
    }

    fn invalid(raw: &str) -> String {
        RestoreConfig::parse(raw)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_the_originals_keys() {
        let c = RestoreConfig::parse("source_url=file:///snap").unwrap();
        assert_eq!(
            c,
            RestoreConfig {
                source_url: "file:///snap".into(),
                ..Default::default()
            }
        );
        c.validate().unwrap();
        let c = RestoreConfig::parse(
            "source_url=file:///s,prefault=on,resume=true,net_fds=[net0@[3,4],net1@[5-7],net2@8]",
        )
        .unwrap();
        assert!(c.prefault && c.resume);
        assert_eq!(c.memory_restore_mode, MemoryRestoreMode::Copy);
        let nets = c.net_fds.as_deref().unwrap();
        assert_eq!(
            nets.iter()
                .map(|n| (n.id.as_str(), n.num_fds, n.fds.clone().unwrap()))
                .collect::<Vec<_>>(),
            [
                ("net0", 2, vec![3, 4]),
                ("net1", 3, vec![5, 6, 7]),
                ("net2", 1, vec![8])
            ]
        );
        c.validate().unwrap();
        for (v, mode) in [
            ("copy", MemoryRestoreMode::Copy),
            ("OnDemand", MemoryRestoreMode::OnDemand),
            ("ONDEMAND", MemoryRestoreMode::OnDemand),
            ("copyonwrite", MemoryRestoreMode::CopyOnWrite),
            ("CopyOnWrite", MemoryRestoreMode::CopyOnWrite),
        ] {
            let c = RestoreConfig::parse(&format!("source_url=file:///s,memory_restore_mode={v}"))
                .unwrap();
            assert_eq!(c.memory_restore_mode, mode, "{v}");
        }
        for (v, want) in [
            ("on", true),
            ("off", false),
            ("TRUE", true),
            ("false", false),
        ] {
            let c = RestoreConfig::parse(&format!("source_url=file:///s,resume={v}")).unwrap();
            assert_eq!(c.resume, want, "{v}");
        }
        // The original takes a path too (refused by validate, as by its VMM).
        let c = RestoreConfig::parse("source_url=/path/to/snapshot").unwrap();
        assert_eq!(c.source_url, "/path/to/snapshot");
        // Quoted, as every value may be.
        let c = RestoreConfig::parse("source_url=\"file:///a,b\"").unwrap();
        assert_eq!(c.source_url, "file:///a,b");
        let c = RestoreConfig::parse(
            "source_url=file:///s,vfio_fds=[vfio0@5,vfio1@6],iommufd_fd=7,zone_updates=[z0@1]",
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({
                "source_url": "file:///s",
                "prefault": false,
                "memory_restore_mode": "Copy",
                "net_fds": null,
                "vfio_fds": [{"id": "vfio0", "fd": 5}, {"id": "vfio1", "fd": 6}],
                "iommufd_fd": 7,
                "resume": false,
                "zone_updates": [{"id": "z0", "host_numa_node": 1}],
            })
        );
    }

    #[test]
    fn syntax_errors_name_the_option_and_value() {
        assert_eq!(
            parse_err("prefault=off"),
            "--restore prefault=off: source_url missing"
        );
        assert_eq!(
            parse_err("source_url="),
            "--restore source_url=: source_url missing"
        );
        assert_eq!(
            parse_err("source_url=file:///s,memory_restore_mode=bogus"),
            "--restore source_url=file:///s,memory_restore_mode=bogus: \
             memory_restore_mode=bogus: must be copy, ondemand or copyonwrite"
        );
        assert_eq!(
            parse_err("source_url=file:///s,prefault=yes"),
            "--restore source_url=file:///s,prefault=yes: \
             'prefault' must be on, off, true or false, not 'yes'"
        );
        assert!(parse_err("source_url=file:///s,resume=1").contains("'resume' must be on"));
        assert!(parse_err("source_url=file:///s,bogus=1").contains("unknown key 'bogus'"));
        assert_eq!(
            parse_err("source_url=file:///s,net_fds=net0@[3]"),
            "--restore source_url=file:///s,net_fds=net0@[3]: \
             net_fds: 'net0@[3]' is not a list in brackets (expected [<id>@[<fd>,...],...])"
        );
        assert_eq!(
            parse_err("source_url=file:///s,net_fds=[net0@[x]]"),
            "--restore source_url=file:///s,net_fds=[net0@[x]]: \
             net_fds: net0: 'x' is not a file descriptor number (expected [<id>@[<fd>,...],...])"
        );
        // A huge range is refused before it is expanded (it would take gigabytes).
        assert_eq!(
            parse_err("source_url=file:///s,net_fds=[net0@[3-2000000000]]"),
            "--restore source_url=file:///s,net_fds=[net0@[3-2000000000]]: \
             net_fds: net0: '3-2000000000': more than 1024 descriptors (expected \
             [<id>@[<fd>,...],...])"
        );
        for bad in [
            "net_fds=[]",
            "net_fds=[@[3]]",
            "net_fds=[net0]",
            "net_fds=[net0@]",
            "net_fds=[net0@[]]",
            "net_fds=[net0@[3],]",
            "net_fds=[net0@[-1]]",
            "net_fds=[net0@[4-3]]",
            "net_fds=[net0@[3]@[4]]",
            "net_fds=[[net0@[3]]]",
            "net_fds=[net0@[3]]]",
            "net_fds=[net0@[4294967299]]",
            "vfio_fds=[vfio0@x]",
            "vfio_fds=[vfio0@[5]]",
            "iommufd_fd=x",
            "iommufd_fd=-1",
            "zone_updates=[@1]",
            "zone_updates=[@]",
            "zone_updates=[id1@]",
            "zone_updates=[id1 1]",
            "zone_updates=[[id1@1]]",
            "zone_updates=id1@1",
            "zone_updates=[id1@-1]",
        ] {
            let raw = format!("source_url=file:///s,{bad}");
            let e = parse_err(&raw);
            assert!(e.starts_with(&format!("--restore {raw}: ")), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn validate_refuses_what_this_vmm_cannot_do() {
        // Not refused here: the VMM reads the URL and answers as the original.
        for url in ["/path/to/snapshot", "tcp://192.168.1.10/foo", "file://"] {
            let c = RestoreConfig::parse(&format!("source_url={url}")).unwrap();
            assert_eq!(c.validate(), Ok(()), "{url}");
        }
        assert_eq!(
            invalid("source_url=file:///s,prefault=on,memory_restore_mode=ondemand"),
            "--restore file:///s: 'prefault' cannot be combined with \
             'memory_restore_mode=ondemand'"
        );
        RestoreConfig::parse("source_url=file:///s,prefault=off,memory_restore_mode=ondemand")
            .unwrap()
            .validate()
            .unwrap();
        RestoreConfig::parse("source_url=file:///s,prefault=on,memory_restore_mode=copyonwrite")
            .unwrap()
            .validate()
            .unwrap();
        // net_fds are matched with the snapshot's net devices by the VMM (which answers 409 for
        // an id given twice, as the original).
        RestoreConfig::parse("source_url=file:///s,net_fds=[net0@[3],net0@[4]]")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(
            invalid("source_url=file:///s,vfio_fds=[vfio0@5]"),
            "--restore file:///s: vfio_fds: VFIO devices are not supported by this VMM"
        );
        assert_eq!(
            invalid("source_url=file:///s,iommufd_fd=7"),
            "--restore file:///s: iommufd_fd: VFIO devices are not supported by this VMM"
        );
        // Zone updates are read (the VMM applies them to the snapshot's zones); the
        // original's two refusals.
        RestoreConfig::parse("source_url=file:///s,zone_updates=[z0@1,z1@0]")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(
            invalid("source_url=file:///s,zone_updates=[z0@1,z0@0]"),
            "--restore file:///s: zone_updates: multiple updates for the same zone defined (z0)"
        );
        let c: RestoreConfig = serde_json::from_str(
            r#"{"source_url": "file:///s", "zone_updates": [{"id": "", "host_numa_node": 0}]}"#,
        )
        .unwrap();
        assert!(c.validate().unwrap_err().msg.contains("empty ID"));
    }

    /// The API's body: the original's field names; what the command line cannot say either
    /// is refused the same way.
    #[test]
    fn json_bodies_validate_alike() {
        let c: RestoreConfig = serde_json::from_str(r#"{"source_url": "file:///s"}"#).unwrap();
        assert_eq!(c.memory_restore_mode, MemoryRestoreMode::Copy);
        c.validate().unwrap();
        let c: RestoreConfig = serde_json::from_str(
            r#"{"source_url": "file:///s", "memory_restore_mode": "CopyOnWrite", "resume": true,
                "net_fds": [{"id": "net0", "num_fds": 2, "fds": [1, 2]}],
                "vfio_fds": [], "iommufd_fd": null, "zone_updates": []}"#,
        )
        .unwrap();
        assert_eq!(c.memory_restore_mode, MemoryRestoreMode::CopyOnWrite);
        assert_eq!(c.net_fds.as_ref().unwrap()[0].num_fds, 2);
        c.validate().unwrap();
        // A descriptor number in JSON is never sent on: descriptors travel beside the request.
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v["net_fds"],
            serde_json::json!([{"id": "net0", "num_fds": 2}])
        );
        for body in [
            r#"{"source_url": "file:///s", "vfio_fds": [{"id": "v0"}]}"#,
            r#"{"source_url": "file:///s", "iommufd_fd": 3}"#,
            r#"{"source_url": "file:///s", "zone_updates": [{"id": "z"}]}"#,
            r#"{"source_url": "file:///s", "prefault": true, "memory_restore_mode": "OnDemand"}"#,
        ] {
            let c: RestoreConfig = serde_json::from_str(body).unwrap();
            assert!(c.validate().is_err(), "{body}");
        }
        assert!(serde_json::from_str::<RestoreConfig>(r#"{"prefault": true}"#).is_err());
        assert!(serde_json::from_str::<RestoreConfig>(
            r#"{"source_url": "file:///s", "memory_restore_mode": "ondemand"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<RestoreConfig>(
            r#"{"source_url": "file:///s", "bogus": 1}"#
        )
        .is_err());
    }
}
