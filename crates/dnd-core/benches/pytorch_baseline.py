#!/usr/bin/env python3
"""PyTorch baseline for `cargo bench --manifest-path crates/Cargo.toml --bench generate`: the same DnD computation on the same
shapes (MiniLM condition encoder via transformers, hyper-convolutional decoder via torch.nn),
timed the same way. Prints `ROW|encode_s|decode_s`.

The decoder here follows the reference architecture's operations one for one (LayerNorm over
the last two axes, the width-first and height-first "same" convolutions with their axis swaps,
bias, tanh, ConvL, residual on equal shapes); `--check` runs it on the golden fixture first.

    crates/dnd-core/benches/pytorch_baseline.py --config smollm2-135m-small --threads 2 [--check]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

# The repository root (this file is crates/dnd-core/benches/pytorch_baseline.py).
ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))


class Stage(nn.Module):
    def __init__(self, i, o, k):
        super().__init__()
        (ni, hi, wi), (no, ho, wo) = i, o
        self.norm = nn.LayerNorm([hi, wi])
        self.conv1w = nn.Conv2d(wi, wo, k, padding="same", bias=False)
        self.conv1h = nn.Conv2d(hi, ho, k, padding="same", bias=False)
        self.conv2h = nn.Conv2d(hi, ho, k, padding="same", bias=False)
        self.conv2w = nn.Conv2d(wi, wo, k, padding="same", bias=False)
        self.bias = nn.Parameter(torch.zeros(ho, wo))
        self.conv_l = nn.Conv2d(ni, no, k, padding="same")

    def forward(self, x):
        x = self.norm(x)
        wf = self.conv1w(x.transpose(1, 3)).transpose(1, 3).transpose(1, 2)
        wf = self.conv1h(wf).transpose(1, 2)
        hf = self.conv2h(x.transpose(1, 2)).transpose(1, 2).transpose(1, 3)
        hf = torch.tanh(self.conv2w(hf).transpose(1, 3))
        return self.conv_l((wf + hf + self.bias) / 3)


class Decoder(nn.Module):
    def __init__(self, stages, k):
        super().__init__()
        self.stages = nn.ModuleList(Stage(a, b, k) for a, b in zip(stages[:-1], stages[1:]))

    def forward(self, x):
        for s in self.stages:
            y = s(x)
            x = x + y if y.shape == x.shape else y
        return x


def load_reference_weights(dec, tensors, prefix):
    sd = {}
    for i in range(len(dec.stages)):
        p = f"{prefix}decoder.module_list.{i}."
        for ours, theirs in [
            ("norm.weight", "linear1.norm.weight"), ("norm.bias", "linear1.norm.bias"),
            ("conv1w.weight", "linear1.conv1w.weight"), ("conv1h.weight", "linear1.conv1h.weight"),
            ("conv2h.weight", "linear1.conv2h.weight"), ("conv2w.weight", "linear1.conv2w.weight"),
            ("bias", "linear1.bias"), ("conv_l.weight", "linear2.weight"), ("conv_l.bias", "linear2.bias"),
        ]:
            sd[f"stages.{i}.{ours}"] = tensors[p + theirs]
    dec.load_state_dict(sd)


def check():
    from safetensors.torch import load_file
    from safetensors import safe_open
    for name in ["decoder_small_k3", "decoder_residual_k5"]:
        path = f"{ROOT}/tests/fixtures/golden/{name}.safetensors"
        meta = json.loads(safe_open(path, "pt").metadata()["json"])
        t = load_file(path)
        dec = Decoder([tuple(f) for f in meta["features"]], meta["kernel_size"])
        load_reference_weights(dec, t, "weights.")
        with torch.no_grad():
            out = dec(t["input"])
        err = (out - t["output"]).abs().max() / t["output"].abs().max()
        assert err < 1e-4, f"{name}: {err}"
    print("baseline decoder matches the golden fixtures", file=sys.stderr)


def preset(name):
    # The presets live in Rust; ask the CLI for the stage list so both sides use one source.
    out = subprocess.run(
        ["cargo", "run", "-q", "--release", "--manifest-path", "crates/Cargo.toml", "--bin", "dnd",
         "--", "preset", name],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def prompts(n):
    return [
        f"Question {i}: which of these best explains why a metal spoon left in hot soup "
        f"becomes warm after a few minutes?\nA: conduction of heat\nB: radiation from the "
        f"bowl\nC: convection in the air\nD: chemical reaction number {i}"
        for i in range(n)
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--encoder", default=f"{ROOT}/.assets/all-MiniLM-L6-v2")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.check:
        check()
    cfg = preset(a.config)
    from transformers import AutoTokenizer, BertModel
    tok = AutoTokenizer.from_pretrained(a.encoder)
    bert = BertModel.from_pretrained(a.encoder).eval()
    dec = Decoder([tuple(s) for s in cfg["stages"]], cfg["kernel_size"]).eval()
    if a.dtype == "bf16":
        # oneDNN runs bf16 products on AVX512-BF16 / AMX where the CPU has them.
        bert, dec = bert.to(torch.bfloat16), dec.to(torch.bfloat16)
    n, L = cfg["num_prompts"], cfg["max_length"]
    reps = a.reps or (1 if n >= 128 else 3)
    runs = reps + 1 if reps > 1 else reps
    te, td = [], []
    p = prompts(n)
    with torch.inference_mode():
        for i in range(runs):
            t0 = time.perf_counter()
            enc = tok(p, max_length=L, padding="max_length", truncation=True, return_tensors="pt")
            cond = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            cond = cond.view(1, n, L, -1)
            t1 = time.perf_counter()
            out = dec(cond)
            t2 = time.perf_counter()
            assert out.shape[1:] == tuple(cfg["stages"][-1])
            if runs == reps or i > 0:
                te.append(t1 - t0)
                td.append(t2 - t1)
    print(f"ROW|{statistics.median(te):.4f}|{statistics.median(td):.4f}")


if __name__ == "__main__":
    main()
