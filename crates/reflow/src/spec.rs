//! The reflow settings of an experiment, checked: how many students, how their pairs are made,
//! how they start, and the optional distillation of the last one.

use flowmatch_solvers::SolverSpec;

/// How a student's pairs are made (config `reflow.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReflowMode {
    /// New teacher pairs every step ([`crate::TeacherCoupling`]).
    Online,
    /// A fixed pair set generated once ([`crate::PairSet`]).
    Offline,
}

/// How a student starts (config `reflow.init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReflowInit {
    /// From a copy of the teacher's weights.
    Teacher,
    /// From fresh weights.
    Scratch,
}

/// The reflow chain after the base run (1-RF), checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReflowSpec {
    /// Reflow iterations: 1 gives 2-RF, 2 gives 3-RF, …
    pub iterations: usize,
    pub mode: ReflowMode,
    /// Size of an offline pair set.
    pub pairs: usize,
    /// The teacher's solver.
    pub teacher: SolverSpec,
    pub init: ReflowInit,
    /// Training steps of each student.
    pub steps: usize,
    /// Learning rate of each student.
    pub lr: f64,
    /// k of the k-step distillation of the last student (0 = none).
    pub distill_k: usize,
    pub distill_steps: usize,
}

impl ReflowSpec {
    /// Whether the experiment trains anything after the base run.
    pub fn is_reflow(&self) -> bool {
        self.iterations > 0 || self.distill_k > 0
    }
}
