use crate::classes::Conditional;
use crate::ops::activation::Activation;
use crate::{ModelError, Params, VelocityField, VelocityMlp, VelocityNet};
use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A velocity-field architecture with its hyperparameters (the `[model]` config section).
///
/// `span`: a second time input, the span `h` of the step the model jumps, so that the model
/// is an average velocity `u(x, t, h)` (MeanFlow, shortcut models; see
/// [`VelocityField::mean_velocity`]). The experiment sets it from its training objective.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ModelSpec {
    /// The blog's VelocityNet.
    VelocityNet {
        hidden: usize,
        #[serde(default = "gelu")]
        activation: Activation,
        #[serde(default, skip_serializing_if = "is_false")]
        span: bool,
        /// A score head beside the velocity (SF²M; the Schrödinger-bridge coupling).
        #[serde(default, skip_serializing_if = "is_false")]
        score: bool,
        /// Conditioning on `classes` labels (0: none), with one more row for "no label".
        #[serde(default, skip_serializing_if = "is_zero")]
        classes: usize,
    },
    /// The lesson's VelocityMLP.
    VelocityMlp {
        hidden: usize,
        layers: usize,
        #[serde(default = "silu")]
        activation: Activation,
        #[serde(default, skip_serializing_if = "is_false")]
        span: bool,
        /// A score head beside the velocity (SF²M; the Schrödinger-bridge coupling).
        #[serde(default, skip_serializing_if = "is_false")]
        score: bool,
        /// Conditioning on `classes` labels (0: none), with one more row for "no label".
        #[serde(default, skip_serializing_if = "is_zero")]
        classes: usize,
    },
    /// flowmatch's image U-Net: residual blocks, GroupNorm, time in every block.
    #[serde(rename = "unet")]
    UNet {
        hidden: usize,
        /// Channels at the three resolutions, in multiples of `hidden`.
        #[serde(default = "unet_mults", skip_serializing_if = "is_unet_mults")]
        mults: [usize; 3],
        /// Self-attention at the lowest resolution.
        #[serde(default, skip_serializing_if = "is_false")]
        attention: bool,
        #[serde(default, skip_serializing_if = "is_false")]
        span: bool,
        /// Conditioning on `classes` labels (0: none), with one more row for "no label".
        #[serde(default, skip_serializing_if = "is_zero")]
        classes: usize,
    },
    /// The lesson's VelocityUNet.
    #[serde(rename = "unet-lesson")]
    UNetLesson {
        hidden: usize,
        #[serde(default, skip_serializing_if = "is_false")]
        span: bool,
        /// Conditioning on `classes` labels (0: none), with one more row for "no label".
        #[serde(default, skip_serializing_if = "is_zero")]
        classes: usize,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(k: &usize) -> bool {
    *k == 0
}

/// The U-Net's channel multipliers at its three resolutions unless a config says otherwise.
pub const UNET_MULTS: [usize; 3] = [1, 2, 2];

fn unet_mults() -> [usize; 3] {
    UNET_MULTS
}
fn is_unet_mults(m: &[usize; 3]) -> bool {
    *m == UNET_MULTS
}

fn gelu() -> Activation {
    Activation::Gelu
}
fn silu() -> Activation {
    Activation::Silu
}

/// The settings of every model kind ([`ModelSpec::of`]), with the seeds' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelOptions {
    pub hidden: usize,
    /// Hidden layers (the lesson's MLP).
    pub layers: usize,
    /// Channel multipliers (the U-Net).
    pub mults: [usize; 3],
    /// Self-attention at the lowest resolution (the U-Net).
    pub attention: bool,
    /// None: the seed's choice for the kind.
    pub activation: Option<Activation>,
    /// Class labels the model is conditioned on (0: unconditional).
    pub classes: usize,
    /// A score head beside the velocity (the MLPs).
    pub score: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            hidden: 64,
            layers: 3,
            mults: UNET_MULTS,
            attention: false,
            activation: None,
            classes: 0,
            score: false,
        }
    }
}

/// The name of a model in a config (`model.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// [`ModelSpec::VelocityNet`].
    VelocityNet,
    /// [`ModelSpec::VelocityMlp`].
    VelocityMlp,
    /// [`ModelSpec::UNet`].
    #[serde(rename = "unet")]
    UNet,
    /// [`ModelSpec::UNetLesson`].
    #[serde(rename = "unet-lesson")]
    UNetLesson,
}

