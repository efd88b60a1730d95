//! The cascaded hyper-convolutional decoder: condition `(B, N0, L, C)` to parameter tokens
//! `(B, T, r+2, c+2)`.
//!
//! Each stage maps features `(Ni, Hi, Wi)` to `(No, Ho, Wo)`. It treats every pair of the
//! three feature axes as a 2-D image and the third as channels, so one stage mixes along all
//! of them: a width-first and a height-first branch of "same" convolutions, averaged with a bias,
//! then a convolution over the prompt axis (`ConvL`). Key names follow the reference state dict
//! (`decoder.module_list.{i}.linear1.conv1w.weight`...).

use candle_core::{DType, Module as _, Result, Tensor};
use candle_nn::VarBuilder;

/// Feature shape `(N, H, W)` of one stage boundary.
pub type Features = [usize; 3];

/// candle's CPU kernels have no bf16 matrix product (and its bf16 element-wise ops convert
/// every element): there, a bf16 decoder keeps its weights in bf16 but its activations in f32
/// (see [`HyperConvDecoder::forward_modulated`]), and the convolutions' products run on the
/// CPU's bf16 dot products where it has them ([`crate::matmul::bf16`]), in f32 elsewhere.
fn needs_f32(x: &Tensor) -> bool {
    x.dtype() == DType::BF16 && x.device().is_cpu()
}

/// `t` in the dtype of the activations `x` (a bf16 weight next to f32 activations on the CPU).
fn like(t: &Tensor, x: &Tensor) -> Result<Tensor> {
    t.to_dtype(x.dtype())
}

/// A "same"-padded, stride-1, bias-free 2-D convolution as the reference uses it.
fn conv_same(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if needs_f32(x) || needs_f32(w) {
        // f32 input (a no-op for the decoder's f32 activations); a bf16 kernel is read as it is.
        let y = super::conv::conv2d_same_in(
            &x.to_dtype(DType::F32)?,
            w,
            crate::matmul::Precision::Bf16,
        )?;
        return y.to_dtype(x.dtype());
    }
    super::conv::conv2d_same(x, w)
}

/// `x W^T + b` with the same CPU bf16 rule as [`conv_same`] (in f32: these are small).
fn linear(x: &Tensor, l: &candle_nn::Linear) -> Result<Tensor> {
    if needs_f32(x) || needs_f32(l.weight()) {
        let w = l.weight().to_dtype(DType::F32)?;
        let b = l.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
        let y = candle_nn::Linear::new(w, b).forward(&x.to_dtype(DType::F32)?)?;
        return y.to_dtype(x.dtype());
    }
    l.forward(x)
}

/// One stage of the decoder (`HyperConvLayer` in the reference).
#[derive(Debug, Clone)]
pub struct HyperConvStage {
    input: Features,
    output: Features,
    norm_weight: Tensor,
    norm_bias: Tensor,
    conv1w: Tensor,
    conv1h: Tensor,
    conv2h: Tensor,
    conv2w: Tensor,
    bias: Tensor,
    conv_l_weight: Tensor,
    conv_l_bias: Tensor,
}

