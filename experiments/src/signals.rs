//! Stopping cleanly: SIGTERM (what Slurm sends before it preempts a job, requeues it or
//! reaches its time limit) or Ctrl-C makes every training run write a checkpoint after its
//! current step and stop; the program then exits with [`RESUMABLE_EXIT`], and the same
//! command run again continues from there. A second Ctrl-C ends the program at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The exit code of a program stopped with its work checkpointed (sysexits' EX_TEMPFAIL:
/// "try again later"): rerun the same command to continue.
pub const RESUMABLE_EXIT: i32 = 75;

fn flag() -> &'static Arc<AtomicBool> {
    static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    STOP.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Starts listening for SIGTERM and SIGINT.
pub fn install() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = flag();
    // A second Ctrl-C, once a stop was asked for, exits at once (130, as a shell reports it).
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, stop.clone())?;
    signal_hook::flag::register(SIGINT, stop.clone())?;
    signal_hook::flag::register(SIGTERM, stop.clone())?;
    Ok(())
}

/// Whether a stop was asked for.
pub fn stop_requested() -> bool {
    flag().load(Ordering::Relaxed)
}

/// A run stopped on request after `step`, its checkpoint written.
#[derive(Debug, thiserror::Error)]
#[error("{run}: stopped after step {step} on request (SIGTERM or Ctrl-C); its checkpoint is written, so the same command run again continues from there")]
pub struct Stopped {
    pub run: String,
    pub step: usize,
}

/// A phase other than training (setup, planning, evaluation, figures, merging) stopped on
/// request: what was finished is kept, and the same command run again continues.
#[derive(Debug, thiserror::Error)]
#[error("{what}: stopped on request (SIGTERM or Ctrl-C); what was finished is kept, so the same command run again continues from there")]
pub struct Interrupted {
    pub what: String,
}

/// Ends `what` at this point when a stop was asked for (long phases call it between their
/// pieces, so that Slurm's grace period is enough).
pub fn check(what: &str) -> Result<(), Interrupted> {
    if stop_requested() {
        Err(Interrupted {
            what: what.to_string(),
        })
    } else {
        Ok(())
    }
}

/// Whether an error (anywhere in its chain) is a stop on request.
pub fn is_stop(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<Stopped>().is_some() || c.downcast_ref::<Interrupted>().is_some())
}
