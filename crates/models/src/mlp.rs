use crate::classes::{ClassTable, Conditional};
use crate::ops::activation::Activation;
use crate::{jvp, Linear};
use crate::{ModelError, Params, VelocityField};
use candle_core::Module;
use candle_core::{DType, Result, Tensor, D};

/// The blog's `VelocityNet`: `[x, t]` → 3 hidden layers of width `h` → velocity. With a span
/// input the first layer reads `[x, t, h]` and the net is the average velocity `u(x, t, h)`.
pub struct VelocityNet {
    fc_in: Linear,
    fc2: Linear,
    fc3: Linear,
    fc_out: Linear,
    act: Activation,
    span: bool,
    /// `(K + 1, hidden)`: each label's row, added to the first layer's pre-activation (the
    /// last row is "no label").
    class_emb: ClassTable,
    /// A second output beside the velocity, read from the same last hidden layer (SF²M).
    score_out: Option<Linear>,
}

/// A second output layer `score_out` beside `out`, from the same last hidden layer.
fn score_head(
    p: &mut Params,
    out: &Linear,
    on: bool,
) -> std::result::Result<Option<Linear>, ModelError> {
    if !on {
        return Ok(None);
    }
    let (d_out, d_in) = out.weight().dims2()?;
    Ok(Some(p.linear("score_out", d_in, d_out)?))
}

impl VelocityNet {
    /// Builds the network for `dim`-dimensional data with hidden width `hidden` (and the span
    /// `h` as one more input with `span`).
    pub fn new(
        p: &mut Params,
        dim: usize,
        hidden: usize,
        act: Activation,
        span: bool,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            fc_in: p.linear("fc_in", dim + 1 + span as usize, hidden)?,
            fc2: p.linear("fc2", hidden, hidden)?,
            fc3: p.linear("fc3", hidden, hidden)?,
            fc_out: p.linear("fc_out", hidden, dim)?,
            act,
            span,
            class_emb: ClassTable::default(),
            score_out: None,
        })
    }

    /// The same with a score head (`on`): one more output layer beside the velocity's.
    pub fn with_score(mut self, p: &mut Params, on: bool) -> std::result::Result<Self, ModelError> {
        self.score_out = score_head(p, &self.fc_out, on)?;
        Ok(self)
    }

    /// `[x, t]`, or `[x, t, h]` with a span input (`h = 0` when none is given).
    fn input(&self, x: &Tensor, t: &Tensor, h: Option<&Tensor>) -> Result<Tensor> {
        let column = |v: &Tensor| v.reshape((x.dim(0)?, 1))?.to_dtype(x.dtype());
        let t = column(t)?;
        if !self.span {
            return Tensor::cat(&[x, &t], 1);
        }
        let h = match h {
            Some(h) => column(h)?,
            None => t.zeros_like()?,
        };
        Tensor::cat(&[x, &t, &h], 1)
    }

    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.fc_out.forward(&self.hidden(input)?)
    }

    /// The last hidden layer's activations.
    fn hidden(&self, input: &Tensor) -> Result<Tensor> {
        let h = self.fc_in.forward_with(input, self.act)?;
        let h = self.fc2.forward_with(&h, self.act)?;
        self.fc3.forward_with(&h, self.act)
    }

    /// One time (and span) for the batch; the hidden layers fused with their activation
    /// (evaluation only: no gradient on CPU).
    fn forward_at(&self, x: &Tensor, t: f64, h: f64) -> Result<Tensor> {
        let full = |v: f64| Tensor::full(v as f32, x.dim(0)?, x.device());
        let input = self.input(x, &full(t)?, Some(&full(h)?))?;
        let layers = [&self.fc_in, &self.fc2, &self.fc3];
        self.fc_out
            .forward(&Linear::forward_chain(&input, &layers, self.act)?)
    }
}

