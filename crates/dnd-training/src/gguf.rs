//! Loading a llama / qwen2 GGUF file for training and evaluation: weights dequantized to f32
//! under the Hugging Face names (llama's q/k rows un-permuted back from llama.cpp's rotary
//! layout), the architecture from the metadata, and the BPE tokenizer from
//! `tokenizer.ggml.*`, pre-tokenized like mistral.rs does for GGUF models (so training,
//! evaluation and serving see the same token ids).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::model::{CausalLm, LmConfig};
use dnd_core::error::{DndError, Result};

/// The same split as mistral.rs's GGUF BPE tokenizers.
const SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn bad(path: &Path, m: impl std::fmt::Display) -> DndError {
    DndError::Incompatible(format!("{}: {m}", path.display()))
}

/// A GGUF model ready for training: the model, its tokenizer and its end-of-sequence id.
pub fn load_gguf(path: impl AsRef<Path>, device: &Device) -> Result<(CausalLm, Tokenizer, u32)> {
    let path = path.as_ref();
    let mut f = std::fs::File::open(path).map_err(|e| DndError::io(path, e))?;
    let content = Content::read(&mut f).map_err(|e| bad(path, e))?;
    let md = &content.metadata;
    let get = |k: &str| {
        md.get(k)
            .ok_or_else(|| bad(path, format!("no `{k}` in the metadata")))
    };
    let arch = get("general.architecture")?
        .to_string()
        .map_err(|e| bad(path, e))?
        .clone();
    if arch != "llama" && arch != "qwen2" {
        return Err(bad(
            path,
            format!("architecture {arch}; training supports llama and qwen2"),
        ));
    }
    let num = |k: &str| -> Result<usize> {
        let v = get(&format!("{arch}.{k}"))?;
        v.to_u64()
            .map(|x| x as usize)
            .or_else(|_| v.to_u32().map(|x| x as usize))
            .map_err(|e| bad(path, e))
    };
    let float = |k: &str| -> Option<f64> {
        md.get(&format!("{arch}.{k}"))
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
    };
    let tokens: Vec<String> = match get("tokenizer.ggml.tokens")? {
        Value::Array(v) => v
            .iter()
            .filter_map(|t| t.to_string().ok().cloned())
            .collect(),
        _ => return Err(bad(path, "tokenizer.ggml.tokens is not a list")),
    };
    let heads = num("attention.head_count")?;
    let kv_heads = num("attention.head_count_kv")?;
    let hidden = num("embedding_length")?;
    let cfg = LmConfig {
        model_type: arch.clone(),
        hidden_size: hidden,
        intermediate_size: num("feed_forward_length")?,
        num_hidden_layers: num("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: None,
        vocab_size: tokens.len(),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        rope_theta: float("rope.freq_base"),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        eos_token_id: None,
    };
    let eos = get("tokenizer.ggml.eos_token_id")?
        .to_u32()
        .map_err(|e| bad(path, e))?;

    // Weights under Hugging Face names.
    let mut map: HashMap<String, Tensor> = HashMap::new();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let q = content
            .tensor(&mut f, &name, device)
            .map_err(|e| bad(path, e))?;
        let mut t = q.dequantize(device)?.to_dtype(DType::F32)?;
        let hf = match name.as_str() {
            "token_embd.weight" => "model.embed_tokens.weight".to_string(),
            "output_norm.weight" => "model.norm.weight".to_string(),
            "output.weight" => "lm_head.weight".to_string(),
            other => {
                let Some(rest) = other.strip_prefix("blk.") else {
                    continue;
                };
                let (layer, what) = rest
                    .split_once('.')
                    .ok_or_else(|| bad(path, format!("tensor {other}")))?;
                let hf = match what {
                    "attn_norm.weight" => "input_layernorm.weight",
                    "ffn_norm.weight" => "post_attention_layernorm.weight",
                    "attn_q.weight" => "self_attn.q_proj.weight",
                    "attn_k.weight" => "self_attn.k_proj.weight",
                    "attn_v.weight" => "self_attn.v_proj.weight",
                    "attn_output.weight" => "self_attn.o_proj.weight",
                    "attn_q.bias" => "self_attn.q_proj.bias",
                    "attn_k.bias" => "self_attn.k_proj.bias",
                    "attn_v.bias" => "self_attn.v_proj.bias",
                    "ffn_gate.weight" => "mlp.gate_proj.weight",
                    "ffn_up.weight" => "mlp.up_proj.weight",
                    "ffn_down.weight" => "mlp.down_proj.weight",
                    _ => continue,
                };
                // llama.cpp stores llama's q/k rows interleaved for its rotary kernel.
                if arch == "llama" && (what == "attn_q.weight" || what == "attn_k.weight") {
                    let n = if what == "attn_q.weight" {
                        heads
                    } else {
                        kv_heads
                    };
                    t = unpermute(&t, n)?;
                }
                format!("model.layers.{layer}.{hf}")
            }
        };
        map.insert(hf, t);
    }
    let vb = VarBuilder::from_tensors(map, DType::F32, device);
    let model = CausalLm::from_parts(cfg, vb, device)?;
    let tok = tokenizer(path, md, tokens, eos)?;
    Ok((model, tok, eos))
}

/// Inverse of llama.cpp's `permute`: rows `(n, hd/2, 2)` back to `(n, 2, hd/2)`.
fn unpermute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_heads;
    Ok(w.reshape((n_heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

fn tokenizer(
    path: &Path,
    md: &HashMap<String, Value>,
    tokens: Vec<String>,
    eos: u32,
) -> Result<Tokenizer> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(bad(
            path,
            format!("tokenizer model {model:?}; only BPE (gpt2) is supported"),
        ));
    }
    let merges: Vec<(String, String)> = match md.get("tokenizer.ggml.merges") {
        Some(Value::Array(v)) => v
            .iter()
            .filter_map(|m| m.to_string().ok())
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect(),
        _ => return Err(bad(path, "no tokenizer.ggml.merges")),
    };
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(Value::Array(v)) => v.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| bad(path, e))?;
    let mut tok = Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| bad(path, e))?;
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ])));
    tok.with_decoder(Some(ByteLevel::new(false, false, false)));
    // Control tokens (type 3) and eos are special: never split, skipped when decoding.
    let special: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i) == Some(&3) || *i as u32 == eos)
        .map(|(_, t)| AddedToken::from(t.clone(), true))
        .collect();
    tok.add_special_tokens(&special);
    Ok(tok)
}
