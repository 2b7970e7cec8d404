//! The flowmatch runner: configs, runs, sweeps, evaluation, logging.
//!
//! - [`config`]: figment layering and validation (the dotted keys are a contract).
//! - [`run`]: config → build → train → checkpoint → evaluate → run folder.
//! - [`reflow`]: k-rectified flows after the base run, the straightness table.
//! - [`sweep`]: cartesian products in parallel, resumable, shardable; summary tables.
//! - [`checkpoint`]: model and resume files; a killed run continues where it stopped.
//! - [`lock`]: one process owns a run folder at a time.
//! - [`limits`]: the memory a config asks for, estimated before anything is allocated.
//! - [`logging`]: metrics.jsonl, TensorBoard events, atomic writes.
//! - [`device`]: CPU / CUDA selection at run time.
//! - [`images`]: MNIST classifier, FID-like score, sample grids.

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod images;
pub mod limits;
pub mod lock;
pub mod logging;
pub mod plot;
pub mod reflow;
pub mod run;
pub mod sweep;
