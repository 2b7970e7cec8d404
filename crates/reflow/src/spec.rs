//! The reflow settings of an experiment, checked: how many students, how their pairs are made,
//! how they start, and the optional distillation of the last one.

use flowmatch_losses::TimeSampler;
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

/// One student of the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// 1 for the first student, 2 for the next, …
    pub index: usize,
    /// Its folder in the reflow parent: `rf2`, `rf3`, …, `distill2`.
    pub folder: String,
    /// Its row in the reflow table: `2-RF`, `3-RF`, …, `distill-2`.
    pub flow: String,
    /// Where its training times are drawn.
    pub time: TimeSampler,
    /// Its training steps.
    pub steps: usize,
    /// A k-step distillation (it always starts from its teacher's weights).
    pub distill: bool,
}

impl ReflowSpec {
    /// Whether the experiment trains anything after the base run.
    pub fn is_reflow(&self) -> bool {
        self.iterations > 0 || self.distill_k > 0
    }

    /// The students after the base run, in order: 2-RF … (K+1)-RF drawing times like the base
    /// run (`time`), then the k-step distillation on the grid {0, 1/k, …}.
    pub fn stages(&self, time: TimeSampler) -> Vec<Stage> {
        let mut stages: Vec<Stage> = (2..=self.iterations + 1)
            .map(|k| Stage {
                index: k - 1,
                folder: format!("rf{k}"),
                flow: format!("{k}-RF"),
                time,
                steps: self.steps,
                distill: false,
            })
            .collect();
        if self.distill_k > 0 {
            let k = self.distill_k;
            stages.push(Stage {
                index: stages.len() + 1,
                folder: format!("distill{k}"),
                flow: format!("distill-{k}"),
                time: TimeSampler::Grid { k },
                steps: self.distill_steps,
                distill: true,
            });
        }
        stages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowmatch_solvers::Method;

    #[test]
    fn stages_list_the_students_then_the_distillation() {
        let spec = ReflowSpec {
            iterations: 2,
            mode: ReflowMode::Online,
            pairs: 10,
            teacher: SolverSpec::new(Method::Euler, 4),
            init: ReflowInit::Scratch,
            steps: 30,
            lr: 1e-3,
            distill_k: 2,
            distill_steps: 7,
        };
        let s = spec.stages(TimeSampler::Uniform);
        let names: Vec<(&str, &str, usize, usize)> = s
            .iter()
            .map(|s| (s.folder.as_str(), s.flow.as_str(), s.index, s.steps))
            .collect();
        assert_eq!(
            names,
            [
                ("rf2", "2-RF", 1, 30),
                ("rf3", "3-RF", 2, 30),
                ("distill2", "distill-2", 3, 7)
            ]
        );
        assert_eq!(s[2].time, TimeSampler::Grid { k: 2 });
        assert!(s[2].distill && !s[0].distill);
        assert!(spec.is_reflow());
    }
}
