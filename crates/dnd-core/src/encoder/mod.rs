//! The condition encoder: prompts to the `(N, L, hidden)` tensor that the decoder reads.
//!
//! A frozen Sentence-BERT (all-MiniLM-L6-v2 by default) tokenizes each prompt padded and
//! truncated to exactly `L` tokens and returns `last_hidden_state` for every position, padding
//! included (no pooling). For `L` above the model's 512 positions, the padded sequence is cut into
//! 512-token pieces encoded independently (positions restart at 0, no extra special tokens).

pub mod bert;
mod gelu;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::{read_json, DndError, Result};
use bert::{BertConfig, BertModel};

/// Prompt rows encoded per forward pass: bounds the attention scores' memory.
const ROWS_PER_PASS: usize = 16;

/// A Sentence-BERT folder loaded for condition extraction.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    model: BertModel,
    hidden: usize,
    pad_id: u32,
    device: Device,
    /// Dtype of the returned condition.
    dtype: DType,
    dir: PathBuf,
}

impl TextEncoder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from a Sentence-BERT folder
    /// (tensor names with or without the `bert.` prefix). Conditions come out in `dtype`; on the
    /// CPU, where candle has no bf16 matrix product, bf16 keeps BERT's weights and activations
    /// in f32 (it is small) and runs its q, k, v and feed-forward projections on the CPU's bf16
    /// dot products where it has them ([`crate::matmul::bf16`]).
    pub fn load(dir: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg: BertConfig = read_json(&dir.join("config.json"))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| DndError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let pad_id = tokenizer
            .token_to_id("[PAD]")
            .or_else(|| tokenizer.get_padding().map(|p| p.pad_id))
            .unwrap_or(0);
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(DndError::io(
                &weights,
                std::io::Error::new(std::io::ErrorKind::NotFound, "encoder weights not found"),
            ));
        }
        let compute = if device.is_cpu() && dtype == DType::BF16 {
            DType::F32
        } else {
            dtype
        };
        // SAFETY: the file is only read, and not expected to change while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], compute, device)? };
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let mut model = BertModel::load(&cfg, vb)?;
        if device.is_cpu() && dtype == DType::BF16 {
            model = model.with_precision(crate::matmul::Precision::Bf16)?;
        }
        Ok(Self {
            tokenizer,
            model,
            hidden: cfg.hidden_size,
            pad_id,
            device: device.clone(),
            dtype,
            dir: dir.to_path_buf(),
        })
    }

    /// Width of the condition's last axis (384 for MiniLM).
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// The folder the encoder was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Token ids and attention masks, each `prompts.len() x max_length`, row-major: special
    /// tokens added, truncated and right-padded to exactly `max_length`.
    pub fn tokenize(&self, prompts: &[&str], max_length: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let mut tok = self.tokenizer.clone();
        tok.with_truncation(Some(TruncationParams {
            max_length,
            ..Default::default()
        }))
        .map_err(|e| DndError::Tokenizer(e.to_string()))?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: "[PAD]".into(),
            pad_to_multiple_of: None,
        }));
        let enc = tok
            .encode_batch(prompts.to_vec(), true)
            .map_err(|e| DndError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(prompts.len() * max_length);
        let mut mask = Vec::with_capacity(prompts.len() * max_length);
        for e in &enc {
            debug_assert_eq!(e.get_ids().len(), max_length);
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
        }
        Ok((ids, mask))
    }

    /// Encodes prompts into `(prompts.len(), max_length, hidden)`.
    pub fn encode(&self, prompts: &[&str], max_length: usize) -> Result<Tensor> {
        let (ids, mask) = self.tokenize(prompts, max_length)?;
        self.encode_ids(&ids, &mask, prompts.len(), max_length)
    }

    /// Encodes already tokenized rows (see [`Self::tokenize`]).
    pub fn encode_ids(&self, ids: &[u32], mask: &[u32], n: usize, len: usize) -> Result<Tensor> {
        let piece = self.model.max_positions();
        // Long rows are cut into consecutive pieces of `piece` tokens (the reference requires
        // L to be a multiple of it).
        let (rows, row_len) = if len > piece {
            if !len.is_multiple_of(piece) {
                return Err(DndError::InvalidInput(format!(
                    "prompt length {len} exceeds the encoder's {piece} positions and is not a multiple of it"
                )));
            }
            (n * (len / piece), piece)
        } else {
            (n, len)
        };
        let valid = mask
            .chunks(row_len)
            .map(|row| {
                let n = row.iter().take_while(|&&m| m == 1).count();
                if row[n..].iter().any(|&m| m != 0) {
                    return Err(DndError::InvalidInput(
                        "attention mask is not right-padded (ones, then zeros)".into(),
                    ));
                }
                Ok(n)
            })
            .collect::<Result<Vec<usize>>>()?;
        let ids = Tensor::from_slice(ids, (rows, row_len), &self.device)?;
        let mut outs = Vec::with_capacity(rows.div_ceil(ROWS_PER_PASS));
        for start in (0..rows).step_by(ROWS_PER_PASS) {
            let take = ROWS_PER_PASS.min(rows - start);
            outs.push(
                self.model
                    .forward(&ids.narrow(0, start, take)?, &valid[start..start + take])?,
            );
        }
        Ok(Tensor::cat(&outs, 0)?
            .reshape((n, len, self.hidden))?
            .to_dtype(self.dtype)?)
    }
}
