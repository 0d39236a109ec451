//! Lists of ids with their host CPUs, as the original takes them: `[<id>@[<host cpus>],...]`,
//! the CPUs as numbers and ranges (`[0,2-3]`). `--cpus affinity=` lists vCPUs, `--disk
//! queue_affinity=` a disk's queues.

use serde::{Deserialize, Serialize};

use crate::parser::int_list;
use crate::{ConfigError, OptionParser};

/// Host CPUs are below this (`CPU_SETSIZE`: what a CPU set holds).
pub const MAX_HOST_CPUS: u32 = 1024;

/// One virtqueue's host CPUs, as the original's `VirtQueueAffinity`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtQueueAffinity {
    pub queue_index: u16,
    pub host_cpus: Vec<usize>,
}

/// Ids with their host CPUs, in the order given.
pub(crate) type Entries<I> = Vec<(I, Vec<usize>)>;

/// `key=[<id>@[<host cpus>],...]` of `p`, each id read as `I` (`what` names it in errors:
/// "vCPU", "queue"); `None` when the key is not given.
pub(crate) fn parse<I: std::str::FromStr>(
    p: &OptionParser,
    key: &str,
    what: &str,
) -> Result<Option<Entries<I>>, ConfigError> {
    let syntax = format!("<{}>@[<host cpus>]", what.to_ascii_lowercase());
    let list = p.tuple_list(key, &syntax, |v| int_list(v, MAX_HOST_CPUS - 1))?;
    list.map(|list| {
        list.into_iter()
            .map(|(id, cpus)| {
                let id = id
                    .parse()
                    .map_err(|_| p.error(format!("{key}: '{id}' is not a {what} number")))?;
                Ok((id, cpus.into_iter().map(|c| c as usize).collect()))
            })
            .collect()
    })
    .transpose()
}

/// The rules of a list: each id below `limit` (named `limit_name`) and given once, each with
/// a host CPU, each CPU below [`MAX_HOST_CPUS`].
pub(crate) fn check<'a>(
    key: &str,
    what: &str,
    entries: impl Iterator<Item = (u32, &'a [usize])> + Clone,
    (limit, limit_name): (u32, &str),
) -> Result<(), String> {
    for (i, (id, cpus)) in entries.clone().enumerate() {
        if id >= limit {
            return Err(format!(
                "{key}: {what} {id} is not below {limit_name} ({limit})"
            ));
        }
        if entries.clone().take(i).any(|(other, _)| other == id) {
            return Err(format!("{key}: {what} {id} is given twice"));
        }
        if cpus.is_empty() {
            return Err(format!("{key}: {what} {id} has no host CPU"));
        }
        if let Some(c) = cpus.iter().find(|&&c| c >= MAX_HOST_CPUS as usize) {
            return Err(format!(
                "{key}: {what} {id}: host CPU {c} is not below {MAX_HOST_CPUS}"
            ));
        }
    }
    Ok(())
}
