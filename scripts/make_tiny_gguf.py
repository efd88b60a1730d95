#!/usr/bin/env python3
"""Writes GGUF copies of the tiny golden Qwen3, Phi-3, Phi-2 and Starcoder2 models, for
mistral.rs's GGUF loaders.

No offline GGUF of either family exists here, and mistral.rs 0.8.1 loads them through their own
model files (quantized_qwen3.rs, quantized_phi3.rs), so per-sequence LoRA there needs its own
test. Each tiny model folder made by scripts/make_tiny_golden.py gets `model-f32.gguf`: the same
weights (f16 values, stored as f32 so that the engine computes in f32 like the golden run), the
tensor names and metadata keys of llama.cpp's conversion for that architecture (Phi-3 keeps its
fused qkv and gate_up projections; Phi-2's q, k and v, with their biases, are fused into one
attn_qkv, the layout of llama.cpp's legacy Wqkv conversions and the only one mistral.rs 0.8.1's
Phi-2 loader read; no family permutes q/k). Phi-2 also gets `model-f32-split.gguf`, the layout
of llama.cpp's current conversions: attn_q/k/v apart, and the LayerNorm epsilon under
`attention.layer_norm_epsilon` only (patch 0010 makes mistral.rs read it). The tokenizer stays in the
folder's tokenizer.json, which the tests name as the loader's tokenizer model id, so the GGUF carries no tokenizer
metadata. The goldens (expected.safetensors) are the safetensors model's: same weights, same
outputs. Run once; the files are committed, so neither CI nor the tests need Python:

    pip install gguf numpy safetensors
    python3 scripts/make_tiny_gguf.py [FAMILY...]     # default: every family below
"""
import json
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

GOLDEN = Path(__file__).resolve().parent.parent / "tests/fixtures/golden"

# Per-layer tensors: (Hugging Face name under model.layers.N., GGUF name under blk.N.).
COMMON = [
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
]
LAYER_TENSORS = {
    "qwen3": COMMON + [
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.q_norm.weight", "attn_q_norm.weight"),
        ("self_attn.k_norm.weight", "attn_k_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
    ],
    # llama.cpp keeps Phi-3's fused projections: attn_qkv rows are q, k, v; ffn_up rows are
    # gate then up, as in the Hugging Face checkpoint.
    "phi3": COMMON + [
        ("self_attn.qkv_proj.weight", "attn_qkv.weight"),
        ("mlp.gate_up_proj.weight", "ffn_up.weight"),
    ],
    # Phi-2's q/k/v go in fused (below); one LayerNorm feeds attention and MLP in parallel.
    "phi2": [
        (f"{hf}.{p}", f"{name}.{p}")
        for hf, name in [("self_attn.dense", "attn_output"), ("mlp.fc1", "ffn_up"),
                         ("mlp.fc2", "ffn_down"), ("input_layernorm", "attn_norm")]
        for p in ["weight", "bias"]
    ],
    "starcoder2": [
        (f"{hf}.{p}", f"{name}.{p}")
        for hf, name in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                         ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                         ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down"),
                         ("input_layernorm", "attn_norm"),
                         ("post_attention_layernorm", "ffn_norm")]
        for p in ["weight", "bias"]
    ],
}
# The final norm and the output head, per family (Hugging Face name, GGUF name).
FINAL = {
    "qwen3": [("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")],
    "phi3": [("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")],
    "phi2": [("model.final_layernorm.weight", "output_norm.weight"),
             ("model.final_layernorm.bias", "output_norm.bias"),
             ("lm_head.weight", "output.weight"), ("lm_head.bias", "output.bias")],
    "starcoder2": [("model.norm.weight", "output_norm.weight"),
                   ("model.norm.bias", "output_norm.bias"), ("lm_head.weight", "output.weight")],
}


def convert(family: str, split: bool = False) -> Path:
    folder = GOLDEN / f"tiny-{family}"
    cfg = json.loads((folder / "config.json").read_text())
    weights = {k: v.astype(np.float32) for k, v in load_file(folder / "model.safetensors").items()}
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    out = folder / ("model-f32-split.gguf" if split else "model-f32.gguf")
    w = gguf.GGUFWriter(str(out), family)
    w.add_name(f"tiny-{family}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    if family in ("phi2", "starcoder2"):
        eps = cfg.get("layer_norm_eps") or cfg["norm_epsilon"]
        w.add_layer_norm_eps(eps)
        if not split:
            # mistral.rs 0.8.1's Phi-2 reads its LayerNorm epsilon under the RMS key.
            w.add_layer_norm_rms_eps(eps)
    else:
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(theta))
    rotary = cfg.get("partial_rotary_factor") or cfg.get("rope_parameters", {}).get(
        "partial_rotary_factor", 1.0)
    w.add_rope_dimension_count(int(head_dim * rotary))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    used = set()

    def put(hf: str, name: str):
        w.add_tensor(name, weights[hf])
        used.add(hf)

    put("model.embed_tokens.weight", "token_embd.weight")
    for i in range(cfg["num_hidden_layers"]):
        for hf, name in LAYER_TENSORS[family]:
            put(f"model.layers.{i}.{hf}", f"blk.{i}.{name}")
        if family == "phi2" and split:
            for m in "qkv":
                for p in ["weight", "bias"]:
                    put(f"model.layers.{i}.self_attn.{m}_proj.{p}", f"blk.{i}.attn_{m}.{p}")
        elif family == "phi2":
            for p in ["weight", "bias"]:
                parts = [f"model.layers.{i}.self_attn.{m}_proj.{p}" for m in "qkv"]
                w.add_tensor(f"blk.{i}.attn_qkv.{p}",
                             np.concatenate([weights[hf] for hf in parts], axis=0))
                used.update(parts)
    for hf, name in FINAL[family]:
        put(hf, name)
    left = set(weights) - used
    if left:
        raise SystemExit(f"tiny-{family}: tensors not converted: {sorted(left)}")

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


if __name__ == "__main__":
    for family in sys.argv[1:] or LAYER_TENSORS:
        for split in [False, True] if family == "phi2" else [False]:
            path = convert(family, split)
            print(f"{path.relative_to(GOLDEN.parent.parent.parent)}: {path.stat().st_size} bytes")