impl ModelKind {
    /// The config name of the kind.
    pub fn name(&self) -> &'static str {
        match self {
            Self::VelocityNet => "velocity-net",
            Self::VelocityMlp => "velocity-mlp",
            Self::UNet => "unet",
            Self::UNetLesson => "unet-lesson",
        }
    }
}

impl ModelSpec {
    /// The kind of model this spec builds.
    pub fn kind(&self) -> ModelKind {
        match self {
            Self::VelocityNet { .. } => ModelKind::VelocityNet,
            Self::VelocityMlp { .. } => ModelKind::VelocityMlp,
            Self::UNet { .. } => ModelKind::UNet,
            Self::UNetLesson { .. } => ModelKind::UNetLesson,
        }
    }

    /// The spec of `kind` with its options: `layers` is read by the lesson MLP only, `mults`
    /// and `attention` by the U-Net only, and an absent `activation` is the seed's choice for
    /// the kind (GELU for the blog's net, SiLU for the lesson's MLP).
    pub fn of(kind: ModelKind, o: ModelOptions) -> ModelSpec {
        let ModelOptions {
            hidden,
            layers,
            mults,
            attention,
            activation,
            classes,
            score,
        } = o;
        match kind {
            ModelKind::VelocityNet => Self::VelocityNet {
                hidden,
                activation: activation.unwrap_or(Activation::Gelu),
                span: false,
                score,
                classes,
            },
            ModelKind::VelocityMlp => Self::VelocityMlp {
                hidden,
                layers,
                activation: activation.unwrap_or(Activation::Silu),
                span: false,
                score,
                classes,
            },
            ModelKind::UNet => Self::UNet {
                hidden,
                mults,
                attention,
                span: false,
                classes,
            },
            ModelKind::UNetLesson => Self::UNetLesson {
                hidden,
                span: false,
                classes,
            },
        }
    }

    /// Whether the model has a score head.
    pub fn score(&self) -> bool {
        matches!(
            self,
            Self::VelocityNet { score: true, .. } | Self::VelocityMlp { score: true, .. }
        )
    }

    /// The same architecture with (or without) the span input.
    pub fn with_span(mut self, on: bool) -> ModelSpec {
        match &mut self {
            Self::VelocityNet { span, .. }
            | Self::VelocityMlp { span, .. }
            | Self::UNet { span, .. }
            | Self::UNetLesson { span, .. } => *span = on,
        }
        self
    }

    /// The class labels the model is conditioned on (0: unconditional).
    pub fn classes(&self) -> usize {
        match self {
            Self::VelocityNet { classes, .. }
            | Self::VelocityMlp { classes, .. }
            | Self::UNet { classes, .. }
            | Self::UNetLesson { classes, .. } => *classes,
        }
    }

    /// Whether the model has the span input.
    pub fn span(&self) -> bool {
        match self {
            Self::VelocityNet { span, .. }
            | Self::VelocityMlp { span, .. }
            | Self::UNet { span, .. }
            | Self::UNetLesson { span, .. } => *span,
        }
    }

    /// Whether this is an image model (it needs `(1, 28, 28)`-shaped data).
    pub fn is_image(&self) -> bool {
        matches!(self, Self::UNet { .. } | Self::UNetLesson { .. })
    }

    /// Checks hyperparameter ranges.
    pub fn validate(&self) -> std::result::Result<(), ModelError> {
        let (h, l) = match self {
            Self::VelocityNet { hidden, .. } => (*hidden, 1),
            Self::VelocityMlp { hidden, layers, .. } => (*hidden, *layers),
            Self::UNet { hidden, .. } | Self::UNetLesson { hidden, .. } => (*hidden, 1),
        };
        let bad = |field, msg| Err(ModelError::Setting { field, msg });
        if h == 0 || h > 65_536 {
            return bad(
                "hidden",
                format!("hidden width must be in 1..=65536, got {h}"),
            );
        }
        if l == 0 || l > 64 {
            return bad("layers", format!("layers must be in 1..=64, got {l}"));
        }
        if self.classes() > 1 << 16 {
            return bad(
                "classes",
                format!("must be at most 65536, got {}", self.classes()),
            );
        }
        if let Self::UNet { mults, .. } = self {
            if mults.iter().any(|&m| m == 0 || m > 16) {
                return bad(
                    "mults",
                    format!("unet channel multipliers must be in 1..=16, got {mults:?}"),
                );
            }
        }
        Ok(())
    }

