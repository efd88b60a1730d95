//! The DnD adapter provider for mistral.rs: request prompts to a generated, cached adapter.
//!
//! [`DndProvider`] implements the engine's `AdapterProvider`. Embedded in an application it
//! applies the [prompt policy](crate::policy) to each request's messages by itself; the
//! server resolves the adapter before handing the request to the engine (so that it can report
//! and refuse with HTTP semantics) and sends it with the request
//! (`Request::NormalWithAdapter`), so the engine does not ask the provider again.

mod batcher;
mod error;
mod named;
mod share;
mod turns;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use mistralrs_core::adapter_provider::{
    AdapterError, AdapterProvider, AdapterRequest, SequenceLora,
};

use crate::adapters::{BaseModelShape, LoraAdapter};
use crate::cache::{
    fingerprint, normalize_prompts, AdapterCache, AdapterKey, CacheError, CacheLimits, HostTier,
    Lease, Source, Transfer,
};
use crate::error::{DndError, Result};
use crate::generator::anchors::{Anchors, Nearest};
use crate::generator::{Generator, LoadOptions};
use crate::policy::{Condition, PromptPolicy};
pub use error::{GenerationError, ProviderError};
pub use named::{NamedAdapter, NamedAdapters};
pub use share::GenerationShare;
pub use turns::turns_of;

/// What the cache keeps beside each adapter: where it came from (so that it can be listed
/// and exported again).
#[derive(Debug, Clone)]
pub struct AdapterMeta {
    /// The normalised prompts it was generated from (none for a PEFT folder).
    pub prompts: Arc<Vec<String>>,
    /// Generated, or loaded from a named PEFT folder.
    pub origin: Origin,
    /// The prompts' pooled embedding, kept for semantic reuse (generated adapters, when
    /// [`ProviderOptions::reuse_distance`] is set).
    pub embedding: Option<Tensor>,
}

/// Where a cached adapter came from.
#[derive(Debug, Clone)]
pub enum Origin {
    /// Generated from its prompts.
    Generated,
    /// A PEFT folder served under a name.
    Peft {
        /// The name.
        name: String,
        /// The folder.
        dir: PathBuf,
    },
}

/// The cache of device-resident adapters.
pub type LoraCache = AdapterCache<AdapterKey, SequenceLora, AdapterMeta, GenerationError>;

/// How the provider is set up.
#[derive(Debug, Clone)]
pub struct ProviderOptions {
    /// Which prompts condition an adapter, and limits.
    pub policy: PromptPolicy,
    /// Cache bounds.
    pub limits: CacheLimits,
    /// The model's device (adapters live there).
    pub device: Device,
    /// The dtype adapters are kept in (the server's `--lora-dtype`); the engine casts their
    /// updates to the activations' dtype.
    pub dtype: DType,
    /// Identity of the base model, part of every adapter key.
    pub base_model_id: String,
    /// Abstain (serve the base model, saying so) when a condition's distance to the nearest
    /// training condition of the generator exceeds this (see
    /// [`crate::generator::anchors`]); needs a generator with anchors. `None`: never.
    pub abstain_distance: Option<f32>,
    /// Serve a cached generated adapter whose condition lies within this distance of a new
    /// prompt set's (1 - cosine of the pooled encoder embeddings, as for abstention) instead
    /// of generating one; reported as source `similar` with the distance. `None`: never.
    pub reuse_distance: Option<f32>,
    /// The cores and priority generations (and condition embeddings) run with.
    pub generation: GenerationShare,
    /// Bytes of host memory for adapters evicted from the device, brought back by a copy
    /// instead of being generated or loaded again (source `restored`). `None`: no host tier.
    /// On a CPU device the tier holds the same tensors, so it only adds a second budget.
    pub host_cache_bytes: Option<usize>,
    /// The dtype the generator runs in: f32 (the reference numerics) or bf16 (half its
    /// weights; on a CPU with AVX512-BF16 its largest products run on the bf16 dot products,
    /// README "Speed"). Adapters come out in [`Self::dtype`] either way. Read by
    /// [`DndProvider::load`]; a generator handed to [`DndProvider::new`] keeps its own.
    pub generator_dtype: DType,
}

