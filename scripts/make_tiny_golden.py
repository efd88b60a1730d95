#!/usr/bin/env python3
"""Makes the tiny random golden models of the decoder families beyond Qwen2 and Llama.

For each family: a complete model folder under tests/fixtures/golden/tiny-FAMILY (config.json,
model.safetensors in f16, values f16 holds exactly; the byte-level tokenizer of tiny-qwen2), two PEFT LoRA adapters on all seven
projections (adapter1: r=4, alpha=8; adapter2: r=8, alpha=8) and expected.safetensors in the
layout of tiny-qwen2's: per prompt the token ids, the full-prompt logits and 8 greedy tokens (no
EOS stop) of the base model, base+adapter1 and base+adapter2, computed by transformers + peft in
float32 on CPU. The Rust tests (tests/engine_lora.rs) compare the patched engine against them.
Phi-2 and Starcoder2 come in a smaller shape and with adapter1 only, to keep the repository
small; their MLPs have no gate, so their adapters target their own projection names (Phi-2:
dense, fc1, fc2; Starcoder2: c_fc, c_proj), and their tests load both the safetensors folder
and the GGUF copies (scripts/make_tiny_gguf.py). Mixtral, a family the
patch does not wrap (mixture-of-experts MLP), comes in the small shape with adapter1 on its
attention: its test checks the base rows and that a request with the adapter is refused.

Run once, with torch, transformers and peft installed; the outputs are committed, so neither CI
nor the tests need torch:

    python3 scripts/make_tiny_golden.py [FAMILY...]      # default: every family below
    python3 scripts/make_tiny_golden.py lm-eval-chat     # tests/e2e/lm_eval/chat_expected.json
"""
import copy
import json
import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig,
                          MistralConfig, MixtralConfig, Phi3Config, PhiConfig, Qwen3Config,
                          SmolLM3Config, Starcoder2Config)