impl VelocityField for VelocityNet {
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.forward(&self.input(x, t, None)?)
    }

    fn velocity_and_score(&self, x: &Tensor, t: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let h = self.hidden(&self.input(x, t, None)?)?;
        let score = self.score_out.as_ref().map(|l| l.forward(&h)).transpose()?;
        Ok((self.fc_out.forward(&h)?, score))
    }

    fn has_score(&self) -> bool {
        self.score_out.is_some()
    }

    fn classes(&self) -> usize {
        self.class_emb.classes()
    }

    fn labeled_velocity(
        &self,
        x: &Tensor,
        t: &Tensor,
        h: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Tensor> {
        let input = self.input(x, t, h)?;
        let pre = self.class_emb.join(&self.fc_in.forward(&input)?, y)?;
        let h = self.act.apply(&pre)?;
        let h = self.fc2.forward_with(&h, self.act)?;
        let h = self.fc3.forward_with(&h, self.act)?;
        self.fc_out.forward(&h)
    }

    fn velocity_at(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        self.forward_at(x, t, 0.0)
    }

    fn mean_velocity(&self, x: &Tensor, t: &Tensor, h: &Tensor) -> Result<Tensor> {
        self.forward(&self.input(x, t, Some(h))?)
    }

    fn mean_velocity_at(&self, x: &Tensor, t: f64, h: f64) -> Result<Tensor> {
        self.forward_at(x, t, h)
    }

    /// Exact: the tangent `[dx, dt, dh]` through the layers.
    fn mean_velocity_jvp(
        &self,
        x: &Tensor,
        t: &Tensor,
        h: &Tensor,
        (dx, dt, dh): (&Tensor, f64, f64),
    ) -> Result<(Tensor, Tensor)> {
        let input = self.input(x, t, Some(h))?.detach();
        let b = x.dim(0)?;
        let full = |v: f64| Tensor::full(v, (b, 1), x.device())?.to_dtype(x.dtype());
        let mut tangent = vec![dx.detach(), full(dt)?];
        if self.span {
            tangent.push(full(dh)?);
        }
        let tangent = Tensor::cat(&tangent, 1)?;
        let hidden = [&self.fc_in, &self.fc2, &self.fc3];
        let (u, du) = jvp::chain(&input, &tangent, &hidden, &self.fc_out, self.act)?;
        Ok((u.detach(), du.detach()))
    }
}

/// The lesson's 64-dim sinusoidal time encoding: `[sin(t·f_k), cos(t·f_k)]`,
/// `f_k = exp(-ln(10000)·k/32)`, k = 0..32 (in f32, or f64 for an f64 `t`).
pub fn sinusoidal_embedding(t: &Tensor, dims: usize) -> Result<Tensor> {
    let half = dims / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (-(10000f64.ln()) * k as f64 / half as f64).exp() as f32)
        .collect();
    let dtype = if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?.to_dtype(dtype)?;
    let t = t.to_dtype(dtype)?.unsqueeze(D::Minus1)?;
    let arg = t.broadcast_mul(&freqs)?;
    Tensor::cat(&[arg.sin()?, arg.cos()?], D::Minus1)
}

/// The time features of a model's embedding: `emb(t)`, or `[emb(t), emb(h)]` with a span input
/// (`h = 0` when none is given), each of `dims` sinusoids.
pub(crate) fn time_embedding(
    t: &Tensor,
    h: Option<&Tensor>,
    span: bool,
    dims: usize,
) -> Result<Tensor> {
    let et = sinusoidal_embedding(t, dims)?;
    if !span {
        return Ok(et);
    }
    let eh = match h {
        Some(h) => sinusoidal_embedding(h, dims)?,
        None => sinusoidal_embedding(&t.zeros_like()?, dims)?,
    };
    Tensor::cat(&[et, eh], D::Minus1)
}

/// The lesson's `VelocityMLP`: sinusoidal time embedding → `Linear(64, h)` + SiLU, concatenated
/// with `x`, then `layers` hidden layers of width `h` and a linear head. With a span input the
/// embedding is `[emb(t), emb(h)]` → `Linear(128, h)`, and the net is `u(x, t, h)`.
pub struct VelocityMlp {
    time_embed: Linear,
    net: Vec<Linear>,
    act: Activation,
    span: bool,
    /// `(K + 1, hidden)`: each label's row, added to the time embedding (the last row is
    /// "no label").
    class_emb: ClassTable,
    /// A second output beside the velocity (SF²M's score head).
    score_out: Option<Linear>,
}

