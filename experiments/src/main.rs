//! `flowmatch`: train, evaluate and sweep flow-matching experiments.

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use flowmatch_experiments::config::{parse_set, Config, ConfigSource};
use flowmatch_experiments::logging::write_json;
use flowmatch_experiments::run::{self, fresh_run_dir, RunPaths};
use flowmatch_experiments::{device, plot, reflow, sweep};
use std::path::PathBuf;
use std::process::ExitCode;

/// candle allocates a fresh buffer per op; glibc hands buffers over 128 KiB back to the kernel
/// each time (mmap/munmap + page faults), which cost more than the maths on 2048-row batches.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "flowmatch",
    version,
    about = "Flow matching and rectified flow experiments"
)]
struct Cli {
    /// No progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train one config, evaluate it, write a run folder.
    Run {
        /// Config file (TOML).
        config: PathBuf,
        /// Override a key: --set train.steps=100 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Device: cpu, cuda, cuda:N, auto (same as --set device=…).
        #[arg(long)]
        device: Option<String>,
        /// Parent folder of the run folder.
        #[arg(long, default_value = "results/runs")]
        out: PathBuf,
    },
    /// Run the cartesian product of a sweep file.
    Sweep {
        /// Sweep file (TOML: base, [set], [axes]).
        sweep: PathBuf,
        /// Runs at a time.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Run only share I of N (0-based), e.g. from a Slurm array.
        #[arg(long, value_name = "I/N")]
        shard: Option<String>,
        /// Override a key in every run (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Parent folder of the sweep folder.
        #[arg(long, default_value = "results/runs")]
        out: PathBuf,
    },
    /// Re-evaluate a saved run with other solvers / steps (--set solver.method=rk4 …).
    Eval {
        /// A run folder written by `flowmatch run`.
        run_dir: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Reflow a finished run: train k-rectified flows with it as the first teacher
    /// (--set reflow.iterations=K, reflow.mode=offline, …); writes RUN_DIR/reflow/.
    Reflow {
        /// A run folder written by `flowmatch run`.
        run_dir: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Draw a run folder's figures again (or only some: --what distributions,flow).
    Plot {
        /// A run folder, or a reflow parent folder (with reflow.json).
        run_dir: PathBuf,
        /// Figures: distributions, trajectories, flow_field, steps_grid, flow (default: all).
        #[arg(long, value_delimiter = ',')]
        what: Vec<String>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Train the small MNIST classifier behind the FID-like score (eval.classifier).
    Classifier {
        /// Folder of the MNIST IDX files (scripts/fetch-mnist.sh), or `hub`.
        #[arg(long, default_value = "data/mnist")]
        data: String,
        /// Where to save the weights (a JSON with the test accuracy goes beside them).
        #[arg(long, default_value = "results/mnist_classifier.safetensors")]
        out: PathBuf,
        #[arg(long, default_value_t = 3000)]
        steps: usize,
        #[arg(long, default_value_t = 128)]
        batch: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// GPU benchmark: the blog's training step at a large batch, and sampling many points
    /// (defaults: batch 65,536 and 1M points, as for a GPU; prints steps/s and points/s).
    Bench {
        /// Device: cpu, cuda, cuda:N, auto.
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 65_536)]
        batch: usize,
        #[arg(long, default_value_t = 50)]
        steps: usize,
        #[arg(long, default_value_t = 1_000_000)]
        points: usize,
        /// Euler steps for the sampling benchmark.
        #[arg(long, default_value_t = 100)]
        sample_steps: usize,
    },
    /// Rebuild summary.csv / summary.md of a sweep folder (e.g. after sharded runs).
    Merge {
        /// A sweep folder.
        sweep_dir: PathBuf,
    },
}

fn sets_of(raw: &[String]) -> Result<Vec<(String, toml::Value)>> {
    raw.iter()
        .map(|s| parse_set(s).map_err(|e| anyhow!(e.0)))
        .collect()
}

/// A finished run folder's checkpoint path and its config (with `--set` overrides), loaded
/// and validated; an error when the folder holds no model.
fn open_run(
    dir: &std::path::Path,
    sets: &[(String, toml::Value)],
) -> Result<(PathBuf, (Config, flowmatch_experiments::config::Checked))> {
    let model = RunPaths {
        dir: dir.to_path_buf(),
    }
    .model();
    if !model.is_file() {
        return Err(anyhow!(
            "{} has no model.safetensors (not a run folder?)",
            dir.display()
        ));
    }
    let loaded = Config::load(&ConfigSource {
        file: Some(&dir.join("config.toml")),
        sets,
    })
    .map_err(|e| anyhow!(e.0))?;
    Ok((model, loaded))
}

fn main() -> ExitCode {
    // Small models run fastest on one candle thread; sweeps parallelise across runs instead
    // (their rayon pool is sized explicitly, so this only affects candle's matmuls).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let show = !cli.quiet;
    match cli.cmd {
        Cmd::Run {
            config,
            sets,
            device,
            out,
        } => {
            let mut sets = sets_of(&sets)?;
            if let Some(d) = device {
                sets.push(("device".into(), toml::Value::String(d)));
            }
            let (cfg, checked) = Config::load(&ConfigSource {
                file: Some(&config),
                sets: &sets,
            })
            .map_err(|e| anyhow!(e.0))?;
            let (_, chosen) =
                device::open(device::parse_device(&cfg.device).map_err(|e| anyhow!(e))?)
                    .map_err(|e| anyhow!(e))?;
            let dir = fresh_run_dir(&out, &cfg.name);
            eprintln!("run {} on {chosen} -> {}", cfg.name, dir.display());
            let s = reflow::run_experiment(&cfg, &checked, &dir, show)?;
            println!(
                "{}: final_loss {:.4}  W2 {:.4} ({} {} steps, nfe {})  straightness {:.4}  S {:.4}",
                s.name,
                s.final_loss,
                s.w2,
                s.eval.solver,
                s.eval.solver_steps,
                s.nfe,
                s.straightness,
                s.rf_straightness
            );
            print_table(&s.eval.table);
            if let Some(rows) = &s.reflow {
                print!("{}", reflow::table_markdown(rows));
            }
            println!("wrote {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Reflow { run_dir, sets } => {
            let sets = sets_of(&sets)?;
            let (model_path, (mut cfg, _)) = open_run(&run_dir, &sets)?;
            if cfg.reflow.iterations == 0 && cfg.reflow.distill_k == 0 {
                cfg.reflow.iterations = 1;
            }
            let cfg = reflow::with_reflow_eval(&cfg);
            let checked = cfg.validate().map_err(|(k, m)| anyhow!("{k}: {m}"))?;
            let (dev, chosen) =
                device::open(device::parse_device(&cfg.device).map_err(|e| anyhow!(e))?)
                    .map_err(|e| anyhow!(e))?;
            let model = checked.model.load(
                flowmatch_data::Sampler::dim(&checked.source),
                &model_path,
                &dev,
            )?;
            let first = run::evaluate(&model, &cfg, &checked, &checked.solver, &dev)?;
            let parent = run_dir.join("reflow");
            eprintln!(
                "reflow {} on {chosen}: {} iteration(s) -> {}",
                cfg.name,
                cfg.reflow.iterations,
                parent.display()
            );
            let s = reflow::chain(&cfg, &checked, model, &first, &parent, show)?;
            print!(
                "{}",
                reflow::table_markdown(s.reflow.as_deref().unwrap_or(&[]))
            );
            println!("wrote {}", parent.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sweep {
            sweep: file,
            jobs,
            shard,
            sets,
            out,
        } => {
            let sets = sets_of(&sets)?;
            let shard = match shard {
                Some(s) => sweep::parse_shard(&s).map_err(|e| anyhow!(e))?,
                None => (0, 1),
            };
            if jobs == 0 {
                return Err(anyhow!("--jobs must be at least 1"));
            }
            let plan = sweep::plan(&file, &sets).map_err(|e| anyhow!(e.0))?;
            eprintln!(
                "sweep {}: {} runs, shard {}/{}, {jobs} at a time",
                plan.name,
                plan.runs.len(),
                shard.0,
                shard.1
            );
            let rep = sweep::execute(&plan, &out, jobs, shard, show)?;
            println!(
                "sweep {}: {} ran, {} already finished, {} failed",
                plan.name,
                rep.ran,
                rep.skipped,
                rep.failed.len()
            );
            for (name, err) in &rep.failed {
                eprintln!("error: run {name}: {err}");
            }
            if shard.1 == 1 {
                println!("wrote {}/summary.csv and summary.md", rep.dir.display());
            } else {
                println!(
                    "shard done; when all shards are: flowmatch merge {}",
                    rep.dir.display()
                );
            }
            Ok(if rep.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Eval { run_dir, sets } => {
            let sets = sets_of(&sets)?;
            let (model_path, (cfg, checked)) = open_run(&run_dir, &sets)?;
            let (dev, _) = device::open(device::parse_device(&cfg.device).map_err(|e| anyhow!(e))?)
                .map_err(|e| anyhow!(e))?;
            let model = checked.model.load(
                flowmatch_data::Sampler::dim(&checked.source),
                &model_path,
                &dev,
            )?;
            let ev = run::evaluate(&model, &cfg, &checked, &checked.solver, &dev)?;
            let out = run_dir.join(format!("eval-{}-{}.json", ev.solver, ev.solver_steps));
            write_json(&out, &ev).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{} {} steps: W2 {:.4}  MMD {:.3e}  straightness {:.4}  S {:.4}  nfe {}",
                ev.solver,
                ev.solver_steps,
                ev.w2,
                ev.mmd,
                ev.straightness,
                ev.rf_straightness,
                ev.nfe
            );
            print_table(&ev.table);
            println!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plot {
            run_dir,
            what,
            sets,
        } => {
            let sets = sets_of(&sets)?;
            let figures: Vec<plot::Figure> = if what.is_empty() {
                plot::Figure::ALL.to_vec()
            } else {
                what.iter()
                    .map(|w| plot::Figure::parse(w))
                    .collect::<Result<_>>()?
            };
            let reflow_rows = run_dir.join("reflow.json");
            let (cfg_dir, rows): (PathBuf, Option<Vec<reflow::IterationRow>>) =
                if reflow_rows.is_file() {
                    let rows = serde_json::from_str(&std::fs::read_to_string(&reflow_rows)?)
                        .with_context(|| format!("reading {}", reflow_rows.display()))?;
                    (run_dir.join("rf1"), Some(rows))
                } else {
                    (run_dir.clone(), None)
                };
            let (model_path, (cfg, checked)) = open_run(&cfg_dir, &sets)?;
            let (dev, _) = device::open(device::parse_device(&cfg.device).map_err(|e| anyhow!(e))?)
                .map_err(|e| anyhow!(e))?;
            let dim = flowmatch_data::Sampler::dim(&checked.source);
            let model = checked.model.load(dim, &model_path, &dev)?;
            let mut written = plot::plot_run(&model, &cfg, &checked, &cfg_dir, &dev, &figures)?;
            if let Some(rows) = rows {
                // The last flow of the chain lives in the folder named after its row.
                let last_dir = rows
                    .last()
                    .map(|r| run_dir.join(reflow::folder_of(&r.flow)));
                let last = match last_dir {
                    Some(d) if d.join("model.safetensors").is_file() => {
                        checked
                            .model
                            .load(dim, &d.join("model.safetensors"), &dev)?
                    }
                    _ => model.duplicate()?,
                };
                reflow::reflow_figures(&cfg, &checked, &model, &last, &rows, &run_dir)?;
                written.push(run_dir.join("reflow.png"));
                written.push(run_dir.join("fm_vs_reflow.gif"));
            }
            if written.is_empty() {
                return Err(anyhow!("nothing to draw: {} is not 2D", run_dir.display()));
            }
            for w in &written {
                println!("wrote {}", w.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Classifier {
            data,
            out,
            steps,
            batch,
            lr,
            seed,
        } => {
            if steps == 0 || batch == 0 || !(lr > 0.0 && lr.is_finite()) {
                return Err(anyhow!("classifier: steps, batch and lr must be positive"));
            }
            let mnist = std::sync::Arc::new(flowmatch_data::Mnist::load(&data)?);
            let device = candle_core::Device::Cpu;
            let started = std::time::Instant::now();
            let (clf, acc) = flowmatch_experiments::images::train_classifier(
                mnist.clone(),
                steps,
                batch,
                lr,
                seed,
                &device,
            )?;
            if let Some(p) = out.parent() {
                std::fs::create_dir_all(p)?;
            }
            clf.params.save(&out)?;
            let report = serde_json::json!({
                "data": mnist.origin, "train_digits": mnist.len(), "test_digits": mnist.test_labels.len(),
                "steps": steps, "batch": batch, "lr": lr, "seed": seed, "test_accuracy": acc,
                "features": flowmatch_models::Classifier::FEATURES,
            });
            write_json(&out.with_extension("json"), &report)?;
            println!(
                "classifier: test accuracy {:.2}% on {} digits after {steps} steps ({:.1} s) -> {}",
                100.0 * acc,
                mnist.test_labels.len(),
                started.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            device,
            batch,
            steps,
            points,
            sample_steps,
        } => {
            if batch == 0 || steps == 0 || points == 0 || sample_steps == 0 {
                return Err(anyhow!(
                    "bench: batch, steps, points and sample-steps must be positive"
                ));
            }
            let req = device::parse_device(&device).map_err(|e| anyhow!("--device: {e}"))?;
            let (dev, said) = device::open(req).map_err(|e| anyhow!(e))?;
            println!("bench on {said}");
            let spec = flowmatch_models::ModelSpec::VelocityNet {
                hidden: 64,
                activation: flowmatch_models::activation::Activation::Gelu,
            };
            let g: std::sync::Arc<dyn flowmatch_data::Sampler> =
                std::sync::Arc::new(flowmatch_data::Distribution::from_name("gaussian")?);
            let t: std::sync::Arc<dyn flowmatch_data::Sampler> =
                std::sync::Arc::new(flowmatch_data::Distribution::from_name("spiral")?);
            let mut trainer = flowmatch_losses::Trainer::new(
                spec.build(2, 0, &dev)?,
                Box::new(flowmatch_losses::AffinePath::new(
                    flowmatch_losses::Schedule::Linear,
                    0.0,
                )?),
                Box::new(flowmatch_losses::Independent::new(g.clone(), t)),
                flowmatch_losses::TimeSampler::Uniform,
                batch,
                flowmatch_losses::OptimConfig {
                    lr: 3e-3,
                    ..Default::default()
                },
            )?;
            let mut rng = flowmatch_data::rng_from_seed(0);
            trainer.step(&mut rng)?; // warm-up (kernel loading, allocator)
            let started = std::time::Instant::now();
            let mut loss = 0.0;
            for _ in 0..steps {
                loss = trainer.step(&mut rng)?;
            }
            let train_s = started.elapsed().as_secs_f64();
            println!(
                "train: VelocityNet h=64, batch {batch}: {:.2} steps/s ({:.2} ms/step, {:.3e} samples/s), loss {loss:.4}",
                steps as f64 / train_s,
                1e3 * train_s / steps as f64,
                (steps * batch) as f64 / train_s
            );
            let model = trainer.into_model();
            let x0 = g.sample(points, &mut rng, &dev)?;
            let started = std::time::Instant::now();
            let sol = flowmatch_solvers::solve(
                &model,
                &x0,
                &flowmatch_solvers::SolverSpec::new(flowmatch_solvers::Method::Euler, sample_steps),
                false,
            )?;
            let x = sol.x.to_device(&candle_core::Device::Cpu)?; // waits for the device
            let sample_s = started.elapsed().as_secs_f64();
            println!(
                "sample: {points} points, Euler {sample_steps} steps: {:.3} s ({:.3e} points/s), {} values",
                sample_s,
                points as f64 / sample_s,
                x.elem_count()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Merge { sweep_dir } => {
            let (done, planned) = sweep::merge(&sweep_dir)?;
            println!(
                "merged {done} of {planned} runs into {}/summary.csv and summary.md",
                sweep_dir.display()
            );
            Ok(if done == planned {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn print_table(rows: &[run::TableRow]) {
    if rows.is_empty() {
        return;
    }
    println!(
        "{:<14} {:>6} {:>6} {:>9} {:>10}",
        "solver", "steps", "nfe", "W2", "MMD"
    );
    for r in rows {
        println!(
            "{:<14} {:>6} {:>6} {:>9.4} {:>10.3e}",
            r.solver, r.steps, r.nfe, r.w2, r.mmd
        );
    }
}
