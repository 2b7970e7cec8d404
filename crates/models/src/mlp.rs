use crate::activation::Activation;
use crate::Linear;
use crate::{ModelError, Params, VelocityField};
use candle_core::Module;
use candle_core::{DType, Result, Tensor, D};

/// The blog's `VelocityNet`: `[x, t]` → 3 hidden layers of width `h` → velocity.
pub struct VelocityNet {
    fc_in: Linear,
    fc2: Linear,
    fc3: Linear,
    fc_out: Linear,
    act: Activation,
}

impl VelocityNet {
    /// Builds the network for `dim`-dimensional data with hidden width `hidden`.
    pub fn new(
        p: &mut Params,
        dim: usize,
        hidden: usize,
        act: Activation,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            fc_in: p.linear("fc_in", dim + 1, hidden)?,
            fc2: p.linear("fc2", hidden, hidden)?,
            fc3: p.linear("fc3", hidden, hidden)?,
            fc_out: p.linear("fc_out", hidden, dim)?,
            act,
        })
    }
}

impl VelocityField for VelocityNet {
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let t = t.reshape((x.dim(0)?, 1))?.to_dtype(x.dtype())?;
        let h = Tensor::cat(&[x, &t], 1)?;
        let h = self.fc_in.forward_with(&h, self.act)?;
        let h = self.fc2.forward_with(&h, self.act)?;
        let h = self.fc3.forward_with(&h, self.act)?;
        self.fc_out.forward(&h)
    }

    /// One time for the batch; the hidden layers fused with their activation (evaluation only:
    /// no gradient on CPU).
    fn velocity_at(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        let tt = Tensor::full(t as f32, (x.dim(0)?, 1), x.device())?.to_dtype(x.dtype())?;
        let layers = [&self.fc_in, &self.fc2, &self.fc3];
        let h = Linear::forward_chain(&Tensor::cat(&[x, &tt], 1)?, &layers, self.act)?;
        self.fc_out.forward(&h)
    }
}

/// The lesson's 64-dim sinusoidal time encoding: `[sin(t·f_k), cos(t·f_k)]`,
/// `f_k = exp(-ln(10000)·k/32)`, k = 0..32.
pub fn sinusoidal_embedding(t: &Tensor, dims: usize) -> Result<Tensor> {
    let half = dims / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (-(10000f64.ln()) * k as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let t = t.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let arg = t.broadcast_mul(&freqs)?;
    Tensor::cat(&[arg.sin()?, arg.cos()?], D::Minus1)
}

/// The lesson's `VelocityMLP`: sinusoidal time embedding → `Linear(64, h)` + SiLU, concatenated
/// with `x`, then `layers` hidden layers of width `h` and a linear head.
pub struct VelocityMlp {
    time_embed: Linear,
    net: Vec<Linear>,
    act: Activation,
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
    ) -> std::result::Result<Self, ModelError> {
        if layers == 0 {
            return Err(ModelError::Invalid(
                "VelocityMLP needs at least one layer".into(),
            ));
        }
        let time_embed = p.linear("time_embed.0", Self::TIME_DIMS, hidden)?;
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
        })
    }
}

impl VelocityField for VelocityMlp {
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let temb = sinusoidal_embedding(&t.flatten_all()?, Self::TIME_DIMS)?;
        let temb = self.time_embed.forward_with(&temb, self.act)?;
        let mut h = Tensor::cat(&[x, &temb], 1)?;
        let last = self.net.len() - 1;
        for layer in &self.net[..last] {
            h = layer.forward_with(&h, self.act)?;
        }
        self.net[last].forward(&h)
    }

    /// One time for the whole batch: the embedding and its share of the first layer,
    /// `W_t·emb(t) + b`, are one row computed once; `x` goes through `W_x` alone.
    fn velocity_at(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        let dim = x.dim(1)?;
        let tt = Tensor::full(t as f32, 1, x.device())?.to_dtype(x.dtype())?;
        let temb = self.act.apply(
            &self
                .time_embed
                .forward(&sinusoidal_embedding(&tt, Self::TIME_DIMS)?)?,
        )?;
        let first = &self.net[0];
        let w = first.weight();
        let row = temb.matmul(&w.narrow(1, dim, w.dim(1)? - dim)?.t()?)?;
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