impl HyperConvStage {
    /// Loads (or, with a `VarMap`-backed builder, creates) a stage's weights.
    pub fn new(input: Features, output: Features, k: usize, vb: VarBuilder) -> Result<Self> {
        let [ni, hi, wi] = input;
        let [no, ho, wo] = output;
        let l1 = vb.pp("linear1");
        let l2 = vb.pp("linear2");
        let conv_init = |fan_in: usize| {
            let bound = 1.0 / ((fan_in * k * k) as f64).sqrt();
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            }
        };
        let bias_bound = 1.0 / (ho * wo) as f64;
        Ok(Self {
            input,
            output,
            norm_weight: l1.get_with_hints((hi, wi), "norm.weight", candle_nn::Init::Const(1.0))?,
            norm_bias: l1.get_with_hints((hi, wi), "norm.bias", candle_nn::Init::Const(0.0))?,
            conv1w: l1.get_with_hints((wo, wi, k, k), "conv1w.weight", conv_init(wi))?,
            conv1h: l1.get_with_hints((ho, hi, k, k), "conv1h.weight", conv_init(hi))?,
            conv2h: l1.get_with_hints((ho, hi, k, k), "conv2h.weight", conv_init(hi))?,
            conv2w: l1.get_with_hints((wo, wi, k, k), "conv2w.weight", conv_init(wi))?,
            bias: l1.get_with_hints(
                (ho, wo),
                "bias",
                candle_nn::Init::Uniform {
                    lo: -bias_bound,
                    up: bias_bound,
                },
            )?,
            conv_l_weight: l2.get_with_hints((no, ni, k, k), "weight", conv_init(ni))?,
            conv_l_bias: l2.get_with_hints(
                no,
                "bias",
                candle_nn::Init::Uniform {
                    lo: -1.0 / ((ni * k * k) as f64).sqrt(),
                    up: 1.0 / ((ni * k * k) as f64).sqrt(),
                },
            )?,
        })
    }

    /// `(B, Ni, Hi, Wi)` to `(B, No, Ho, Wo)`, residual not included.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_modulated(x, None)
    }

    /// [`Self::forward`] with the normalised input scaled by `1 + gain` and shifted by `shift`
    /// per channel (`(B, Ni)` each; see [`super::modulation`]).
    pub fn forward_modulated(
        &self,
        x: &Tensor,
        modulation: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let (b, n, h, w) = x.dims4()?;
        // LayerNorm over the last two axes, per (batch, prompt) slice.
        let x = candle_nn::ops::layer_norm(
            &x.reshape((b, n, h * w))?,
            &like(&self.norm_weight, x)?.flatten_all()?,
            &like(&self.norm_bias, x)?.flatten_all()?,
            1e-5,
        )?
        .reshape((b, n, h, w))?;
        let x = match modulation {
            Some((gain, shift)) => {
                let gain = (like(gain, &x)?.reshape((b, n, 1, 1))? + 1.0)?;
                x.broadcast_mul(&gain)?
                    .broadcast_add(&like(shift, &x)?.reshape((b, n, 1, 1))?)?
            }
            None => x,
        };

        // Width-first: W is the channel axis over (H, N), then H over (N, W').
        let wf = conv_same(&x.transpose(1, 3)?, &self.conv1w)?; // (B, Wo, H, N)
        let wf = wf.transpose(1, 3)?.transpose(1, 2)?; // (B, H, N, Wo)
        let wf = conv_same(&wf, &self.conv1h)?.transpose(1, 2)?; // (B, N, Ho, Wo)

        // Height-first: H is the channel axis over (N, W), then W over (H', N).
        let hf = conv_same(&x.transpose(1, 2)?, &self.conv2h)?; // (B, Ho, N, W)
        let hf = hf.transpose(1, 2)?.transpose(1, 3)?; // (B, W, Ho, N)
        let hf = conv_same(&hf, &self.conv2w)?.transpose(1, 3)?.tanh()?; // (B, N, Ho, Wo)

        let y = ((wf + hf)?.broadcast_add(&like(&self.bias, &x)?)? / 3.0)?;
        let y = conv_same(&y, &self.conv_l_weight)?;
        y.broadcast_add(&like(&self.conv_l_bias, &y)?.reshape((1, (), 1, 1))?)
    }

    /// The device the stage's weights live on.
    pub fn conv_weight_device(&self) -> candle_core::Device {
        self.conv1w.device().clone()
    }

    /// Input feature shape.
    pub fn input(&self) -> Features {
        self.input
    }

    /// Output feature shape.
    pub fn output(&self) -> Features {
        self.output
    }

    /// Number of weights.
    pub fn num_params(&self) -> usize {
        [
            &self.norm_weight,
            &self.norm_bias,
            &self.conv1w,
            &self.conv1h,
            &self.conv2h,
            &self.conv2w,
            &self.bias,
            &self.conv_l_weight,
            &self.conv_l_bias,
        ]
        .iter()
        .map(|t| t.elem_count())
        .sum()
    }

    /// Multiply-adds of one forward pass for a batch of one.
    pub fn macs(&self, k: usize) -> u64 {
        let [ni, hi, wi] = self.input;
        let [no, ho, wo] = self.output;
        let kk = (k * k) as u64;
        let (ni, hi, wi, no, ho, wo) = (
            ni as u64, hi as u64, wi as u64, no as u64, ho as u64, wo as u64,
        );
        kk * (wi * wo * hi * ni // conv1w
            + hi * ho * ni * wo // conv1h
            + hi * ho * ni * wi // conv2h
            + wi * wo * ho * ni // conv2w
            + ni * no * ho * wo) // ConvL
    }
}