    /// Builds the model for `dim`-dimensional data with weights drawn from `seed`.
    pub fn build(
        &self,
        dim: usize,
        seed: u64,
        device: &Device,
    ) -> std::result::Result<Model, ModelError> {
        self.validate()?;
        let mut params = Params::new(seed, device);
        let net: Box<dyn VelocityField> = match *self {
            Self::VelocityNet {
                hidden,
                activation,
                span,
                score,
                classes,
            } => Box::new(
                VelocityNet::new(&mut params, dim, hidden, activation, span)?
                    .with_classes(&mut params, classes)?
                    .with_score(&mut params, score)?,
            ),
            Self::VelocityMlp {
                hidden,
                layers,
                activation,
                span,
                score,
                classes,
            } => Box::new(
                VelocityMlp::new(&mut params, dim, hidden, layers, activation, span)?
                    .with_classes(&mut params, classes)?
                    .with_score(&mut params, score)?,
            ),
            Self::UNet {
                hidden,
                mults,
                attention,
                span,
                classes,
            } => Box::new(
                crate::VelocityUNet::new(&mut params, dim, hidden, mults, attention, span)?
                    .with_classes(&mut params, classes)?,
            ),
            Self::UNetLesson {
                hidden,
                span,
                classes,
            } => Box::new(
                crate::VelocityUNetLesson::new(&mut params, dim, hidden, span)?
                    .with_classes(&mut params, classes)?,
            ),
        };
        Ok(Model {
            spec: self.clone(),
            dim,
            params,
            net,
        })
    }

    /// Builds the model and loads its weights from a safetensors checkpoint.
    pub fn load(
        &self,
        dim: usize,
        path: &Path,
        device: &Device,
    ) -> std::result::Result<Model, ModelError> {
        let mut m = self.build(dim, 0, device)?;
        m.params.load(path)?;
        Ok(m)
    }
}

/// A built model: its spec, its parameters and the network that reads them.
pub struct Model {
    /// Architecture and hyperparameters.
    pub spec: ModelSpec,
    /// Data dimension.
    pub dim: usize,
    /// Trainable parameters.
    pub params: Params,
    net: Box<dyn VelocityField>,
}

impl Model {
    /// Saves the weights as safetensors.
    pub fn save(&self, path: &Path) -> std::result::Result<(), ModelError> {
        self.params.save(path)
    }

    /// A fresh model of the same architecture with a copy of these weights.
    pub fn duplicate(&self) -> std::result::Result<Model, ModelError> {
        let m = self.spec.build(self.dim, 0, self.params.device())?;
        m.params.copy_from(&self.params)?;
        Ok(m)
    }
}

