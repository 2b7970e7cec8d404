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
    /// The guidance scale a conditional teacher samples its pairs at (1: plain conditional).
    pub guidance: f64,
}

/// A flow of a reflow chain: the k-rectified flow (`1-RF` is the base run) or the k-step
/// distillation of the last one. Written as its label (`2-RF`, `distill-2`) in tables and
/// JSON; its folder in the reflow parent is [`Flow::folder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Flow {
    /// `k-RF`.
    Rectified(usize),
    /// `distill-k`.
    Distilled(usize),
}

impl Flow {
    /// Its folder in a reflow parent: `rf2`, …, `distill2`.
    pub fn folder(&self) -> String {
        match self {
            Self::Rectified(k) => format!("rf{k}"),
            Self::Distilled(k) => format!("distill{k}"),
        }
    }
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rectified(k) => write!(f, "{k}-RF"),
            Self::Distilled(k) => write!(f, "distill-{k}"),
        }
    }
}

impl From<Flow> for String {
    fn from(f: Flow) -> String {
        f.to_string()
    }
}

impl TryFrom<String> for Flow {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let k = |n: &str| n.parse::<usize>().ok().filter(|&k| k > 0);
        match (s.strip_suffix("-RF"), s.strip_prefix("distill-")) {
            (Some(n), _) => k(n).map(Self::Rectified),
            (_, Some(n)) => k(n).map(Self::Distilled),
            _ => None,
        }
        .ok_or_else(|| format!("'{s}' is not a flow (k-RF or distill-k)"))
    }
}

/// One student of the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// 1 for the first student, 2 for the next, …
    pub index: usize,
    /// Its row in the reflow table (`2-RF`, …, `distill-2`) and its folder (`flow.folder()`).
    pub flow: Flow,
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
                flow: Flow::Rectified(k),
                time,
                steps: self.steps,
                distill: false,
            })
            .collect();
        if self.distill_k > 0 {
            let k = self.distill_k;
            stages.push(Stage {
                index: stages.len() + 1,
                flow: Flow::Distilled(k),
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
            guidance: 1.0,
        };
        let s = spec.stages(TimeSampler::Uniform);
        let names: Vec<(String, String, usize, usize)> = s
            .iter()
            .map(|s| (s.flow.folder(), s.flow.to_string(), s.index, s.steps))
            .collect();
        assert_eq!(
            names,
            [
                ("rf2".into(), "2-RF".into(), 1, 30),
                ("rf3".into(), "3-RF".into(), 2, 30),
                ("distill2".into(), "distill-2".into(), 3, 7)
            ]
        );
        // Labels read back as the same flows; anything else is refused.
        for f in [Flow::Rectified(1), Flow::Rectified(12), Flow::Distilled(2)] {
            assert_eq!(Flow::try_from(f.to_string()), Ok(f));
        }
        for bad in ["RF", "0-RF", "x-RF", "distill-", "rf2"] {
            assert!(Flow::try_from(bad.to_string()).is_err(), "{bad}");
        }
        assert_eq!(s[2].time, TimeSampler::Grid { k: 2 });
        assert!(s[2].distill && !s[0].distill);
        assert!(spec.is_reflow());
    }
}