/// Which adapter a request got.
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// The adapter, or none for the base model.
    pub adapter: Option<Arc<SequenceLora>>,
    /// Its key.
    pub key: Option<AdapterKey>,
    /// How the cache served it.
    pub source: Option<Source>,
    /// How long its generation took (when this request generated or waited for it).
    pub generation: Option<Duration>,
    /// Set when the provider abstained: the condition's nearest training condition, farther
    /// than the abstention distance (the request gets the base model).
    pub abstained: Option<Nearest>,
    /// The name the request asked for (`model`), when it named an adapter.
    pub name: Option<String>,
    /// Whether the adapter is a PEFT folder (loaded, not generated).
    pub peft: bool,
    /// Set when a cached adapter for a similar condition was served instead of generating
    /// one: the distance between the two conditions.
    pub similar: Option<f32>,
    /// The condition's routing key ([`crate::cache::route_key`]), when prompts conditioned
    /// the request (set by the server).
    pub route: Option<String>,
}

/// The provider's cache: on the model's device, with a host-memory tier when asked for.
fn adapter_cache(opts: &ProviderOptions) -> Arc<LoraCache> {
    let Some(max_bytes) = opts.host_cache_bytes else {
        return LoraCache::new(opts.limits, SequenceLora::size_in_bytes);
    };
    let copy = |to: Device, what: &'static str| -> Transfer<SequenceLora, GenerationError> {
        Arc::new(move |a: &SequenceLora| {
            a.to_device(&to).map_err(|e| {
                tracing::warn!(adapter = a.name(), "copy {what} failed: {e}");
                GenerationError::Failed(format!("copy {what}: {e}"))
            })
        })
    };
    LoraCache::with_host_tier(
        opts.limits,
        SequenceLora::size_in_bytes,
        HostTier {
            max_bytes,
            offload: copy(Device::Cpu, "to host memory"),
            restore: copy(opts.device.clone(), "from host memory"),
        },
    )
}

/// The request's own copy of a cached adapter (same tensors), owning its cache lease: the entry
/// stays in use until the request and its sequence drop the copy, and the drop wakes lookups
/// waiting for room.
fn leased(lease: Lease<SequenceLora>) -> Arc<SequenceLora> {
    let adapter = lease.value().clone();
    Arc::new(adapter.with_guard(lease))
}

/// A generator, its adapter cache and the prompt policy, as an engine adapter provider.
pub struct DndProvider {
    generator: Arc<Generator>,
    generator_id: String,
    opts: ProviderOptions,
    adapter_bytes: usize,
    cache: Arc<LoraCache>,
    /// Abstention decisions by key (a condition's distance never changes), bounded.
    nearest: Mutex<HashMap<AdapterKey, Nearest>>,
    /// Adapters served under a name.
    named: RwLock<NamedAdapters>,
    /// Where generations run (`None`: rayon's global pool).
    pool: batcher::PoolSlot,
    /// Most prompt sets per generation batch.
    max_batch: Arc<std::sync::atomic::AtomicUsize>,
    /// The queue of misses, generated in batches.
    batcher: batcher::Batcher,
}

/// Most remembered abstention decisions (the map is cleared when full).
const NEAREST_MEMO: usize = 4096;

impl DndProvider {
    /// Loads a generator checkpoint and encoder folder (on the model's device, in
    /// `opts.generator_dtype`) and checks
    /// that it makes adapters for `base_shape` when given.
    pub fn load(
        checkpoint: impl AsRef<Path>,
        encoder_dir: impl AsRef<Path>,
        base_shape: Option<&BaseModelShape>,
        opts: ProviderOptions,
    ) -> Result<Arc<Self>> {
        let checkpoint = checkpoint.as_ref();
        let bytes = std::fs::read(checkpoint).map_err(|e| DndError::io(checkpoint, e))?;
        let generator = Generator::load(
            checkpoint,
            encoder_dir,
            &LoadOptions {
                device: opts.device.clone(),
                dtype: opts.generator_dtype,
            },
        )?;
        if let Some(shape) = base_shape {
            generator.check_base_model(shape)?;
        }
        Self::new(generator, fingerprint(&bytes), opts)
    }