/// The whole cascade (`HyperConvDecoder.decoder` in the reference).
#[derive(Debug, Clone)]
pub struct HyperConvDecoder {
    stages: Vec<HyperConvStage>,
    kernel_size: usize,
}

impl HyperConvDecoder {
    /// Builds the decoder for `features` (stage boundaries, at least two) and an odd kernel.
    /// `vb` is rooted where `module_list` lives (the reference's `decoder.`).
    pub fn new(features: &[Features], kernel_size: usize, vb: VarBuilder) -> Result<Self> {
        if features.len() < 2 {
            candle_core::bail!("a decoder needs at least two feature shapes, got {features:?}");
        }
        if kernel_size.is_multiple_of(2) {
            candle_core::bail!("kernel size {kernel_size} must be odd for 'same' padding");
        }
        let vb = vb.pp("module_list");
        let stages = features
            .windows(2)
            .enumerate()
            .map(|(i, f)| HyperConvStage::new(f[0], f[1], kernel_size, vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            stages,
            kernel_size,
        })
    }

    /// The stages in order.
    pub fn stages(&self) -> &[HyperConvStage] {
        &self.stages
    }

    /// Multiply-adds of one forward pass for a batch of one.
    pub fn macs(&self) -> u64 {
        self.stages.iter().map(|s| s.macs(self.kernel_size)).sum()
    }

    /// Number of weights.
    pub fn num_params(&self) -> usize {
        self.stages.iter().map(HyperConvStage::num_params).sum()
    }
}

impl HyperConvDecoder {
    /// The forward pass with stage `i`'s input modulated by `modulation[i]` (`(gain, shift)`,
    /// see [`HyperConvStage::forward_modulated`]); `None`: the paper's decoder. A bf16 input on
    /// the CPU runs with f32 activations and comes back in bf16.
    pub fn forward_modulated(
        &self,
        x: &Tensor,
        modulation: Option<&[(Tensor, Tensor)]>,
    ) -> Result<Tensor> {
        if let Some(m) = modulation {
            if m.len() != self.stages.len() {
                candle_core::bail!(
                    "{} modulation terms for {} stages",
                    m.len(),
                    self.stages.len()
                );
            }
        }
        let out_dtype = x.dtype();
        let mut x = if needs_f32(x) {
            x.to_dtype(DType::F32)?
        } else {
            x.clone()
        };
        for (i, stage) in self.stages.iter().enumerate() {
            let m = modulation.map(|m| (&m[i].0, &m[i].1));
            let y = stage.forward_modulated(&x, m)?;
            // The reference adds the residual exactly when the shapes agree.
            x = if y.dims() == x.dims() { (x + y)? } else { y };
        }
        x.to_dtype(out_dtype)
    }
}

impl candle_core::Module for HyperConvDecoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_modulated(x, None)
    }
}

/// The large configs' condition projection: `(B, N, L, C)` viewed as `(B, N, C, L)` (a raw
/// reinterpretation of memory, not a transpose), `down_proj` (L to L'), `gate_proj` (L' to L',
/// no activation between), viewed back as `(B, N, L', C)`.
#[derive(Debug, Clone)]
pub struct ConditionProjection {
    down: candle_nn::Linear,
    gate: candle_nn::Linear,
    modified_length: usize,
}

impl ConditionProjection {
    /// `vb` is rooted where `down_proj` and `gate_proj` live.
    pub fn new(max_length: usize, modified_length: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            down: candle_nn::linear(max_length, modified_length, vb.pp("down_proj"))?,
            gate: candle_nn::linear(modified_length, modified_length, vb.pp("gate_proj"))?,
            modified_length,
        })
    }
}

impl candle_core::Module for ConditionProjection {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, l, c) = x.dims4()?;
        let x = x.contiguous()?.reshape((b, n, c, l))?;
        let y = linear(&linear(&x, &self.down)?, &self.gate)?;
        y.contiguous()?.reshape((b, n, self.modified_length, c))
    }
}
