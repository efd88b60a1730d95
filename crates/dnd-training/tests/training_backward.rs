//! The explicit backward pass (`training::backward`, what `dnd collect` trains with) against
//! candle's autograd through the plain training forward (itself checked against the
//! transformers+PEFT logits in `training_golden.rs`): the same loss and the same gradient for
//! every LoRA factor, on both golden tiny models (Qwen2 with biases and grouped-query heads,
//! Llama), for a batch of sequences of different lengths whose padded positions the packed
//! pass never computes.

use dnd_core::test_util as common;

use std::collections::BTreeMap;

use candle_core::{Device, Var};
use common::{golden_path, max_abs_diff, token_ids, Golden};
use dnd_core::adapters::{LoraAdapter, LoraPair, Module};
use dnd_training::backward::lora_gradients;
use dnd_training::collect::{answer_loss, pad_batch};
use dnd_training::data::Sequence;
use dnd_training::CausalLm;

/// Three sequences cut from the fixture prompts: different lengths, answers of 1 to 5 tokens.
fn batch(golden: &Golden) -> Vec<Sequence> {
    let a = token_ids(golden.get("input.seq0.ids"));
    let b = token_ids(golden.get("input.seq1.ids"));
    let c: Vec<u32> = b.iter().rev().copied().collect();
    vec![
        Sequence {
            answer_from: a.len() - 3,
            ids: a.clone(),
        },
        Sequence {
            answer_from: b.len() - 5,
            ids: b,
        },
        Sequence {
            answer_from: 6,
            ids: c[..7].to_vec(),
        },
    ]
}

fn check(name: &str, modules: &[Module]) {
    let dev = Device::Cpu;
    let model = CausalLm::load(golden_path(name), &dev).unwrap();
    let golden = Golden::load(&format!("{name}/expected.safetensors"));
    // The fixture's trained adapter (A and B both non-zero, so every factor has a gradient),
    // restricted to `modules`, as variables for the autograd side.
    let full = LoraAdapter::load_peft(golden_path(name).join("adapter1"), &dev).unwrap();
    let mut vars = BTreeMap::new();
    let mut pairs = BTreeMap::new();
    for (t, p) in full.pairs() {
        if !modules.contains(&t.module) {
            continue;
        }
        let (a, b) = (
            Var::from_tensor(&p.a).unwrap(),
            Var::from_tensor(&p.b).unwrap(),
        );
        pairs.insert(
            *t,
            LoraPair {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
            },
        );
        vars.insert(*t, (a, b));
    }
    let adapter = LoraAdapter::new(full.rank(), full.alpha(), pairs).unwrap();
    let seqs = batch(&golden);

    let ids = pad_batch(&seqs, 0, &dev).unwrap();
    let hidden = model.hidden(&ids, Some(&adapter), None).unwrap();
    let loss = answer_loss(&model, &hidden, &seqs).unwrap();
    let want_loss = loss.to_scalar::<f32>().unwrap();
    let auto = loss.backward().unwrap();

    let detached = adapter.detached().unwrap();
    let got = lora_gradients(&model, &seqs, &detached).unwrap();
    assert!(
        (got.loss - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0),
        "{name}: loss {} vs autograd {want_loss}",
        got.loss
    );
    assert_eq!(got.tokens, seqs.iter().map(|s| s.ids.len()).sum::<usize>());
    assert_eq!(got.answer_tokens, 3 + 5 + 1);
    assert_eq!(
        got.grads.len(),
        vars.len(),
        "{name}: a gradient per factor pair"
    );
    for (t, (a, b)) in &vars {
        let g = &got.grads[t];
        for (what, mine, var) in [("A", &g.a, a), ("B", &g.b, b)] {
            let want = auto.get(var.as_tensor()).expect("an autograd gradient");
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                scale > 0.0,
                "{name} {t:?} {what}: a zero gradient proves nothing"
            );
            let err = max_abs_diff(mine, want);
            assert!(
                err <= 1e-4 * scale,
                "{name} layer {} {:?} {what}: max |diff| {err} vs max |grad| {scale}",
                t.layer,
                t.module
            );
        }
    }
}

#[test]
fn qwen2_lora_gradients_match_autograd() {
    check("tiny-qwen2", &Module::ALL);
}

#[test]
fn llama_lora_gradients_match_autograd() {
    check("tiny-llama", &Module::ALL);
}

/// Unadapted projections take the base path only (and get no gradient entry).
#[test]
fn a_subset_of_modules_matches_autograd() {
    check("tiny-qwen2", &[Module::V, Module::Down]);
}

#[test]
fn a_batch_without_answer_tokens_is_refused() {
    let dev = Device::Cpu;
    let model = CausalLm::load(golden_path("tiny-qwen2"), &dev).unwrap();
    let empty = LoraAdapter::new(4, 8.0, BTreeMap::new()).unwrap();
    let seq = Sequence {
        ids: vec![1, 2, 3],
        answer_from: 3,
    };
    assert!(lora_gradients(&model, &[seq], &empty).is_err());
}
