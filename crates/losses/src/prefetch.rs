//! One long-lived worker thread that pairs the next batch while the current step trains.
//!
//! A thread spawned per step cost more than it saved: each new thread starts a fresh
//! allocator heap (page faults) and its exit unmaps its stack (a TLB shootdown that interrupts
//! the training thread). This one lives as long as its trainer.

use crate::{Draw, LossError, Pairing};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

type Pairs = Result<crate::coupling::Pairs, LossError>;

pub(crate) struct Prefetcher {
    jobs: Option<Sender<Draw>>,
    done: Receiver<Pairs>,
    worker: Option<JoinHandle<()>>,
    pending: bool,
}

impl Prefetcher {
    /// A worker that runs `pairing` on each draw it is given.
    pub(crate) fn new(pairing: Arc<dyn Pairing>) -> Self {
        let (jobs, inbox) = channel::<Draw>();
        let (outbox, done) = channel();
        let worker = std::thread::spawn(move || {
            for draw in inbox {
                if outbox.send(pairing.pair_labeled(draw)).is_err() {
                    break;
                }
            }
        });
        Self {
            jobs: Some(jobs),
            done,
            worker: Some(worker),
            pending: false,
        }
    }

    /// Starts pairing `draw` on the worker.
    pub(crate) fn start(&mut self, draw: Draw) -> Result<(), LossError> {
        let sent = self.jobs.as_ref().map(|j| j.send(draw));
        match sent {
            Some(Ok(())) => {
                self.pending = true;
                Ok(())
            }
            _ => Err(LossError::Invalid("the pairing thread stopped".into())),
        }
    }

    /// The pairs started last, if any (waits for them).
    pub(crate) fn take(&mut self) -> Option<Pairs> {
        if !std::mem::take(&mut self.pending) {
            return None;
        }
        Some(
            self.done
                .recv()
                .unwrap_or_else(|_| Err(LossError::Invalid("the pairing thread stopped".into()))),
        )
    }

    /// Whether a batch is being paired.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> bool {
        self.pending
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the job channel ends the worker's loop.
        self.jobs.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
