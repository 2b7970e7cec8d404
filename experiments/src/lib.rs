//! The flowmatch runner: configs, runs, sweeps, evaluation, logging.
//!
//! - [`config`]: figment layering into typed sections (the dotted keys are a contract).
//! - [`check`]: each section checked once, without I/O, into a [`check::Plan`].
//! - [`experiment`]: a plan built once (data read, device opened) for runs, stages, sweeps.
//! - [`run`]: config → build → train → checkpoint → evaluate → run folder.
//! - [`train`]: the train stage: trainer, fresh start or checkpoint, the loop and its hooks.
//! - [`eval`]: the evaluation samples and the metrics of a model (headline and table).
//! - [`metrics`]: the metric registry (names, titles, better-direction, how to read or measure).
//! - [`report`]: the result types several modules share (summaries, tables, reflow rows).
//! - [`folder`]: run folders: paths, finished / killed / changed runs, claiming a name.
//! - [`reflow`]: k-rectified flows after the base run, the straightness table.
//! - [`sweep`]: cartesian products in parallel, resumable, shardable.
//! - [`sweep_report`]: the sweep's tables: axis columns, reflow rows, replicate intervals.
//! - [`hparams`]: the sweep's runs as sessions of TensorBoard's HParams dashboard.
//! - [`sweep_plot`]: `sweep.png`, metrics against an axis or the reflow iteration.
//! - [`stats`]: mean, standard deviation and Student-t intervals of replicates.
//! - [`plot`]: the figures (PNG, GIF) of runs, reflow chains and image samples.
//! - [`bench`]: the GPU benchmark behind `flowmatch bench`.
//! - [`checkpoint`]: model and resume files; a killed run continues where it stopped.
//! - [`lock`]: one process owns a run folder at a time.
//! - [`signals`]: SIGTERM / Ctrl-C: checkpoint after the current step, exit to be resumed.
//! - [`limits`]: the memory a config asks for, estimated before anything is allocated.
//! - [`logging`]: metrics.jsonl, TensorBoard events, atomic writes.
//! - [`device`]: CPU / CUDA selection at run time.
//! - [`runtime`]: process-wide policy (allocator, threads).
//! - [`images`]: the MNIST classifier and the FID-like score.

pub mod bench;
pub mod check;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod eval;
pub mod experiment;
pub mod folder;
pub mod hparams;
pub mod images;
pub mod limits;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod plot;
pub mod reflow;
pub mod report;
pub mod run;
pub mod runtime;
pub mod signals;
pub mod stats;
pub mod sweep;
pub mod sweep_plot;
pub mod sweep_report;
pub mod train;