    /// Wraps a loaded generator; `generator_id` identifies its weights in adapter keys.
    pub fn new(
        generator: Generator,
        generator_id: impl Into<String>,
        mut opts: ProviderOptions,
    ) -> Result<Arc<Self>> {
        let n = generator.config().num_prompts;
        if opts.policy.max_prompts == 0 || opts.policy.max_prompts > n {
            opts.policy.max_prompts = n;
        }
        for (what, d) in [
            ("abstention", opts.abstain_distance),
            ("reuse", opts.reuse_distance),
        ] {
            if d.is_some_and(|d| !(0.0..=2.0).contains(&d)) {
                return Err(DndError::InvalidInput(format!(
                    "the {what} distance must lie in 0..=2 (1 - cosine), got {}",
                    d.unwrap_or_default()
                )));
            }
        }
        if opts.abstain_distance.is_some() && generator.anchors().is_none() {
            return Err(DndError::InvalidInput(
                "abstaining needs a generator with training-condition anchors (dnd anchors)".into(),
            ));
        }
        let adapter_bytes = adapter_bytes(&generator, opts.dtype);
        if adapter_bytes > opts.limits.max_bytes {
            return Err(DndError::InvalidInput(format!(
                "one adapter of this generator takes {adapter_bytes} bytes, more than the whole \
                 cache budget of {} bytes",
                opts.limits.max_bytes
            )));
        }
        let pool = Arc::new(RwLock::new(opts.generation.pool()?));
        let generator = Arc::new(generator);
        let max_batch = Arc::new(std::sync::atomic::AtomicUsize::new(
            opts.generation.max_batch,
        ));
        let batcher = batcher::Batcher::start(
            generator.clone(),
            pool.clone(),
            opts.device.clone(),
            opts.dtype,
            max_batch.clone(),
        )?;
        Ok(Arc::new(Self {
            pool,
            max_batch,
            batcher,
            generator,
            generator_id: generator_id.into(),
            cache: adapter_cache(&opts),
            opts,
            adapter_bytes,
            nearest: Mutex::new(HashMap::new()),
            named: RwLock::new(NamedAdapters::default()),
        }))
    }

    /// The generator.
    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    /// The fingerprint of the generator's weights.
    pub fn generator_id(&self) -> &str {
        &self.generator_id
    }

    /// The options (with `max_prompts` clamped to the generator's N).
    pub fn options(&self) -> &ProviderOptions {
        &self.opts
    }

    /// Changes where later generations run (those under way finish where they are).
    pub fn set_generation_share(&self, share: GenerationShare) -> Result<()> {
        let pool = share.pool()?;
        self.max_batch
            .store(share.max_batch, std::sync::atomic::Ordering::Relaxed);
        *self.pool.write().unwrap_or_else(|p| p.into_inner()) = pool;
        Ok(())
    }

