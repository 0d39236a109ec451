//! A device whose queues are served by several workers, one thread each (virtio-blk with
//! `queue_affinity`: a thread per queue, each pinned where its queue's CPUs are). Each member
//! has its queues and its handler; activation hands each member its queues (a member none of
//! whose queues the driver enabled stays idle), and reset, pause, resume and the queue
//! positions of a snapshot cover every member, so the device looks like one worker to the
//! transport.

use crate::device_worker::DeviceWorker;
use crate::worker::QueueHandler;
use crate::{ActivateContext, ActivateError};

struct Member<H> {
    /// The queue indexes this member serves.
    queues: Vec<usize>,
    worker: DeviceWorker<H>,
}

pub struct WorkerGroup<H> {
    members: Vec<Member<H>>,
}

impl<H: QueueHandler> WorkerGroup<H> {
    /// Members `(queues, handler)`; every queue of the device in exactly one of them.
    pub fn new(name: &'static str, members: Vec<(Vec<usize>, H)>) -> Self {
        WorkerGroup {
            members: members
                .into_iter()
                .map(|(queues, handler)| Member {
                    queues,
                    worker: DeviceWorker::new(name, handler),
                })
                .collect(),
        }
    }

    /// The members' kept handlers, while no driver runs the device.
    pub fn idle_mut(&mut self) -> impl Iterator<Item = &mut H> {
        self.members.iter_mut().filter_map(|m| m.worker.idle_mut())
    }

    /// The first member's kept handler, while no driver runs the device.
    pub fn first_idle(&self) -> Option<&H> {
        self.members.first().and_then(|m| m.worker.idle())
    }

    /// Starts each member whose queues the driver enabled, with those queues. If one cannot
    /// start, those started are stopped again (their handlers kept) and the error returned.
    pub fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut started = 0;
        for m in &mut self.members {
            let queues: Vec<_> = (0..ctx.queues.len())
                .map(|i| {
                    if m.queues.contains(&i) {
                        ctx.queues[i].take()
                    } else {
                        None
                    }
                })
                .collect();
            if queues.iter().all(Option::is_none) {
                continue;
            }
            let part = ActivateContext {
                mem: ctx.mem.clone(),
                interrupt: ctx.interrupt.clone(),
                queues,
                acked_features: ctx.acked_features,
                status: ctx.status.clone(),
                dma: ctx.dma.clone(),
            };
            if let Err(e) = m.worker.activate(part) {
                self.reset(|_| {});
                return Err(e);
            }
            started += 1;
        }
        if started == 0 {
            return Err(ActivateError::NoQueues);
        }
        Ok(())
    }

    /// A device reset: stops every member; `each` gets each kept handler.
    pub fn reset(&mut self, mut each: impl FnMut(&mut H)) {
        for m in &mut self.members {
            if let Some(h) = m.worker.reset() {
                each(h);
            }
        }
    }

    /// Runs `f` on every member's handler (`DeviceWorker::with_handler`: a running member is
    /// paused for it and resumed after).
    pub fn with_handlers(&mut self, mut f: impl FnMut(&mut H)) -> Result<(), String> {
        for m in &mut self.members {
            m.worker.with_handler(&mut f)?;
        }
        Ok(())
    }

    /// Pauses every member; the first error, once all were tried.
    pub fn pause(&mut self) -> Result<(), String> {
        self.members
            .iter_mut()
            .map(|m| m.worker.pause())
            .fold(Ok(()), Result::and)
    }

    /// Resumes every member; the first error, once all were tried.
    pub fn resume(&mut self) -> Result<(), String> {
        self.members
            .iter_mut()
            .map(|m| m.worker.resume())
            .fold(Ok(()), Result::and)
    }

    /// Each queue's `(next_avail, next_used)` while the device is active and paused, from
    /// the member that serves it (`None` for a queue no member runs); `None` while a member
    /// runs, or when none is active.
    pub fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        let mut out: Vec<Option<(u16, u16)>> = Vec::new();
        let mut any = false;
        for m in &self.members {
            if !m.worker.is_active() {
                continue;
            }
            let positions = m.worker.queue_positions()?;
            any = true;
            if out.len() < positions.len() {
                out.resize(positions.len(), None);
            }
            for &q in &m.queues {
                if let Some(p) = positions.get(q).copied().flatten() {
                    out[q] = Some(p);
                }
            }
        }
        any.then_some(out)
    }
}