GOLDEN = Path(__file__).resolve().parent.parent / "tests/fixtures/golden"
PROMPTS = ["The quick brown fox", "Hello, world! 123"]
GREEDY = 8
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# The families whose PEFT adapters target other projection names: Phi-3's fused ones, and
# Phi-2's and Starcoder2's own (their MLPs have no gate), and Mixtral's attention.
OWN_MODULES = {
    "phi3": FUSED_MODULES,
    "phi2": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
    # Its experts' MLPs are not LoRA targets here: an adapter on its attention.
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
# The shape every tiny model shares: small enough to commit, wide enough for GQA and rope.
SHAPE = dict(
    vocab_size=259, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    rms_norm_eps=1e-6, eos_token_id=258, bos_token_id=None, pad_token_id=None,
)
# Phi-2's, Starcoder2's and Mixtral's: half as wide, and one adapter, to keep the repository small.
SMALL = dict(
    vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=512, eos_token_id=258, bos_token_id=None,
    pad_token_id=None, tie_word_embeddings=False,
)
SMALL_FAMILIES = {"phi2", "starcoder2", "mixtral"}
FAMILIES = {
    "qwen3": lambda: Qwen3Config(**SHAPE, hidden_act="silu", tie_word_embeddings=False,
                                 rope_theta=10000.0, use_sliding_window=False,
                                 sliding_window=None, max_window_layers=2),
    "mistral": lambda: MistralConfig(**SHAPE, hidden_act="silu", tie_word_embeddings=False,
                                     rope_theta=10000.0, sliding_window=None),
    # Gemma: tied and scaled embeddings, (1 + w) norms, GeGLU.
    "gemma": lambda: GemmaConfig(**SHAPE, hidden_activation="gelu_pytorch_tanh",
                                 hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                                 rope_theta=10000.0, attention_bias=False),
    # SmolLM3: every second layer without rope (NoPE), as its interval of 4 does at scale.
    "smollm3": lambda: SmolLM3Config(**SHAPE, hidden_act="silu", tie_word_embeddings=True,
                                     rope_theta=10000.0, no_rope_layer_interval=2,
                                     use_sliding_window=False, sliding_window=None),
    # Phi-3: fused qkv_proj and gate_up_proj, which its PEFT adapters target as such.
    "phi3": lambda: Phi3Config(**SHAPE, hidden_act="silu", tie_word_embeddings=False,
                               rope_theta=10000.0, original_max_position_embeddings=512,
                               sliding_window=None, rope_scaling=None),
    # Gemma 2: tied embeddings, scaled embeddings, (1 + w) norms, soft-capped attention and
    # logits, alternating sliding-window layers (the window is wider than the prompts).
    "gemma2": lambda: Gemma2Config(**SHAPE, hidden_activation="gelu_pytorch_tanh",
                                   hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                                   rope_theta=10000.0, sliding_window=64,
                                   query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                                   final_logit_softcapping=30.0, attention_bias=False),
    # Gemma 3, text-only (Gemma3ForCausalLM, as gemma-3-1b-it): q/k norms, a sliding layer then
    # a global one, each with its own rope base (1e4 local, 1e6 global), no soft-capping.
    "gemma3": lambda: Gemma3TextConfig(**SHAPE, hidden_activation="gelu_pytorch_tanh",
                                       tie_word_embeddings=True, sliding_window=64,
                                       query_pre_attn_scalar=16, attention_bias=False,
                                       layer_types=["sliding_attention", "full_attention"],
                                       rope_parameters={
                                           "sliding_attention": {"rope_type": "default",
                                                                 "rope_theta": 10000.0},
                                           "full_attention": {"rope_type": "default",
                                                              "rope_theta": 1000000.0}}),
    # Phi-2: parallel attention and MLP after one LayerNorm, biases everywhere, rotary
    # embeddings on half of each head, GELU (tanh) between fc1 and fc2, an lm_head bias.
    # mistral.rs's GGUF Phi-2 reads q, k and v as one fused block of equal parts, so no GQA.
    "phi2": lambda: PhiConfig(**SMALL, num_key_value_heads=4, hidden_act="gelu_new",
                              layer_norm_eps=1e-5, partial_rotary_factor=0.5,
                              rope_theta=10000.0, qk_layernorm=False),
    # Starcoder2: LayerNorms with biases, biased projections, GQA, GELU (tanh) MLP c_fc/c_proj.
    "starcoder2": lambda: Starcoder2Config(**SMALL, num_key_value_heads=2,
                                           hidden_act="gelu_pytorch_tanh", norm_epsilon=1e-5,
                                           use_bias=True, rope_theta=10000.0,
                                           sliding_window=None),
    # Mixtral: a mixture-of-experts MLP (4 experts, 2 per token), which the patch does not wrap.
    "mixtral": lambda: MixtralConfig(**SMALL, num_key_value_heads=2, hidden_act="silu",
                                     rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=None,
                                     num_local_experts=4, num_experts_per_tok=2),
}
# Fields mistral.rs 0.8.1 reads at the top level, which transformers 5 nests or leaves out.
FLAT = {"rope_theta": 10000.0}
# Phi-2's: also the share of each head that gets rotary embeddings.
FLAT_PHI2 = {**FLAT, "partial_rotary_factor": 0.5}
# Gemma 3's: the global rope base, the local one, and the layer pattern (every 2nd is global).
FLAT_GEMMA3 = {"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
               "sliding_window_pattern": 2}


def spread(model, gemma_norms):
    """Random weights with spread-out values, so that a transposed matrix or a wrong axis shows
    up as a large error instead of hiding under tiny numbers."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and gemma_norms and "embed_tokens" in name:
                # Gemma scales its embeddings by sqrt(hidden): undo it, or one token wins always.
                p.normal_(0.0, 0.08 / SHAPE["hidden_size"] ** 0.5 * 2)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name and not name.endswith(".bias"):
                # Gemma's norms scale by (1 + w): centre them on 0 there, on 1 elsewhere.
                p.normal_(0.0 if gemma_norms else 1.0, 0.1)
            else:
                p.normal_(0.0, 0.08)


def greedy(model, ids):
    out = []
    x = torch.tensor([ids])
    for _ in range(GREEDY):
        t = int(model(input_ids=x).logits[0, -1].argmax())
        out.append(t)
        x = torch.cat([x, torch.tensor([[t]])], dim=1)
    return out


def make(family):
    torch.manual_seed({"qwen3": 3, "mistral": 7, "gemma2": 11, "gemma": 13, "smollm3": 17,
                       "phi3": 19, "gemma3": 23, "phi2": 29, "starcoder2": 31,
                       "mixtral": 37}[family])
    cfg = FAMILIES[family]()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    spread(model, family.startswith("gemma"))
    # Weights that f16 holds exactly, stored as f16 (half the bytes in the repository); the
    # expectations are computed from them in f32, as the tests load them.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model.eval()
    out = GOLDEN / f"tiny-{family}"
    if out.exists():
        shutil.rmtree(out)
    copy.deepcopy(model).half().save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    flat = FLAT_GEMMA3 if family == "gemma3" else FLAT_PHI2 if family == "phi2" else FLAT
    config.update({k: v for k, v in flat.items() if k not in config})
    if family == "gemma2":
        config.setdefault("hidden_act", "gelu_pytorch_tanh")
    if family == "gemma":
        # mistral.rs's Gemma refuses a config that sets both activation names.
        config.pop("hidden_act", None)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        shutil.copy(GOLDEN / "tiny-qwen2" / f, out / f)

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = [tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    expected = {}
    variants = {"base": model}
    adapters = [("adapter1", 4, 1), ("adapter2", 8, 2)]
    for name, r, seed in adapters[:1] if family in SMALL_FAMILIES else adapters:
        torch.manual_seed(seed)
        targets = OWN_MODULES.get(family, MODULES)
        lora = LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                          lora_dropout=0.0, task_type="CAUSAL_LM")
        peft_model = get_peft_model(copy.deepcopy(model), lora)
        peft_model.eval()
        peft_model.save_pretrained(out / name)
        (out / name / "README.md").unlink(missing_ok=True)  # peft's empty model card
        variants[name] = peft_model
    with torch.no_grad():
        for seq, prompt_ids in enumerate(ids):
            expected[f"input.seq{seq}.ids"] = torch.tensor(prompt_ids, dtype=torch.float32)
            for name, m in variants.items():
                logits = m(input_ids=torch.tensor([prompt_ids])).logits[0]
                expected[f"{name}.seq{seq}.logits"] = logits.float().contiguous()
                expected[f"{name}.seq{seq}.greedy"] = torch.tensor(greedy(m, prompt_ids),
                                                                   dtype=torch.float32)
    meta = {"prompts": PROMPTS, "family": family,
            "note": "logits: (len, vocab) for the whole prompt; greedy: 8 tokens, no eos stop; "
                    "adapterN = base + PEFT adapterN (scale alpha/r); transformers "
                    f"{__import__('transformers').__version__}, peft "
                    f"{__import__('peft').__version__}, float32, CPU, eager attention"}
    save_file(expected, out / "expected.safetensors", metadata={"json": json.dumps(meta)})
    print(f"{out}: base greedy {expected['base.seq0.greedy'].int().tolist()}")


def lm_eval_chat():
    """The expectation of the lm-evaluation-harness chat test: transformers+peft's greedy reply
    (8 tokens, stopping at EOS) of tiny-qwen2 with adapter1 to each context of
    tests/e2e/lm_eval/continuation.jsonl sent as one user message through the chat template."""
    from peft import PeftModel
    from transformers import AutoTokenizer
    folder = GOLDEN / "tiny-qwen2"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, folder / "adapter1").eval()
    tasks = GOLDEN.parent.parent / "e2e/lm_eval"
    replies = {}
    for line in (tasks / "continuation.jsonl").read_text().splitlines():
        context = json.loads(line)["context"]
        text = tok.apply_chat_template([{"role": "user", "content": context}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            out = [t for t in greedy(model, ids)]
        eos = SHAPE["eos_token_id"]
        out = out[:out.index(eos)] if eos in out else out
        replies[context] = tok.decode(out)
    (tasks / "chat_expected.json").write_text(json.dumps(replies, indent=1) + "\n")
    print(replies)


if __name__ == "__main__":
    if sys.argv[1:] == ["lm-eval-chat"]:
        lm_eval_chat()
        sys.exit()
    for family in sys.argv[1:] or FAMILIES:
        if family not in FAMILIES:
            sys.exit(f"unknown family '{family}' ({', '.join(FAMILIES)}, or lm-eval-chat)")
        make(family)