    fn generation_pool(&self) -> Option<Arc<rayon::ThreadPool>> {
        self.pool.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The adapter cache.
    pub fn cache(&self) -> &Arc<LoraCache> {
        &self.cache
    }

    /// Bytes one adapter of this generator takes on the model's device.
    pub fn adapter_bytes(&self) -> usize {
        self.adapter_bytes
    }

    /// The key an adapter for `prompts` has.
    pub fn key_for(&self, prompts: &[String]) -> AdapterKey {
        AdapterKey::new(
            &self.generator_id,
            &self.opts.base_model_id,
            &normalize_prompts(prompts),
        )
    }

    /// The adapter for a policy decision: none for the base model, else from the cache or
    /// generated (off the caller's thread).
    pub async fn resolve(
        &self,
        condition: Condition,
    ) -> std::result::Result<Served, ProviderError> {
        let prompts = match condition {
            Condition::Base => return Ok(Served::default()),
            Condition::Prompts(p) => normalize_prompts(&p),
        };
        let key = AdapterKey::new(&self.generator_id, &self.opts.base_model_id, &prompts);
        // A cached adapter passed the abstention test when it was made, and needs no stand-in.
        let cached = self.cache.peek_meta(&key).is_some();
        let (abstain, reuse) = (self.opts.abstain_distance, self.opts.reuse_distance);
        let remembered = abstain.and_then(|_| self.remembered_nearest(&key));
        let embedding =
            if !cached && (reuse.is_some() || (abstain.is_some() && remembered.is_none())) {
                Some(self.embed(&prompts).await?)
            } else {
                None
            };
        if let (Some(limit), false) = (abstain, cached) {
            let near = match remembered {
                Some(n) => n,
                None => self.nearest_of(&key, embedding.as_ref())?,
            };
            if near.distance > limit {
                tracing::debug!(adapter = %key, distance = near.distance, "abstained");
                return Ok(Served {
                    abstained: Some(near),
                    ..Served::default()
                });
            }
        }
        if let (Some(limit), Some(e)) = (reuse, &embedding) {
            if let Some(served) = self.similar(e, limit).await {
                return Ok(served);
            }
        }
        let prompts = Arc::new(prompts);
        let make = {
            let (batcher, prompts, key) = (self.batcher.clone(), prompts.clone(), key.clone());
            move || async move { batcher.generate(prompts, key).await }
        };
        let lookup = self
            .cache
            .get_or_generate(
                key.clone(),
                AdapterMeta {
                    prompts,
                    origin: Origin::Generated,
                    embedding: embedding.filter(|_| reuse.is_some()),
                },
                self.adapter_bytes,
                make,
            )
            .await
            .map_err(cache_error)?;
        tracing::debug!(adapter = %key, source = lookup.source.as_str(), "adapter resolved");
        Ok(Served {
            adapter: Some(leased(lookup.value)),
            key: Some(key),
            source: Some(lookup.source),
            generation: lookup.generation,
            ..Served::default()
        })
    }

    /// Serves the PEFT folder `dir` under `name` (checked now against the base model `shape`;
    /// loaded into the cache when a request names it). `reserved`: names the base model
    /// answers to.
    pub fn add_peft(
        &self,
        name: &str,
        dir: &Path,
        shape: Option<&BaseModelShape>,
        reserved: &[&str],
    ) -> Result<()> {
        self.put_peft(name, dir, shape, reserved, false)
    }

    /// As [`add_peft`](Self::add_peft), but an adapter already served under `name` is replaced
    /// (vLLM's `load_inplace`): requests that start afterwards get the new one.
    pub fn replace_peft(
        &self,
        name: &str,
        dir: &Path,
        shape: Option<&BaseModelShape>,
        reserved: &[&str],
    ) -> Result<()> {
        self.put_peft(name, dir, shape, reserved, true)
    }

    fn put_peft(
        &self,
        name: &str,
        dir: &Path,
        shape: Option<&BaseModelShape>,
        reserved: &[&str],
        replace: bool,
    ) -> Result<()> {
        let adapter = named::check_peft(dir, shape, &self.opts.base_model_id, self.opts.dtype)?;
        if let NamedAdapter::Peft { bytes, .. } = &adapter {
            if *bytes > self.opts.limits.max_bytes {
                return Err(DndError::InvalidInput(format!(
                    "adapter {name} ({}) takes {bytes} bytes, more than the whole cache budget \
                     of {} bytes",
                    dir.display(),
                    self.opts.limits.max_bytes
                )));
            }
        }
        let mut named = self.lock_named_mut();
        let old = if replace { named.remove(name) } else { None };
        if let Err(e) = named.insert(name, adapter, reserved) {
            // Nothing changes when the new one is refused.
            if let Some(old) = old {
                named.insert(name, old, &[])?;
            }
            return Err(e);
        }
        drop(named);
        if let Some(old) = old {
            self.drop_cached(&old);
        }
        Ok(())
    }

    /// Stops serving `name`; returns its kind (`peft`, `preset`), or `None` when nothing is
    /// served under it. Requests already running keep their adapter; a PEFT adapter's cached
    /// copy is evicted (or, while requests use it, left to the cache's LRU order).
    pub fn remove_named(&self, name: &str) -> Option<&'static str> {
        let old = self.lock_named_mut().remove(name)?;
        self.drop_cached(&old);
        Some(old.kind())
    }

    /// Evicts a named PEFT adapter's cached copy, which nothing else can name. A preset's
    /// adapter stays: it is any request's adapter for those prompts.
    fn drop_cached(&self, adapter: &NamedAdapter) {
        if let NamedAdapter::Peft { key, .. } = adapter {
            // In use: it leaves by LRU once its requests end; absent: nothing to do.
            let _ = self.cache.remove(key);
        }
    }

    /// Serves the adapter generated from `prompts` under `name` (checked by the policy's
    /// limits now; of more prompts than the generator takes, a seeded sample of that many).
    pub fn add_preset(&self, name: &str, prompts: &[String], reserved: &[&str]) -> Result<()> {
        let n = self.opts.policy.max_prompts;
        let sampled;
        let prompts = if prompts.len() > n {
            sampled = crate::prompts::sample_prompts(prompts, n, 0);
            &sampled[..]
        } else {
            prompts
        };
        let prompts = self
            .opts
            .policy
            .explicit(prompts)
            .map_err(|e| DndError::InvalidInput(format!("preset {name}: {e}")))?;
        self.lock_named_mut()
            .insert(name, NamedAdapter::Preset { prompts }, reserved)
    }

    /// The names served and their kinds (`peft`, `preset`), sorted.
    pub fn names(&self) -> Vec<(String, &'static str)> {
        let named = self.named.read().unwrap_or_else(|p| p.into_inner());
        named
            .iter()
            .map(|(n, a)| (n.to_string(), a.kind()))
            .collect()
    }