impl VelocityMlp {
    /// Time-embedding width, fixed by the lesson.
    pub const TIME_DIMS: usize = 64;

    /// Builds the MLP for `dim`-dimensional data.
    pub fn new(
        p: &mut Params,
        dim: usize,
        hidden: usize,
        layers: usize,
        act: Activation,
        span: bool,
    ) -> std::result::Result<Self, ModelError> {
        if layers == 0 {
            return Err(ModelError::Invalid(
                "VelocityMLP needs at least one layer".into(),
            ));
        }
        let time_in = Self::TIME_DIMS * (1 + span as usize);
        let time_embed = p.linear("time_embed.0", time_in, hidden)?;
        // Same indices as the PyTorch nn.Sequential (activations take the odd slots).
        let mut net = vec![p.linear("net.0", dim + hidden, hidden)?];
        for i in 1..layers {
            net.push(p.linear(&format!("net.{}", 2 * i), hidden, hidden)?);
        }
        net.push(p.linear(&format!("net.{}", 2 * layers), hidden, dim)?);
        Ok(Self {
            time_embed,
            net,
            act,
            span,
            class_emb: ClassTable::default(),
            score_out: None,
        })
    }

    /// The same with a score head (`on`): one more output layer beside the velocity's.
    pub fn with_score(mut self, p: &mut Params, on: bool) -> std::result::Result<Self, ModelError> {
        self.score_out = score_head(p, &self.net[self.net.len() - 1], on)?;
        Ok(self)
    }

    fn forward(&self, x: &Tensor, t: &Tensor, h: Option<&Tensor>) -> Result<Tensor> {
        self.forward_labeled(x, t, h, None)
    }

    /// The forward pass; with labels `y`, their rows join the time embedding.
    fn forward_labeled(
        &self,
        x: &Tensor,
        t: &Tensor,
        h: Option<&Tensor>,
        y: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.net[self.net.len() - 1].forward(&self.hidden(x, t, h, y)?)
    }

    /// The last hidden layer's activations (labels `y` join the time embedding).
    fn hidden(
        &self,
        x: &Tensor,
        t: &Tensor,
        h: Option<&Tensor>,
        y: Option<&Tensor>,
    ) -> Result<Tensor> {
        let h = h.map(|h| h.flatten_all()).transpose()?;
        let temb = time_embedding(&t.flatten_all()?, h.as_ref(), self.span, Self::TIME_DIMS)?;
        let mut temb = self.time_embed.forward_with(&temb, self.act)?;
        if let Some(y) = y {
            temb = self.class_emb.join(&temb, y)?;
        }
        let mut h = Tensor::cat(&[x, &temb], 1)?;
        let last = self.net.len() - 1;
        for layer in &self.net[..last] {
            h = layer.forward_with(&h, self.act)?;
        }
        Ok(h)
    }

