//! The cascaded hyper-convolutional decoder: condition `(B, N0, L, C)` to parameter tokens
//! `(B, T, r+2, c+2)`.
//!
//! Each stage maps features `(Ni, Hi, Wi)` to `(No, Ho, Wo)`. It treats every pair of the
//! three feature axes as a 2-D image and the third as channels, so one stage mixes along all
//! of them: a width-first and a height-first branch of "same" convolutions, averaged with a bias,
//! then a convolution over the prompt axis (`ConvL`). Key names follow the reference state dict
//! (`decoder.module_list.{i}.linear1.conv1w.weight`...).

use std::sync::Arc;

use candle_core::{DType, Module as _, Result, Tensor};
use candle_nn::VarBuilder;

use super::conv::{with_cpu_f32, with_cpu_strided_f32, PreparedKernel};
use crate::matmul::Precision;
use rayon::prelude::*;

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

/// The precision of a convolution's products: bf16 where the activations or the weights are
/// bf16 on the CPU (see [`needs_f32`]), f32 otherwise.
fn conv_precision(x_dtype_bf16_cpu: bool, w: &Tensor) -> Precision {
    if x_dtype_bf16_cpu || needs_f32(w) {
        Precision::Bf16
    } else {
        Precision::F32
    }
}

/// A "same"-padded, stride-1, bias-free 2-D convolution as the reference uses it, with `w`
/// readied beforehand when `prepared` (see [`HyperConvStage::prepare`]).
fn conv_same(x: &Tensor, w: &Tensor, prepared: Option<&PreparedKernel>) -> Result<Tensor> {
    match conv_precision(needs_f32(x), w) {
        Precision::Bf16 => {
            // f32 input (a no-op for the decoder's f32 activations); a bf16 kernel is read as
            // it is.
            let y = super::conv::conv2d_same_prepared(
                &x.to_dtype(DType::F32)?,
                w,
                prepared,
                Precision::Bf16,
            )?;
            y.to_dtype(x.dtype())
        }
        Precision::F32 => super::conv::conv2d_same_prepared(x, w, prepared, Precision::F32),
    }
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

/// `(wf + tanh(hf) + bias) / 3`, the two branches of a stage joined (`(B, N, Ho, Wo)` each,
/// `bias` `(Ho, Wo)`). On the CPU in f32 outside autograd, one parallel pass over the planes
/// reading both branches through their strides (they are transposed views); candle's ops take
/// four single-threaded passes.
fn mix_branches(wf: &Tensor, hf: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let plain = wf.device().is_cpu()
        && wf.elem_count() > 0
        && [wf, hf, bias]
            .iter()
            .all(|t| t.dtype() == DType::F32 && !t.track_op());
    if !plain {
        return (wf + hf.tanh()?)?.broadcast_add(bias)? / 3.0;
    }
    let (b, n, h, w) = wf.dims4()?;
    if hf.dims() != [b, n, h, w] || bias.dims() != [h, w] {
        candle_core::bail!(
            "branches {:?} and {:?} with bias {:?}",
            wf.dims(),
            hf.dims(),
            bias.dims()
        );
    }
    let bias = bias.contiguous()?;
    let third = (1.0f64 / 3.0) as f32;
    let out = with_cpu_strided_f32(wf, |wsrc, ws| {
        with_cpu_strided_f32(hf, |hsrc, hs| {
            with_cpu_f32(&bias, |bsrc| {
                let mut out = vec![0f32; b * n * h * w];
                out.par_chunks_mut(h * w)
                    .enumerate()
                    .for_each(|(plane, dst)| {
                        let (i0, i1) = (plane / n, plane % n);
                        let wb = i0 * ws[0] + i1 * ws[1];
                        let hb = i0 * hs[0] + i1 * hs[1];
                        for (y, row) in dst.chunks_exact_mut(w).enumerate() {
                            for (x, v) in row.iter_mut().enumerate() {
                                let a = wsrc[wb + y * ws[2] + x * ws[3]];
                                let t = crate::fastmath::tanh(hsrc[hb + y * hs[2] + x * hs[3]]);
                                // The order candle's ops take: the sum, the bias, then 1/3.
                                *v = ((a + t) + bsrc[y * w + x]) * third;
                            }
                        }
                    });
                out
            })
        })
    })???;
    Tensor::from_vec(out, (b, n, h, w), wf.device())
}

/// `y (B, C, H, W) + bias (C)` per channel: on the CPU in f32 outside autograd one parallel
/// pass (candle's broadcast add is one thread).
fn add_channel_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let plain = y.device().is_cpu()
        && y.is_contiguous()
        && y.elem_count() > 0
        && [y, bias]
            .iter()
            .all(|t| t.dtype() == DType::F32 && !t.track_op());
    if !plain {
        return y.broadcast_add(&bias.reshape((1, (), 1, 1))?);
    }
    let (_, c, h, w) = y.dims4()?;
    let b = bias.to_vec1::<f32>()?;
    if b.len() != c {
        candle_core::bail!("bias of {} for {c} channels", b.len());
    }
    let out = with_cpu_f32(y, |ys| {
        let mut out = vec![0f32; ys.len()];
        out.par_chunks_mut(h * w)
            .zip(ys.par_chunks(h * w))
            .enumerate()
            .for_each(|(plane, (o, src))| {
                let bc = b[plane % c];
                o.iter_mut().zip(src).for_each(|(o, v)| *o = v + bc);
            });
        out
    })?;
    Tensor::from_vec(out, y.dims(), y.device())
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
    /// The five kernels readied by [`Self::prepare`] (conv1w, conv1h, conv2h, conv2w, ConvL).
    prepared: Option<Arc<[Option<PreparedKernel>; 5]>>,
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
            prepared: None,
        })
    }

    /// Readies the convolution kernels once for inference ([`PreparedKernel`]): later forward
    /// passes skip the per-call kernel transforms (and, in bf16, the kernels' packing and
    /// widening). For weights that stay as they are now: a stage whose weights are trained
    /// must not be prepared (its gradients flow through the unprepared path regardless).
    /// Returns the bytes the readied kernels hold.
    pub fn prepare(&mut self) -> Result<usize> {
        let ready = |w: &Tensor| PreparedKernel::new(w, conv_precision(false, w));
        let kernels = [
            ready(&self.conv1w)?,
            ready(&self.conv1h)?,
            ready(&self.conv2h)?,
            ready(&self.conv2w)?,
            ready(&self.conv_l_weight)?,
        ];
        let bytes = kernels.iter().flatten().map(PreparedKernel::bytes).sum();
        self.prepared = Some(Arc::new(kernels));
        Ok(bytes)
    }

    /// The readied kernel `i` (conv1w, conv1h, conv2h, conv2w, ConvL), if any.
    fn kernel(&self, i: usize) -> Option<&PreparedKernel> {
        self.prepared.as_ref().and_then(|p| p[i].as_ref())
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
        let wf = conv_same(&x.transpose(1, 3)?, &self.conv1w, self.kernel(0))?; // (B, Wo, H, N)
        let wf = wf.transpose(1, 3)?.transpose(1, 2)?; // (B, H, N, Wo)
        let wf = conv_same(&wf, &self.conv1h, self.kernel(1))?.transpose(1, 2)?; // (B, N, Ho, Wo)

        // Height-first: H is the channel axis over (N, W), then W over (H', N).
        let hf = conv_same(&x.transpose(1, 2)?, &self.conv2h, self.kernel(2))?; // (B, Ho, N, W)
        let hf = hf.transpose(1, 2)?.transpose(1, 3)?; // (B, W, Ho, N)
        let hf = conv_same(&hf, &self.conv2w, self.kernel(3))?.transpose(1, 3)?; // (B, N, Ho, Wo)

        let y = mix_branches(&wf, &hf, &like(&self.bias, &x)?)?;
        let y = conv_same(&y, &self.conv_l_weight, self.kernel(4))?;
        add_channel_bias(&y, &like(&self.conv_l_bias, &y)?)
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

    /// [`HyperConvStage::prepare`] for every stage: for a decoder whose weights stay as they
    /// are (loaded for inference). Returns the bytes the readied kernels hold.
    pub fn prepare(&mut self) -> Result<usize> {
        self.stages.iter_mut().map(HyperConvStage::prepare).sum()
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn joining_the_branches_in_one_pass_matches_candle() {
        let dev = Device::Cpu;
        let wf = Tensor::randn(0f32, 1.0, (2, 6, 3, 5), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap(); // (2, 3, 6, 5), strided
        let hf = Tensor::randn(0f32, 2.0, (2, 5, 6, 3), &dev)
            .unwrap()
            .transpose(1, 3)
            .unwrap(); // (2, 3, 6, 5), strided
        let bias = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let want = ((&wf + hf.tanh().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
            / 3.0)
            .unwrap();
        let got = mix_branches(&wf, &hf, &bias).unwrap();
        assert!(crate::test_util::max_abs_diff(&got, &want) < 1e-6);
        assert!(mix_branches(&wf, &hf, &bias.narrow(0, 0, 5).unwrap()).is_err());
    }

    #[test]
    fn the_parallel_channel_bias_matches_candle() {
        let dev = Device::Cpu;
        let y = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 3, &dev).unwrap();
        let want = y
            .broadcast_add(&bias.reshape((1, 3, 1, 1)).unwrap())
            .unwrap();
        let got = add_channel_bias(&y, &bias).unwrap();
        assert_eq!(crate::test_util::max_abs_diff(&got, &want), 0.0);
        assert!(add_channel_bias(&y, &bias.narrow(0, 0, 2).unwrap()).is_err());
    }

    #[test]
    fn a_prepared_decoder_computes_what_the_unprepared_one_does() {
        // Channel counts of at least 48 on both sides of every convolution but the narrow
        // ones, so that Winograd's kernels are readied; one stage with a residual.
        let features = [[48, 56, 64], [48, 56, 64], [64, 50, 52]];
        for dtype in [DType::F32, DType::BF16] {
            let (vb, _) = super::super::init::SeededInit::builder(3, dtype, &Device::Cpu);
            let plain = HyperConvDecoder::new(&features, 3, vb).unwrap();
            let mut prepared = plain.clone();
            let bytes = prepared.prepare().unwrap();
            // Two stages of five 3x3 kernels, each 16/9 of its weights, f32 or bf16 packed;
            // bf16 ones only where the CPU has the instructions.
            let readies = dtype == DType::F32 || crate::matmul::bf16::available();
            assert_eq!(bytes > 0, readies, "{dtype:?}: {bytes} bytes readied");
            let x = Tensor::randn(0f32, 1.0, (1, 48, 56, 64), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let want = plain.forward(&x).unwrap().to_dtype(DType::F32).unwrap();
            let runs = super::super::conv::PREPARED_RUNS.with(|n| n.get());
            let got = prepared.forward(&x).unwrap().to_dtype(DType::F32).unwrap();
            let ran = super::super::conv::PREPARED_RUNS.with(|n| n.get()) - runs;
            let want_ran = if readies { 10 } else { 0 };
            assert_eq!(
                ran, want_ran,
                "{dtype:?}: readied kernels used by {ran} convolutions"
            );
            let err = crate::test_util::rel_err(&got, &want);
            assert!(err <= 1e-5, "{dtype:?}: relative error {err}");
        }
    }
}