    /// The adapter served under `name`, or `None` when no adapter has that name.
    pub async fn resolve_named(
        &self,
        name: &str,
    ) -> Option<std::result::Result<Served, ProviderError>> {
        let adapter = self
            .named
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)?
            .clone();
        let served = match adapter {
            NamedAdapter::Preset { prompts } => self.resolve(Condition::Prompts(prompts)).await,
            NamedAdapter::Peft {
                dir,
                key,
                content,
                bytes,
            } => self.load_named(name, dir, key, content, bytes).await,
        };
        Some(served.map(|s| Served {
            name: Some(name.to_string()),
            ..s
        }))
    }

    async fn load_named(
        &self,
        name: &str,
        dir: PathBuf,
        key: AdapterKey,
        content: String,
        bytes: usize,
    ) -> std::result::Result<Served, ProviderError> {
        let meta = named::peft_meta(name, &dir);
        let make = {
            let (name, device, dtype) =
                (name.to_string(), self.opts.device.clone(), self.opts.dtype);
            let shape = self.generator.layout().base_shape().clone();
            move || async move {
                tokio::task::spawn_blocking(move || {
                    named::load_peft(&dir, &name, &content, &shape, &device, dtype)
                })
                .await
                .unwrap_or_else(|e| Err(GenerationError::Failed(format!("loading task: {e}"))))
            }
        };
        let lookup = self
            .cache
            .get_or_generate(key.clone(), meta, bytes, make)
            .await
            .map_err(cache_error)?;
        Ok(Served {
            adapter: Some(leased(lookup.value)),
            key: Some(key),
            source: Some(lookup.source),
            generation: lookup.generation,
            peft: true,
            ..Served::default()
        })
    }

    fn lock_named_mut(&self) -> std::sync::RwLockWriteGuard<'_, NamedAdapters> {
        self.named.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The pooled embedding of a prompt set (in the generation pool: an encoder pass).
    async fn embed(&self, prompts: &[String]) -> std::result::Result<Tensor, ProviderError> {
        let (generator, p) = (self.generator.clone(), prompts.to_vec());
        let failed = |m: String| ProviderError::Generation(GenerationError::Failed(m));
        let pool = self.generation_pool();
        tokio::task::spawn_blocking(move || share::run_in(pool.as_deref(), || generator.pooled(&p)))
            .await
            .map_err(|e| failed(format!("embedding task: {e}")))?
            .map_err(|e| failed(format!("embedding: {e}")))
    }

    fn remembered_nearest(&self, key: &AdapterKey) -> Option<Nearest> {
        let memo = self.nearest.lock().unwrap_or_else(|p| p.into_inner());
        memo.get(key).cloned()
    }

    /// The training condition nearest to a prompt set's embedding (remembered by key: a
    /// condition's distance never changes).
    fn nearest_of(
        &self,
        key: &AdapterKey,
        embedding: Option<&Tensor>,
    ) -> std::result::Result<Nearest, ProviderError> {
        let failed = |m: String| ProviderError::Generation(GenerationError::Failed(m));
        let embedding = embedding.ok_or_else(|| failed("no embedding to measure".into()))?;
        let near = self
            .generator
            .anchors()
            .ok_or_else(|| failed("the generator has no anchors".into()))?
            .nearest(embedding)
            .map_err(|e| failed(format!("distance: {e}")))?;
        let mut m = self.nearest.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= NEAREST_MEMO {
            m.clear();
        }
        m.insert(key.clone(), near.clone());
        Ok(near)
    }

    /// The cached generated adapter whose condition is nearest to `embedding`, when within
    /// `limit`: ready on the device (served as a hit on it) or held in the host tier (copied
    /// back, as a request naming its key would be).
    async fn similar(&self, embedding: &Tensor, limit: f32) -> Option<Served> {
        let (keys, rows): (Vec<String>, Vec<Tensor>) = self
            .cache
            .entries()
            .into_iter()
            .chain(self.cache.host_entries())
            .filter_map(|e| Some((e.key.as_str().to_string(), e.meta.embedding?)))
            .unzip();
        if keys.is_empty() {
            return None;
        }
        let near = Tensor::stack(&rows, 0)
            .map_err(DndError::from)
            .and_then(|m| Anchors::new(keys, m))
            .and_then(|index| index.nearest(embedding));
        let near = match near {
            Ok(n) => n,
            Err(e) => {
                // Reuse is an optimisation: without it the request gets its own adapter.
                tracing::warn!("semantic reuse skipped: {e}");
                return None;
            }
        };
        if near.distance > limit {
            return None;
        }
        let key = AdapterKey::parse(&near.name)?;
        // Dropped since the scan, or no room to copy it back: generate instead.
        let lookup = match self.cache.get_held(&key).await? {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(adapter = %key, "similar adapter not reused: {e:?}");
                return None;
            }
        };
        tracing::debug!(adapter = %key, distance = near.distance, "similar condition reused");
        Some(Served {
            adapter: Some(leased(lookup.value)),
            key: Some(key),
            source: Some(lookup.source),
            similar: Some(near.distance),
            ..Served::default()
        })
    }

    /// A cached adapter by key (a client referring to an adapter it was served before): ready,
    /// being made, or copied back from the host tier; never generated from nothing (the key
    /// does not say from which prompts).
    pub async fn by_key(&self, key: &str) -> std::result::Result<Served, ProviderError> {
        let unknown = || ProviderError::UnknownAdapter(key.to_string());
        let k = AdapterKey::parse(key).ok_or_else(unknown)?;
        let lookup = self
            .cache
            .get_held(&k)
            .await
            .ok_or_else(unknown)?
            .map_err(cache_error)?;
        let (name, peft) = match lookup.meta.origin {
            Origin::Peft { name, .. } => (Some(name), true),
            Origin::Generated => (None, false),
        };
        Ok(Served {
            adapter: Some(leased(lookup.value)),
            key: Some(k),
            source: Some(lookup.source),
            generation: lookup.generation,
            name,
            peft,
            ..Served::default()
        })
    }

    /// Regenerates the adapter a cached key was made from (the generator is deterministic),
    /// or reloads its PEFT folder, as float32 matrices for export.
    pub async fn export(&self, key: &str) -> std::result::Result<LoraAdapter, ProviderError> {
        let unknown = || ProviderError::UnknownAdapter(key.to_string());
        let k = AdapterKey::parse(key).ok_or_else(unknown)?;
        let meta = self.cache.peek_meta(&k).ok_or_else(unknown)?;
        let generator = self.generator.clone();
        tokio::task::spawn_blocking(move || match &meta.origin {
            Origin::Generated => generator.generate(&meta.prompts),
            Origin::Peft { dir, .. } => {
                LoraAdapter::load_peft_for(dir, &Device::Cpu, Some(generator.layout().base_shape()))
            }
        })
        .await
        .map_err(|e| ProviderError::Generation(GenerationError::Failed(e.to_string())))?
        .and_then(|a| a.to(&Device::Cpu, DType::F32))
        .map_err(|e| ProviderError::Generation(GenerationError::Failed(e.to_string())))
    }
}