    /// One time (and span) for the whole batch: the embedding and its share of the first
    /// layer, `W_t·emb(t) + b`, are one row computed once; `x` goes through `W_x` alone.
    fn forward_at(&self, x: &Tensor, t: f64, h: f64) -> Result<Tensor> {
        let dim = x.dim(1)?;
        let one = |v: f64| -> Result<Tensor> {
            Tensor::full(v as f32, 1, x.device())?.to_dtype(x.dtype())
        };
        let features = time_embedding(&one(t)?, Some(&one(h)?), self.span, Self::TIME_DIMS)?;
        let temb = self.act.apply(&self.time_embed.forward(&features)?)?;
        let first = &self.net[0];
        let w = first.weight();
        // The time columns of the first layer: a strided view the CPU's gemm reads as it is;
        // CUDA's matmul takes only contiguous operands (or their transposes).
        let w_t = w.narrow(1, dim, w.dim(1)? - dim)?;
        let w_t = if w_t.device().is_cpu() {
            w_t
        } else {
            w_t.contiguous()?
        };
        let row = temb.matmul(&w_t.t()?)?;
        let row = match first.bias() {
            Some(b) => row.broadcast_add(b)?,
            None => row,
        };
        // act(x·W_xᵀ + row): the first layer with the time row as its bias; then the hidden
        // layers, all fused with their activation (evaluation only: no gradient on CPU).
        let first = Linear::new(w.narrow(1, 0, dim)?, row.squeeze(0)?);
        let last = self.net.len() - 1;
        let layers: Vec<&Linear> = std::iter::once(&first).chain(&self.net[1..last]).collect();
        let h = Linear::forward_chain(x, &layers, self.act)?;
        self.net[last].forward(&h)
    }
}

impl VelocityField for VelocityMlp {
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.forward(x, t, None)
    }

    fn velocity_and_score(&self, x: &Tensor, t: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let h = self.hidden(x, t, None, None)?;
        let score = self.score_out.as_ref().map(|l| l.forward(&h)).transpose()?;
        Ok((self.net[self.net.len() - 1].forward(&h)?, score))
    }

    fn has_score(&self) -> bool {
        self.score_out.is_some()
    }

    fn classes(&self) -> usize {
        self.class_emb.classes()
    }

    fn labeled_velocity(
        &self,
        x: &Tensor,
        t: &Tensor,
        h: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Tensor> {
        self.forward_labeled(x, t, h, Some(y))
    }

    fn velocity_at(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        self.forward_at(x, t, 0.0)
    }

    fn mean_velocity(&self, x: &Tensor, t: &Tensor, h: &Tensor) -> Result<Tensor> {
        self.forward(x, t, Some(h))
    }

    fn mean_velocity_at(&self, x: &Tensor, t: f64, h: f64) -> Result<Tensor> {
        self.forward_at(x, t, h)
    }

    /// Exact: the tangent through the sinusoids, the time MLP and the layers.
    fn mean_velocity_jvp(
        &self,
        x: &Tensor,
        t: &Tensor,
        h: &Tensor,
        (dx, dt, dh): (&Tensor, f64, f64),
    ) -> Result<(Tensor, Tensor)> {
        let dtype = x.dtype();
        let t = t.flatten_all()?.to_dtype(dtype)?.detach();
        let h = h.flatten_all()?.to_dtype(dtype)?.detach();
        let (mut e, mut de) = jvp::sinusoidal_embedding(&t, dt, Self::TIME_DIMS)?;
        if self.span {
            let (eh, deh) = jvp::sinusoidal_embedding(&h, dh, Self::TIME_DIMS)?;
            e = Tensor::cat(&[e, eh], D::Minus1)?;
            de = Tensor::cat(&[de, deh], D::Minus1)?;
        }
        let (a, da) = jvp::linear(&self.time_embed, &e, &de)?;
        let (temb, dtemb) = jvp::activation(self.act, &a, &da)?;
        let input = Tensor::cat(&[&x.detach(), &temb], 1)?;
        let tangent = Tensor::cat(&[&dx.detach().to_dtype(dtype)?, &dtemb], 1)?;
        let last = self.net.len() - 1;
        let hidden: Vec<&Linear> = self.net[..last].iter().collect();
        let (u, du) = jvp::chain(&input, &tangent, &hidden, &self.net[last], self.act)?;
        Ok((u.detach(), du.detach()))
    }
}

impl Conditional for VelocityNet {
    fn class_width(&self) -> usize {
        self.fc2.weight().dims()[1]
    }
    fn class_table(&mut self) -> &mut ClassTable {
        &mut self.class_emb
    }
}

impl Conditional for VelocityMlp {
    fn class_width(&self) -> usize {
        self.time_embed.weight().dims()[0]
    }
    fn class_table(&mut self) -> &mut ClassTable {
        &mut self.class_emb
    }
}