impl VelocityField for Model {
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.net.velocity(x, t)
    }
    fn velocity_at(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        self.net.velocity_at(x, t)
    }
    fn mean_velocity(&self, x: &Tensor, t: &Tensor, h: &Tensor) -> Result<Tensor> {
        self.net.mean_velocity(x, t, h)
    }
    fn mean_velocity_at(&self, x: &Tensor, t: f64, h: f64) -> Result<Tensor> {
        self.net.mean_velocity_at(x, t, h)
    }
    fn mean_velocity_jvp(
        &self,
        x: &Tensor,
        t: &Tensor,
        h: &Tensor,
        tangent: (&Tensor, f64, f64),
    ) -> Result<(Tensor, Tensor)> {
        self.net.mean_velocity_jvp(x, t, h, tangent)
    }
    fn velocity_and_score(&self, x: &Tensor, t: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        self.net.velocity_and_score(x, t)
    }
    fn has_score(&self) -> bool {
        self.net.has_score()
    }
    fn classes(&self) -> usize {
        self.net.classes()
    }
    fn labeled_velocity(
        &self,
        x: &Tensor,
        t: &Tensor,
        h: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Tensor> {
        self.net.labeled_velocity(x, t, h, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinusoidal_embedding;
    use candle_core::DType;

    fn input(n: usize) -> (Tensor, Tensor) {
        let x = Tensor::arange(0f32, (2 * n) as f32, &Device::Cpu)
            .unwrap()
            .reshape((n, 2))
            .unwrap();
        let x = (x / (2.0 * n as f64)).unwrap();
        let t = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
        let t = (t / n as f64).unwrap();
        (x, t)
    }

    #[test]
    fn one_time_for_the_batch_gives_the_same_velocity() {
        for spec in [
            ModelSpec::VelocityMlp {
                hidden: 32,
                layers: 3,
                activation: Activation::Silu,
                span: false,
                score: false,
                classes: 0,
            },
            ModelSpec::VelocityNet {
                hidden: 16,
                activation: Activation::Gelu,
                span: false,
                score: false,
                classes: 0,
            },
        ] {
            let m = spec.build(2, 3, &Device::Cpu).unwrap();
            let (x, _) = input(7);
            for t in [0.0, 0.37, 1.0] {
                let full = Tensor::full(t as f32, 7, &Device::Cpu).unwrap();
                let a = m.velocity(&x, &full).unwrap();
                let b = m.velocity_at(&x, t).unwrap();
                assert_eq!(a.dims(), b.dims());
                let d = crate::max_abs_diff(&a, &b);
                assert!(d < 1e-5, "{spec:?} at t={t}: {d}");
            }
        }
    }

    #[test]
    fn shapes_and_parameter_counts_match_pytorch() {
        let net = ModelSpec::VelocityNet {
            hidden: 64,
            activation: Activation::Gelu,
            span: false,
            score: false,
            classes: 0,
        }
        .build(2, 0, &Device::Cpu)
        .unwrap();
        // 3·64+64 + 2·(64·64+64) + 64·2+2
        assert_eq!(net.params.count(), 256 + 2 * 4160 + 130);
        let mlp = ModelSpec::VelocityMlp {
            hidden: 128,
            layers: 3,
            activation: Activation::Silu,
            span: false,
            score: false,
            classes: 0,
        }
        .build(2, 0, &Device::Cpu)
        .unwrap();
        // time 64·128+128, net.0 130·128+128, 2 × (128·128+128), head 128·2+2
        assert_eq!(mlp.params.count(), 8320 + 16768 + 2 * 16512 + 258);
        let (x, t) = input(5);
        assert_eq!(net.velocity(&x, &t).unwrap().dims(), &[5, 2]);
        assert_eq!(mlp.velocity(&x, &t).unwrap().dims(), &[5, 2]);
    }

    #[test]
    fn default_unet_settings_are_left_out_of_the_spec_and_bad_ones_refused() {
        let json = |s: &ModelSpec| serde_json::to_string(s).unwrap();
        let unet = |mults, attention| {
            let o = ModelOptions {
                hidden: 16,
                mults,
                attention,
                ..Default::default()
            };
            ModelSpec::of(ModelKind::UNet, o)
        };
        let plain = unet(UNET_MULTS, false);
        // Specs written before these settings existed read back as the same model.
        assert_eq!(json(&plain), r#"{"kind":"unet","hidden":16}"#);
        let back: ModelSpec = serde_json::from_str(r#"{"kind":"unet","hidden":16}"#).unwrap();
        assert_eq!(back, plain);
        let wide = unet([1, 2, 4], true);
        assert_eq!(
            json(&wide),
            r#"{"kind":"unet","hidden":16,"mults":[1,2,4],"attention":true}"#
        );
        let e = unet([1, 0, 2], false).validate().unwrap_err();
        assert!(
            matches!(e, ModelError::Setting { field: "mults", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("[1, 0, 2]"), "{e}");
    }

    #[test]
    fn seeded_init_is_deterministic_and_save_load_roundtrips() {
        let spec = ModelSpec::VelocityMlp {
            hidden: 16,
            layers: 2,
            activation: Activation::Silu,
            span: false,
            score: false,
            classes: 0,
        };
        let (x, t) = input(4);
        let a = spec.build(2, 3, &Device::Cpu).unwrap();
        let b = spec.build(2, 3, &Device::Cpu).unwrap();
        let c = spec.build(2, 4, &Device::Cpu).unwrap();
        let va: Vec<f32> = a
            .velocity(&x, &t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let vb: Vec<f32> = b
            .velocity(&x, &t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let vc: Vec<f32> = c
            .velocity(&x, &t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(va, vb);
        assert_ne!(va, vc);
        let dir = std::env::temp_dir().join(format!("fm-models-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.safetensors");
        a.save(&path).unwrap();
        let l = spec.load(2, &path, &Device::Cpu).unwrap();
        let vl: Vec<f32> = l
            .velocity(&x, &t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(va, vl);
        let other = ModelSpec::VelocityMlp {
            hidden: 8,
            layers: 2,
            activation: Activation::Silu,
            span: false,
            score: false,
            classes: 0,
        };
        assert!(matches!(
            other.load(2, &path, &Device::Cpu),
            Err(ModelError::Checkpoint { .. })
        ));
        let dup = a.duplicate().unwrap();
        let vd: Vec<f32> = dup
            .velocity(&x, &t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(va, vd);
        // The same names and shapes in another dtype: refused, naming the tensor and dtype.
        for dtype in [DType::U8, DType::I64, DType::BF16, DType::F16, DType::F64] {
            let cast: std::collections::HashMap<String, Tensor> = a
                .params
                .named_vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().to_dtype(dtype).unwrap()))
                .collect();
            let p = dir.join("cast.safetensors");
            candle_core::safetensors::save(&cast, &p).unwrap();
            let e = spec.load(2, &p, &Device::Cpu).err().unwrap().to_string();
            assert!(
                e.contains(&format!("{dtype:?}")) && e.contains("F32") && e.contains("cast"),
                "{dtype:?}: {e}"
            );
        }
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn time_embedding_matches_lesson_formula() {
        let t = Tensor::new(&[0.0f32, 0.5], &Device::Cpu).unwrap();
        let e: Vec<Vec<f32>> = sinusoidal_embedding(&t, 64).unwrap().to_vec2().unwrap();
        assert_eq!(e[0][0], 0.0);
        assert_eq!(e[0][32], 1.0);
        let f3 = (-(10000f64.ln()) * 3.0 / 32.0).exp();
        assert!((e[1][3] as f64 - (0.5 * f3).sin()).abs() < 1e-6);
        assert!((e[1][35] as f64 - (0.5 * f3).cos()).abs() < 1e-6);
    }

    #[test]
    fn conditional_models_read_their_labels_and_save_and_load_with_their_class_count() {
        let dir = std::env::temp_dir().join(format!("fm-classes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.safetensors");
        let o = |classes| ModelOptions {
            hidden: 16,
            layers: 2,
            classes,
            ..Default::default()
        };
        for (kind, dim) in [
            (ModelKind::VelocityNet, 2),
            (ModelKind::VelocityMlp, 2),
            (ModelKind::UNetLesson, 784),
            (ModelKind::UNet, 784),
        ] {
            let spec = ModelSpec::of(kind, o(3));
            assert_eq!(spec.classes(), 3);
            // An unconditional model draws the same weights as before the labels existed.
            let plain = ModelSpec::of(kind, o(0))
                .build(dim, 5, &Device::Cpu)
                .unwrap();
            let m = spec.build(dim, 5, &Device::Cpu).unwrap();
            assert_eq!(m.classes(), 3);
            for (name, v) in plain.params.named_vars() {
                let w = m
                    .params
                    .named_vars()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .unwrap()
                    .1;
                let same = (v.as_tensor() - w.as_tensor())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all();
                assert_eq!(
                    same.unwrap().to_scalar::<f32>().unwrap(),
                    0.0,
                    "{kind:?} {name}"
                );
            }
            let x = Tensor::ones((4, dim), candle_core::DType::F32, &Device::Cpu).unwrap();
            let t = Tensor::new(&[0.1f32, 0.5, 0.5, 0.9], &Device::Cpu).unwrap();
            let y = crate::label_tensor(&[0, 1, 2, 3], &Device::Cpu).unwrap();
            let v = m.labeled_velocity(&x, &t, None, &y).unwrap();
            // Different labels give different velocities at the same (x, t).
            let rows = v.to_vec2::<f32>().unwrap();
            assert_ne!(rows[1], rows[2], "{kind:?}: labels ignored");
            m.params.save(&path).unwrap();
            let back = spec.load(dim, &path, &Device::Cpu).unwrap();
            let w = back.labeled_velocity(&x, &t, None, &y).unwrap();
            assert_eq!(rows, w.to_vec2::<f32>().unwrap(), "{kind:?}");
            // Another class count (or none) does not load these weights.
            assert!(ModelSpec::of(kind, o(5))
                .load(dim, &path, &Device::Cpu)
                .is_err());
            assert!(ModelSpec::of(kind, o(0))
                .load(dim, &path, &Device::Cpu)
                .is_err());
            assert!(plain.labeled_velocity(&x, &t, None, &y).is_err());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
