//! The metric registry: every metric a sweep reports, in one table. Its name is the column of
//! `summary.csv` and `summary_agg.*`, the HParams metric and `plot SWEEP --what`; its title
//! heads its `sweep.png` panel; `value` reads it from a run's summary (NaN where the run did
//! not measure it, and a column no run has is left out). A metric that only some evaluations
//! compute carries `measure`: asked for by name in `eval.metrics`, it is measured on the
//! headline samples against the real ones, stored in `summary.json` under `eval.extra` and
//! logged to TensorBoard as `eval/NAME`. Adding a metric is one entry here (and its function,
//! in `flowmatch-metrics` when it is a new distance).

use crate::report::Summary;
use candle_core::Tensor;

/// Which way a metric improves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Better {
    Lower,
    Higher,
    /// Best at this value (a two-sample accuracy at 0.5).
    Toward(f64),
}

/// One metric of the registry.
#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    /// The `sweep.png` panel title.
    pub title: &'static str,
    pub better: Better,
    /// Its value in a run's summary (NaN when not measured).
    pub value: fn(&Summary) -> f64,
    /// How an evaluation measures an opt-in metric (`eval.metrics`): from the headline's
    /// generated samples and the real ones, both on the CPU.
    pub measure: Option<fn(&Tensor, &Tensor) -> anyhow::Result<f64>>,
}

/// W2 / MMD of plain Euler at `k` steps from the eval table.
fn euler(s: &Summary, k: usize, pick: fn(&crate::report::TableRow) -> f64) -> f64 {
    s.eval.euler(k).map_or(f64::NAN, pick)
}

/// An opt-in metric's value, by name.
fn extra(s: &Summary, name: &str) -> f64 {
    s.eval.extra.get(name).copied().unwrap_or(f64::NAN)
}

const fn of(
    name: &'static str,
    title: &'static str,
    better: Better,
    value: fn(&Summary) -> f64,
) -> Metric {
    Metric {
        name,
        title,
        better,
        value,
        measure: None,
    }
}

/// Every metric, in the order of the tables' columns.
pub static METRICS: &[Metric] = &[
    of("final_loss", "final training loss", Better::Lower, |s| {
        s.final_loss
    }),
    of("w2", "W2 (headline solver)", Better::Lower, |s| s.w2),
    of("mmd", "MMD (headline solver)", Better::Lower, |s| s.mmd),
    of(
        "straightness",
        "straightness (1 = straight)",
        Better::Higher,
        |s| s.straightness,
    ),
    of(
        "rf_straightness",
        "Liu's S (0 = straight)",
        Better::Lower,
        |s| s.rf_straightness,
    ),
    of(
        "normalized_path_energy",
        "normalized path energy",
        Better::Lower,
        |s| s.normalized_path_energy,
    ),
    of("w2_euler_1", "W2 @1 Euler step", Better::Lower, |s| {
        euler(s, 1, |r| r.w2)
    }),
    of("w2_euler_2", "W2 @2 Euler steps", Better::Lower, |s| {
        euler(s, 2, |r| r.w2)
    }),
    of("w2_euler_5", "W2 @5 Euler steps", Better::Lower, |s| {
        euler(s, 5, |r| r.w2)
    }),
    of("w2_euler_100", "W2 @100 Euler steps", Better::Lower, |s| {
        euler(s, 100, |r| r.w2)
    }),
    of("w2_euler_4", "W2 @4 Euler steps", Better::Lower, |s| {
        euler(s, 4, |r| r.w2)
    }),
    of("mmd_euler_1", "MMD @1 Euler step", Better::Lower, |s| {
        euler(s, 1, |r| r.mmd)
    }),
    of("mmd_euler_2", "MMD @2 Euler steps", Better::Lower, |s| {
        euler(s, 2, |r| r.mmd)
    }),
    of("mmd_euler_4", "MMD @4 Euler steps", Better::Lower, |s| {
        euler(s, 4, |r| r.mmd)
    }),
    of(
        "w2_sde",
        "W2 of the first stochastic row",
        Better::Lower,
        |s| {
            let sde =
                |r: &&crate::report::TableRow| matches!(r.solver, crate::report::Solver::Sde(_));
            s.eval.table.iter().find(sde).map_or(f64::NAN, |r| r.w2)
        },
    ),
    of("nll", "NLL of real samples (nats)", Better::Lower, |s| {
        s.eval.nll.as_ref().map_or(f64::NAN, |n| n.nats)
    }),
    of(
        "class_accuracy",
        "class accuracy (conditional)",
        Better::Higher,
        |s| extra(s, "class_accuracy"),
    ),
    of(
        "class_accuracy_euler_1",
        "class accuracy @1 Euler step",
        Better::Higher,
        |s| extra(s, "class_accuracy_euler_1"),
    ),
    of("class_w2", "per-class W2 (mean)", Better::Lower, |s| {
        extra(s, "class_w2")
    }),
    of(
        "class_w2_euler_1",
        "per-class W2 @1 Euler step",
        Better::Lower,
        |s| extra(s, "class_w2_euler_1"),
    ),
    of(
        "class_fid",
        "per-class FID-like (mean)",
        Better::Lower,
        |s| extra(s, "class_fid"),
    ),
    Metric {
        name: "nn_accuracy",
        title: "1-NN two-sample accuracy (0.5 = perfect)",
        better: Better::Toward(0.5),
        value: |s| extra(s, "nn_accuracy"),
        measure: Some(|gen, real| Ok(flowmatch_metrics::nn_accuracy(gen, real)?)),
    },
];

/// The metric called `name`.
pub fn find(name: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.name == name)
}

/// The names of the opt-in metrics (those `eval.metrics` may ask for).
pub fn measurable() -> Vec<&'static str> {
    METRICS
        .iter()
        .filter(|m| m.measure.is_some())
        .map(|m| m.name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_titles_present() {
        for (i, m) in METRICS.iter().enumerate() {
            assert!(!m.title.is_empty());
            assert!(
                METRICS[..i].iter().all(|o| o.name != m.name),
                "{} twice",
                m.name
            );
        }
        assert_eq!(measurable(), ["nn_accuracy"]);
        assert_eq!(find("nn_accuracy").unwrap().better, Better::Toward(0.5));
    }
}
