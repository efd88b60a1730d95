#!/usr/bin/env python3
"""Checks that an adapter exported by `dnd generate` loads in Hugging Face PEFT and applies
exactly the weights we wrote: PEFT's logits on the base model must equal the logits of the base
model with `W + alpha/r * B A` merged by hand from our safetensors.

Needs torch, transformers and peft (pip). Usage:
    scripts/check_peft.py BASE_MODEL_DIR ADAPTER_DIR
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
import json


def main():
    base_dir, adapter_dir = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (1, 12))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits

    cfg = json.load(open(f"{adapter_dir}/adapter_config.json"))
    scale = cfg["lora_alpha"] / cfg["r"]
    weights = load_file(f"{adapter_dir}/adapter_model.safetensors")
    manual = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    params = dict(manual.named_parameters())
    merged = 0
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        with torch.no_grad():
            params[target] += scale * (b @ a)
        merged += 1
    with torch.no_grad():
        manual_logits = manual(ids).logits

    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        peft_logits = peft_model(ids).logits
    shift = (manual_logits - base_logits).abs().max().item()
    err = (peft_logits - manual_logits).abs().max().item()
    print(f"{merged} LoRA pairs; adapter moves logits by up to {shift:.4g}; "
          f"PEFT vs hand-merged max |diff| {err:.3g}")
    assert merged > 0 and shift > 1e-3, "adapter had no effect"
    assert err <= 1e-4 * max(1.0, manual_logits.abs().max().item()), "PEFT applied other weights"
    print("OK: PEFT loads the adapter and applies exactly its weights")


if __name__ == "__main__":
    main()
