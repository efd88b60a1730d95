#!/usr/bin/env python3
"""PyTorch + PEFT baseline for `cargo bench --manifest-path crates/Cargo.toml --bench collect`: the same LoRA training steps as
`dnd collect` (the batches of token ids the bench wrote, the same initial LoRA factors as a
PEFT folder, answer-token loss, AdamW with the same hyper-parameters), the way a PEFT user
writes it: transformers loads the GGUF (dequantized to f32), the batch is right-padded with an
attention mask, labels are -100 outside the answer. Prints one JSON line:
{"load_s", "step_s": [...], "losses": [...], "peak_rss_mib", "tokens": [...]}.

    collect_baseline.py --gguf FILE --work DIR --lr 1e-3 --weight-decay 0 --threads 2
"""
import argparse
import json
import os
import resource
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--work", required=True, help="folder with batches.json and init/")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--weight-decay", type=float, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(args.gguf)),
        gguf_file=os.path.basename(args.gguf),
        dtype=torch.float32,
    )
    model = PeftModel.from_pretrained(model, os.path.join(args.work, "init"), is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    load_s = time.perf_counter() - t0

    with open(os.path.join(args.work, "batches.json")) as f:
        batches = json.load(f)
    step_s, losses, tokens = [], [], []
    for batch in batches:
        t = max(len(s["ids"]) for s in batch)
        ids = torch.zeros((len(batch), t), dtype=torch.long)
        mask = torch.zeros((len(batch), t), dtype=torch.long)
        labels = torch.full((len(batch), t), -100, dtype=torch.long)
        for i, s in enumerate(batch):
            n = len(s["ids"])
            ids[i, :n] = torch.tensor(s["ids"])
            mask[i, :n] = 1
            labels[i, s["answer_from"]:n] = ids[i, s["answer_from"]:n]
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
        tokens.append(sum(len(s["ids"]) for s in batch))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"load_s": load_s, "step_s": step_s, "losses": losses,
                      "peak_rss_mib": peak, "tokens": tokens}))


if __name__ == "__main__":
    main()
