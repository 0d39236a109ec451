//! Starting confined threads.
//!
//! Filters stack: a thread created by a confined thread is confined by its creator's filters
//! as well as its own. So the VMM's threads are created by the spawner, a thread started before
//! anything else is confined whose filter is the union of every kind it starts (and what
//! creating a thread takes). Each new thread installs its own filter before it runs its work:
//! its calls are then its own list, whoever asked for it (a vCPU activating a device, the
//! control loop resuming a worker).

use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::{Builder, JoinHandle};

use syscalls::Sysno::{self, *};

use crate::{Error, Filter};

/// What creating a thread takes (beyond [`crate::base`]): the new thread's stack and guard
/// page, clone, and what the new thread does before its work starts (naming itself, its
/// alternate signal stack, its CPU set as the allocator reads it, installing its own filter).
/// `sched_setaffinity` for the threads pinned to host CPUs (vCPUs with `--cpus affinity`, a
/// disk's `queue_affinity` workers), which call it first thing under their own filter: filters
/// stack, so each thread still needs it in its own list.
const SPAWN: &[Sysno] = &[
    clone,
    clone3,
    prctl,
    seccomp,
    sched_getaffinity,
    sched_setaffinity,
];

type Job = Box<dyn FnOnce() + Send>;

static SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Starts the spawner with `filter` (the union of the kinds it will start, see the module
/// doc). From then on [`spawn`] creates threads through it. Once per process: a second call
/// keeps the first spawner.
pub fn start_spawner(filter: Filter) -> Result<(), Error> {
    if SPAWNER.get().is_some() {
        return Ok(());
    }
    let filter = filter.allow(SPAWN);
    let (tx, rx) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    Builder::new()
        .name("spawner".into())
        .spawn(move || {
            let installed = filter.install();
            let ok = installed.is_ok();
            let _ = ready_tx.send(installed);
            if ok {
                for job in rx {
                    job();
                }
            }
        })
        .map_err(|source| Error::Spawn {
            name: "spawner".into(),
            source,
        })?;
    ready_rx.recv().map_err(|_| Error::Spawn {
        name: "spawner".into(),
        source: std::io::Error::other("the spawner ended before it started"),
    })??;
    let _ = SPAWNER.set(Mutex::new(tx));
    Ok(())
}

/// Whether [`start_spawner`] has run.
pub fn spawner_running() -> bool {
    SPAWNER.get().is_some()
}

/// Runs `f` on the spawner thread and returns what it returns; `None` when no spawner runs
/// (or it has ended). For what must hold for every thread the spawner creates later: a
/// Landlock domain (`vmm/src/landlock.rs`), which a thread inherits from its creator only.
pub fn on_spawner<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let spawner = SPAWNER.get()?;
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    spawner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send(job)
        .ok()?;
    rx.recv().ok()
}

/// Starts thread `name` confined by `filter`: `f` runs only once the filter is installed. An
/// error means `f` never runs (a thread whose filter could not be installed parks for good).
pub fn spawn<F, T>(name: String, filter: Filter, f: F) -> Result<JoinHandle<T>, Error>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (started_tx, started_rx) = mpsc::sync_channel::<Result<(), Error>>(1);
    let body = move || {
        let installed = filter.install();
        let failed = installed.is_err();
        let _ = started_tx.send(installed);
        if failed {
            loop {
                std::thread::park();
            }
        }
        f()
    };
    let spawn_error = |source| Error::Spawn {
        name: name.clone(),
        source,
    };
    let handle = match SPAWNER.get() {
        None => Builder::new().name(name.clone()).spawn(body),
        Some(spawner) => {
            let (handle_tx, handle_rx) = mpsc::sync_channel(1);
            let thread_name = name.clone();
            let job: Job = Box::new(move || {
                let _ = handle_tx.send(Builder::new().name(thread_name).spawn(body));
            });
            let sent = spawner
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .send(job);
            match sent {
                Ok(()) => handle_rx
                    .recv()
                    .unwrap_or_else(|_| Err(std::io::Error::other("the spawner has ended"))),
                Err(_) => Err(std::io::Error::other("the spawner has ended")),
            }
        }
    }
    .map_err(spawn_error)?;
    started_rx
        .recv()
        .map_err(|_| spawn_error(std::io::Error::other("the thread ended before it started")))??;
    Ok(handle)
}
