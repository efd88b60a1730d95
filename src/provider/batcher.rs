//! Concurrent cache misses generated as one batch. Misses queue for one generation thread;
//! each time it is free it takes every queued prompt set (up to a bound) and generates them
//! together ([`Generator::generate_batch`]), so a burst of misses costs one encoder and one
//! decoder pass rather than one each, and the adapters are ready, and their requests reach
//! the engine, at the same moment. No timer: a lone miss starts at once. The cache keeps its
//! single flight per key, so a set is queued once however many requests wait for it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};

use candle_core::{DType, Device};
use mistralrs_core::adapter_provider::SequenceLora;
use tokio::sync::oneshot;

use super::share;
use super::GenerationError;
use crate::cache::AdapterKey;
use crate::engine::to_sequence_lora;
use crate::error::DndError;
use crate::generator::Generator;

type Reply = oneshot::Sender<Result<SequenceLora, GenerationError>>;

struct Job {
    prompts: Arc<Vec<String>>,
    key: AdapterKey,
    reply: Reply,
}

/// The queue of prompt sets waiting for the generation thread.
#[derive(Clone)]
pub(super) struct Batcher {
    jobs: mpsc::Sender<Job>,
}

/// Where the generation thread's work runs (swapped by `set_generation_share`).
pub(super) type PoolSlot = Arc<RwLock<Option<Arc<rayon::ThreadPool>>>>;

impl Batcher {
    /// Starts the generation thread; it ends when the batcher is dropped.
    pub(super) fn start(
        generator: Arc<Generator>,
        pool: PoolSlot,
        device: Device,
        dtype: DType,
        max_batch: Arc<AtomicUsize>,
    ) -> crate::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("dnd-generation".into())
            .spawn(move || {
                while let Ok(first) = queue.recv() {
                    let mut batch = vec![first];
                    let max_batch = max_batch.load(Ordering::Relaxed).max(1);
                    while batch.len() < max_batch {
                        match queue.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    let pool = pool.read().unwrap_or_else(|p| p.into_inner()).clone();
                    // A panic fails this batch's requests (their answers are dropped), not
                    // the thread every later miss needs.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        share::run_in(pool.as_deref(), || {
                            generate(&generator, batch, &device, dtype)
                        })
                    }));
                }
            })
            .map_err(|e| DndError::InvalidInput(format!("starting the generation thread: {e}")))?;
        Ok(Self { jobs })
    }

    /// The adapter for `prompts`, generated with whatever else is queued.
    pub(super) async fn generate(
        &self,
        prompts: Arc<Vec<String>>,
        key: AdapterKey,
    ) -> Result<SequenceLora, GenerationError> {
        let (reply, answer) = oneshot::channel();
        let gone = || GenerationError::Failed("the generation ended without an adapter".into());
        self.jobs
            .send(Job {
                prompts,
                key,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Generates a batch and answers each job; a batch that fails is retried set by set, so one
/// bad set fails only its own requests.
fn generate(generator: &Generator, batch: Vec<Job>, device: &Device, dtype: DType) {
    let finish = |job: Job, adapter: crate::Result<crate::adapters::LoraAdapter>| {
        // `to_sequence_lora` refuses non-finite weights after the cast to the model's dtype.
        let lora = adapter
            .and_then(|a| to_sequence_lora(&a, format!("dnd-{}", job.key), device, dtype))
            .map_err(GenerationError::from);
        // A requester that went away no longer needs the answer.
        let _ = job.reply.send(lora);
    };
    let together = if batch.len() > 1 {
        let sets: Vec<&[String]> = batch.iter().map(|j| j.prompts.as_slice()).collect();
        generator.generate_batch(&sets).ok()
    } else {
        None
    };
    match together {
        Some(adapters) => {
            for (job, adapter) in batch.into_iter().zip(adapters) {
                finish(job, Ok(adapter));
            }
        }
        None => {
            for job in batch {
                let adapter = generator.generate(&job.prompts);
                finish(job, adapter);
            }
        }
    }
}