#[async_trait::async_trait]
impl AdapterProvider for DndProvider {
    async fn adapter_for(
        &self,
        request: &AdapterRequest<'_>,
    ) -> std::result::Result<Option<Arc<SequenceLora>>, AdapterError> {
        let condition = self
            .opts
            .policy
            .from_turns(&turns_of(request.messages))
            .map_err(|e| AdapterError::InvalidRequest(format!("{} ({})", e, e.code())))?;
        let served = self.resolve(condition).await.map_err(|e| {
            let msg = format!("{e} ({})", e.code());
            if e.is_client_error() {
                AdapterError::InvalidRequest(msg)
            } else {
                AdapterError::Failed(msg)
            }
        })?;
        Ok(served.adapter)
    }
}

fn cache_error(e: CacheError<GenerationError>) -> ProviderError {
    match e {
        CacheError::TooLarge { bytes, budget } => ProviderError::TooLarge { bytes, budget },
        CacheError::Busy(waited) => ProviderError::CacheBusy(waited),
        CacheError::Generation(g) => ProviderError::Generation(g),
        CacheError::Panicked(m) => {
            ProviderError::Generation(GenerationError::Failed(format!("panicked: {m}")))
        }
    }
}

/// Bytes of one generated adapter on the device: `r·(in+out)` elements per projection.
fn adapter_bytes(generator: &Generator, dtype: DType) -> usize {
    let layout = generator.layout();
    let shape = layout.base_shape();
    let spec = layout.spec();
    let per_layer: usize = spec
        .target_modules
        .iter()
        .map(|&m| {
            let (i, o) = shape.in_out(m);
            spec.rank * (i + o)
        })
        .sum();
    shape.num_layers * per_layer * dtype.size_in_bytes()
}

#[cfg(test)]
mod tests;
