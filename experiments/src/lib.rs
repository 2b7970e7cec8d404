//! The flowmatch runner: configs, runs, sweeps, evaluation, logging.
//!
//! - [`config`]: figment layering and validation (the dotted keys are a contract).
//! - [`run`]: config → build → train → checkpoint → evaluate → run folder.
//! - [`reflow`]: k-rectified flows after the base run, the straightness table.
//! - [`sweep`]: cartesian products in parallel, resumable, shardable; summary tables.
//! - [`logging`]: metrics.jsonl, TensorBoard events, atomic writes.
//! - [`device`]: CPU / CUDA selection at run time.
//! - [`images`]: MNIST classifier, FID-like score, sample grids.

pub mod config;
pub mod device;
pub mod images;
pub mod logging;
pub mod plot;
pub mod reflow;
pub mod run;
pub mod sweep;
