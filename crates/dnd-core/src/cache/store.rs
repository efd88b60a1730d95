//! A bounded, single-flight cache of device-resident adapters.
//!
//! - Bounded by entry count and by bytes. Generations in flight reserve their bytes up front,
//!   so resident + reserved never exceeds the budget.
//! - Values are handed out as [`Lease`]s. An entry with a live lease (a request, its running
//!   sequence) is *in use*: it is never evicted. When every entry is in use and there is no
//!   room, a miss waits for a lease to be released (up to a timeout) instead of exceeding the
//!   budget; dropping an entry's last lease wakes it, so nothing polls.
//! - Concurrent misses for one key share one generation, which runs in its own task: a client
//!   that goes away does not cancel it.
//! - Optionally a second tier in host memory with a byte budget of its own ([`HostTier`]): an
//!   entry evicted from the device is copied there (under the lock, so it is always in exactly
//!   one tier), and a later miss for its key copies it back (source `restored`) instead of
//!   generating or loading it again.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::{watch, Notify};

/// How a cache weighs a value: its size in bytes on the device it lives on. A function rather
/// than a trait, because the values are the engine's types, which neither this crate nor the
/// engine hook's may implement a trait of the other for.
pub type Weigher<V> = fn(&V) -> usize;

/// Bounds of a cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Most entries (ready and in flight).
    pub max_entries: usize,
    /// Most bytes (ready and reserved by generations in flight).
    pub max_bytes: usize,
    /// How long a miss waits for room while every entry is in use.
    pub wait_timeout: Duration,
}

/// How a lookup was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This lookup started the generation.
    Generated,
    /// Another lookup's generation for the same key was in flight; this one waited for it.
    Joined,
    /// The value was ready in the cache.
    Cached,
    /// This lookup copied the value back from the host-memory tier.
    Restored,
}

impl Source {
    /// Lower-case name, as reported to clients.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Generated => "generated",
            Self::Joined => "joined",
            Self::Cached => "cached",
            Self::Restored => "restored",
        }
    }
}

/// How many leases of one value are alive, and whom to wake when the last one goes.
#[derive(Debug)]
struct Holds {
    count: AtomicUsize,
    released: Arc<Notify>,
}

impl Holds {
    fn new(released: &Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            released: released.clone(),
        })
    }

    fn in_use(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }
}

/// A cached value, counted as in use until dropped: the entry is not evicted while any of its
/// leases lives, and dropping the last one wakes lookups waiting for room. Clones are leases
/// of their own.
#[derive(Debug)]
pub struct Lease<V> {
    value: Arc<V>,
    holds: Arc<Holds>,
}

impl<V> Lease<V> {
    fn new(value: Arc<V>, holds: Arc<Holds>) -> Self {
        holds.count.fetch_add(1, Ordering::AcqRel);
        Self { value, holds }
    }

    /// The value.
    pub fn value(&self) -> &Arc<V> {
        &self.value
    }
}

impl<V> Clone for Lease<V> {
    fn clone(&self) -> Self {
        Self::new(self.value.clone(), self.holds.clone())
    }
}

impl<V> std::ops::Deref for Lease<V> {
    type Target = V;
    fn deref(&self) -> &V {
        &self.value
    }
}

impl<V> Drop for Lease<V> {
    fn drop(&mut self) {
        if self.holds.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.holds.released.notify_waiters();
        }
    }
}

/// Copies a value between the device and host memory.
pub type Transfer<V, E> = Arc<dyn Fn(&V) -> Result<V, E> + Send + Sync>;

/// The host-memory tier of a cache whose values live on an accelerator: where evicted entries
/// go (least recently evicted dropped first) until a miss brings them back.
pub struct HostTier<V, E> {
    /// Most bytes held in host memory (each value weighed as on the device).
    pub max_bytes: usize,
    /// Copies an evicted value to host memory; on an error the value is dropped (counted in
    /// [`CacheStats::host_drops`]; the function logs why). It runs under the cache's lock, so
    /// that an entry is always in exactly one tier and its device memory is freed before the
    /// room it leaves is reused: one adapter's copy (milliseconds) delays other lookups by that.
    pub offload: Transfer<V, E>,
    /// Copies a host value back onto the device (in its own task, as a generation does); on an
    /// error the host copy stays, and the lookups waiting for it get the error.
    pub restore: Transfer<V, E>,
}

/// A value handed out by the cache.
#[derive(Debug)]
pub struct Lookup<V, M> {
    /// The value; the entry stays in use while this lease (or a clone) lives.
    pub value: Lease<V>,
    /// The entry's metadata.
    pub meta: M,
    /// How it was served.
    pub source: Source,
    /// Time the generation (or the copy back from host memory) took, for `Generated`,
    /// `Joined` and `Restored`.
    pub generation: Option<Duration>,
}

/// Why a lookup failed.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheError<E> {
    /// One value is larger than the whole byte budget.
    TooLarge {
        /// Bytes the value needs.
        bytes: usize,
        /// The budget.
        budget: usize,
    },
    /// No room was freed within the wait timeout (every entry stayed in use).
    Busy(Duration),
    /// The generation failed.
    Generation(E),
    /// The generation panicked (a bug, reported instead of taking the server down).
    Panicked(String),
}

/// A snapshot of one ready entry.
#[derive(Debug, Clone)]
pub struct EntryInfo<K, M> {
    /// The key.
    pub key: K,
    /// Bytes held.
    pub bytes: usize,
    /// Lookups served from the cache.
    pub hits: u64,
    /// Time since it was generated.
    pub age: Duration,
    /// Whether a running request holds it.
    pub in_use: bool,
    /// Its metadata.
    pub meta: M,
}

/// Why an entry could not be removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveError {
    /// No ready entry has that key.
    NotFound,
    /// A running request holds it.
    InUse,
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Lookups served from a ready entry.
    pub hits: AtomicU64,
    /// Lookups that started a generation.
    pub misses: AtomicU64,
    /// Lookups that joined a generation in flight.
    pub joins: AtomicU64,
    /// Entries evicted to make room (not counting explicit removals).
    pub evictions: AtomicU64,
    /// Entries removed on request.
    pub removals: AtomicU64,
    /// Generations that failed.
    pub failures: AtomicU64,
    /// Lookups that gave up waiting for room.
    pub busy: AtomicU64,
    /// Successful generations.
    pub generations: AtomicU64,
    /// Total generation time, microseconds.
    pub generation_micros: AtomicU64,
    /// Generations per latency bucket (upper bounds [`GENERATION_BUCKETS`], then +Inf).
    pub generation_buckets: [AtomicU64; GENERATION_BUCKETS.len() + 1],
    /// Highest resident + reserved bytes ever seen.
    pub peak_bytes: AtomicU64,
    /// Evicted entries copied to the host-memory tier.
    pub offloads: AtomicU64,
    /// Lookups served by copying an entry back from the host-memory tier.
    pub restores: AtomicU64,
    /// Entries dropped from the host-memory tier to make room there, or whose copy failed.
    pub host_drops: AtomicU64,
}

/// Upper bounds (seconds) of the generation-latency histogram buckets.
pub const GENERATION_BUCKETS: [f64; 8] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

struct Entry<V, M> {
    value: Arc<V>,
    holds: Arc<Holds>,
    meta: M,
    bytes: usize,
    hits: u64,
    created: Instant,
}

/// A finished generation as its waiters receive it: the flight's own lease keeps the new entry
/// in use until each waiter has taken a lease of its own; the last one to do so drops it (so
/// the entry is free as soon as the requests are done, whichever thread finishes first).
#[derive(Debug)]
struct Flight<V> {
    lease: Mutex<Option<Lease<V>>>,
    waiting: AtomicUsize,
}

impl<V> Flight<V> {
    /// A lease of the generated value for one waiter.
    fn take_lease(&self) -> Lease<V> {
        let mut slot = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        let lease = slot.as_ref().expect("held until the last waiter").clone();
        if self.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            *slot = None;
        }
        lease
    }
}

/// An entry of the host-memory tier (hits and creation time carried over from the device).
struct HostEntry<V, M> {
    value: Arc<V>,
    meta: M,
    bytes: usize,
    hits: u64,
    created: Instant,
}

/// What a flight runs: a generation, or a copy back from host memory.
type Making<V, E> = Pin<Box<dyn Future<Output = Result<V, E>> + Send>>;

/// What a generation's waiters receive, and the time it took.
type FlightResult<V, E> = Option<Result<(Arc<Flight<V>>, Duration), CacheError<E>>>;

struct State<K: Hash + Eq, V, M, E> {
    ready: LruCache<K, Entry<V, M>>,
    flights: HashMap<K, (watch::Receiver<FlightResult<V, E>>, M)>,
    resident: usize,
    reserved: usize,
    host: LruCache<K, HostEntry<V, M>>,
    host_bytes: usize,
}

impl<K: Hash + Eq, V, M, E> State<K, V, M, E> {
    /// Takes `key`'s entry out of the host tier, releasing its bytes there.
    fn take_host(&mut self, key: &K) -> Option<HostEntry<V, M>> {
        let held = self.host.pop(key)?;
        self.host_bytes -= held.bytes;
        Some(held)
    }
}

enum Step<V, M, E> {
    Ready(Lookup<V, M>),
    /// Wait for a flight, whose metadata this is.
    Await(watch::Receiver<FlightResult<V, E>>, Source, M),
    NoRoom,
    /// Not held, and nothing to make it with.
    Absent,
}

/// The cache. Share it as `Arc<AdapterCache<..>>`.
pub struct AdapterCache<K: Hash + Eq, V, M, E> {
    limits: CacheLimits,
    weigh: Weigher<V>,
    state: Mutex<State<K, V, M, E>>,
    /// Woken when room may have appeared: a lease released, an entry removed, a generation
    /// finished.
    changed: Arc<Notify>,
    stats: CacheStats,
    host_tier: Option<HostTier<V, E>>,
}

impl<K, V, M, E> AdapterCache<K, V, M, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
    M: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// An empty cache whose values weigh what `weigh` says.
    pub fn new(limits: CacheLimits, weigh: Weigher<V>) -> Arc<Self> {
        Self::build(limits, weigh, None)
    }

    /// An empty cache whose evicted entries drop to the host-memory tier `host`.
    pub fn with_host_tier(
        limits: CacheLimits,
        weigh: Weigher<V>,
        host: HostTier<V, E>,
    ) -> Arc<Self> {
        Self::build(limits, weigh, Some(host))
    }

    fn build(
        limits: CacheLimits,
        weigh: Weigher<V>,
        host_tier: Option<HostTier<V, E>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            limits,
            weigh,
            state: Mutex::new(State {
                ready: LruCache::unbounded(),
                flights: HashMap::new(),
                resident: 0,
                reserved: 0,
                host: LruCache::unbounded(),
                host_bytes: 0,
            }),
            changed: Arc::new(Notify::new()),
            stats: CacheStats::default(),
            host_tier,
        })
    }

    /// The host tier's byte budget (`None`: no host tier).
    pub fn host_budget(&self) -> Option<usize> {
        self.host_tier.as_ref().map(|h| h.max_bytes)
    }

    /// Bytes and entries held in the host-memory tier.
    pub fn host_usage(&self) -> (usize, usize) {
        let st = self.lock();
        (st.host_bytes, st.host.len())
    }

    /// The bounds.
    pub fn limits(&self) -> CacheLimits {
        self.limits
    }

    /// The counters.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    fn lock(&self) -> MutexGuard<'_, State<K, V, M, E>> {
        // A panic while holding the lock leaves consistent counters (every update is a
        // single statement), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of ready entries plus bytes reserved by generations in flight.
    pub fn resident_bytes(&self) -> usize {
        let st = self.lock();
        st.resident + st.reserved
    }

    /// Ready entries.
    pub fn len(&self) -> usize {
        self.lock().ready.len()
    }

    /// Whether no entry is ready.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ready value for `key`, counted as a hit.
    pub fn get(&self, key: &K) -> Option<Lookup<V, M>> {
        let mut st = self.lock();
        let e = st.ready.get_mut(key)?;
        e.hits += 1;
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(Lookup {
            value: Lease::new(e.value.clone(), e.holds.clone()),
            meta: e.meta.clone(),
            source: Source::Cached,
            generation: None,
        })
    }

    /// The metadata of an entry ready on the device or held in the host tier, without counting
    /// a hit or refreshing its recency.
    pub fn peek_meta(&self, key: &K) -> Option<M> {
        let st = self.lock();
        st.ready
            .peek(key)
            .map(|e| e.meta.clone())
            .or_else(|| st.host.peek(key).map(|h| h.meta.clone()))
    }

    /// The value for `key`: from the cache, from a generation in flight, from the host tier, or
    /// by running `make` (in its own task) with `bytes` reserved for its result.
    pub async fn get_or_generate<F, Fut>(
        self: &Arc<Self>,
        key: K,
        meta: M,
        bytes: usize,
        make: F,
    ) -> Result<Lookup<V, M>, CacheError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        if bytes > self.limits.max_bytes {
            return Err(CacheError::TooLarge {
                bytes,
                budget: self.limits.max_bytes,
            });
        }
        self.resolve(&key, Some((meta, bytes, make)))
            .await
            .expect("a lookup that may generate always finds a value")
    }

    /// The value for `key` if the cache holds it: ready, in flight, or in the host tier (copied
    /// back, waiting for room as a miss does); `None` when it holds none (nothing is made).
    pub async fn get_held(
        self: &Arc<Self>,
        key: &K,
    ) -> Option<Result<Lookup<V, M>, CacheError<E>>> {
        type Never<V, E> = fn() -> std::future::Ready<Result<V, E>>;
        self.resolve::<Never<V, E>, _>(key, None).await
    }

    /// Looks `key` up until it is served, waiting for room while every entry is in use;
    /// `make` (metadata, bytes to reserve, generation) makes a missing value, or without it
    /// a missing value is `None`.
    async fn resolve<F, Fut>(
        self: &Arc<Self>,
        key: &K,
        mut make: Option<(M, usize, F)>,
    ) -> Option<Result<Lookup<V, M>, CacheError<E>>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let deadline = Instant::now() + self.limits.wait_timeout;
        loop {
            // Registered before looking, so a release between the look and the wait is seen.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.step(key, &mut make) {
                Step::Ready(lookup) => return Some(Ok(lookup)),
                Step::Await(rx, source, meta) => {
                    return Some(Self::await_flight(rx, meta, source).await)
                }
                Step::Absent => return None,
                Step::NoRoom => {}
            }
            let now = Instant::now();
            if now >= deadline {
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                return Some(Err(CacheError::Busy(self.limits.wait_timeout)));
            }
            // Woken by a released lease, a removal or a finished generation.
            let _ = tokio::time::timeout(deadline - now, notified).await;
        }
    }

    /// One look under the lock (a plain function, so no guard lives across an await).
    fn step<F, Fut>(self: &Arc<Self>, key: &K, make: &mut Option<(M, usize, F)>) -> Step<V, M, E>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let mut st = self.lock();
        if let Some(e) = st.ready.get_mut(key) {
            e.hits += 1;
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Step::Ready(Lookup {
                value: Lease::new(e.value.clone(), e.holds.clone()),
                meta: e.meta.clone(),
                source: Source::Cached,
                generation: None,
            });
        }
        if let Some((rx, meta)) = st.flights.get(key) {
            self.stats.joins.fetch_add(1, Ordering::Relaxed);
            return Step::Await(rx.clone(), Source::Joined, meta.clone());
        }
        if let Some(tier) = &self.host_tier {
            if let Some(held) = st.take_host(key) {
                return self.restore(&mut st, key, held, tier.restore.clone());
            }
        }
        let Some((_, bytes, _)) = make.as_ref() else {
            return Step::Absent;
        };
        if !self.make_room(&mut st, *bytes) {
            return Step::NoRoom;
        }
        let (meta, bytes, make) = make.take().expect("checked above");
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let making: Making<V, E> = Box::pin(async move { make().await });
        let rx = self.launch(&mut st, key, &meta, bytes, making, true);
        Step::Await(rx, Source::Generated, meta)
    }

    /// Brings `held`, just taken out of the host tier, back to the device: room for the device
    /// copy, then the copy in a flight of its own, so concurrent lookups join it as they would a
    /// generation. Taken out first, so that the evictions that make room (which drop to the host
    /// tier, possibly pushing its oldest entries out) cannot push out the entry being restored.
    fn restore(
        self: &Arc<Self>,
        st: &mut State<K, V, M, E>,
        key: &K,
        held: HostEntry<V, M>,
        restore: Transfer<V, E>,
    ) -> Step<V, M, E> {
        let need = held.bytes;
        if !self.make_room(st, need) {
            // Nothing was evicted, so the host tier has the room it had.
            self.keep_on_host(st, key.clone(), held);
            return Step::NoRoom;
        }
        let (cache, k) = (self.clone(), key.clone());
        let meta = held.meta.clone();
        let making: Making<V, E> = Box::pin(async move {
            let value = held.value.clone();
            let copied = tokio::task::spawn_blocking(move || restore(&value)).await;
            match copied {
                Ok(Ok(v)) => {
                    cache.stats.restores.fetch_add(1, Ordering::Relaxed);
                    Ok(v)
                }
                Ok(Err(e)) => {
                    // The copy back failed (device memory, say): the host copy stays.
                    cache.keep_on_host(&mut cache.lock(), k, held);
                    Err(e)
                }
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        });
        let rx = self.launch(st, key, &meta, need, making, false);
        Step::Await(rx, Source::Restored, meta)
    }

    /// Starts a flight for `key` with `bytes` reserved: `making` runs in its own task, and its
    /// result enters the cache (`generation`: counted as a generation, not a restore).
    fn launch(
        self: &Arc<Self>,
        st: &mut State<K, V, M, E>,
        key: &K,
        meta: &M,
        bytes: usize,
        making: Making<V, E>,
        generation: bool,
    ) -> watch::Receiver<FlightResult<V, E>> {
        let (tx, rx) = watch::channel(None);
        st.flights.insert(key.clone(), (rx.clone(), meta.clone()));
        st.reserved += bytes;
        self.note_peak(st);
        let cache = self.clone();
        let (key, meta) = (key.clone(), meta.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            // Its own task, so that a panic in `making` is caught and reported.
            let result = match tokio::spawn(making).await {
                Ok(r) => r.map_err(CacheError::Generation),
                Err(e) => Err(CacheError::Panicked(e.to_string())),
            };
            cache.finish(key, meta, bytes, result, t0.elapsed(), generation, tx);
        });
        rx
    }

    /// Puts `held` in the host tier under `key`, dropping the least recently evicted entries
    /// there to make room (or `held` itself when it is larger than the whole tier).
    fn keep_on_host(&self, st: &mut State<K, V, M, E>, key: K, held: HostEntry<V, M>) {
        let Some(tier) = &self.host_tier else {
            return;
        };
        if held.bytes > tier.max_bytes {
            self.stats.host_drops.fetch_add(1, Ordering::Relaxed);
            return;
        }
        st.take_host(&key);
        while st.host_bytes + held.bytes > tier.max_bytes {
            let (_, old) = st.host.pop_lru().expect("host bytes imply host entries");
            st.host_bytes -= old.bytes;
            self.stats.host_drops.fetch_add(1, Ordering::Relaxed);
        }
        st.host_bytes += held.bytes;
        st.host.push(key, held);
    }

    /// Copies an entry evicted from the device into the host tier (dropped when there is no
    /// tier, when it is larger than the tier, or when the copy fails).
    fn offload(&self, st: &mut State<K, V, M, E>, key: K, e: Entry<V, M>) {
        let Some(tier) = &self.host_tier else {
            return;
        };
        if e.bytes > tier.max_bytes {
            self.stats.host_drops.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match (tier.offload)(&e.value) {
            Ok(v) => {
                self.stats.offloads.fetch_add(1, Ordering::Relaxed);
                let held = HostEntry {
                    value: Arc::new(v),
                    meta: e.meta,
                    bytes: e.bytes,
                    hits: e.hits,
                    created: e.created,
                };
                self.keep_on_host(st, key, held);
            }
            Err(_) => {
                self.stats.host_drops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn await_flight(
        mut rx: watch::Receiver<FlightResult<V, E>>,
        meta: M,
        source: Source,
    ) -> Result<Lookup<V, M>, CacheError<E>> {
        let result = match rx.wait_for(Option::is_some).await {
            Ok(r) => r.clone().expect("waited for Some"),
            // Only if the runtime shut down under the generating task.
            Err(_) => Err(CacheError::Panicked(
                "the generation task was dropped".into(),
            )),
        };
        result.map(|(flight, took)| Lookup {
            value: flight.take_lease(),
            meta,
            source,
            generation: Some(took),
        })
    }

    /// Makes room for one more entry of `bytes`: evicts unpinned entries, least recently used
    /// first, but only when evicting them is enough. When it is not, nothing is evicted (the
    /// caller waits for a release, and the entries it would have dropped stay useful). Evicted
    /// entries drop to the host tier when there is one.
    fn make_room(&self, st: &mut State<K, V, M, E>, bytes: usize) -> bool {
        let entries = st.ready.len() + st.flights.len();
        let mut excess_entries = (entries + 1).saturating_sub(self.limits.max_entries);
        let mut excess_bytes =
            (st.resident + st.reserved + bytes).saturating_sub(self.limits.max_bytes);
        let mut victims = Vec::new();
        // Oldest first; entries in use are skipped.
        for (k, e) in st.ready.iter().rev() {
            if excess_entries == 0 && excess_bytes == 0 {
                break;
            }
            if !e.holds.in_use() {
                victims.push(k.clone());
                excess_entries = excess_entries.saturating_sub(1);
                excess_bytes = excess_bytes.saturating_sub(e.bytes);
            }
        }
        if excess_entries > 0 || excess_bytes > 0 {
            return false;
        }
        for k in victims {
            let e = st.ready.pop(&k).expect("victim is present");
            st.resident -= e.bytes;
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            self.offload(st, k, e);
        }
        true
    }

    /// Enters a flight's result.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        key: K,
        meta: M,
        reserved: usize,
        result: Result<V, CacheError<E>>,
        took: Duration,
        generation: bool,
        tx: watch::Sender<FlightResult<V, E>>,
    ) {
        let mut st = self.lock();
        st.flights.remove(&key);
        st.reserved -= reserved;
        let outcome = match result {
            Ok(v) => {
                let bytes = (self.weigh)(&v);
                let value = Arc::new(v);
                let holds = Holds::new(&self.changed);
                let flight = Lease::new(value.clone(), holds.clone());
                // The reservation is released above, so room is made for the whole value: an
                // estimate that fell short is covered, and if no room can be made the value is
                // given out uncached rather than exceed the budget.
                if bytes <= self.limits.max_bytes && self.make_room(&mut st, bytes) {
                    st.resident += bytes;
                    st.ready.push(
                        key,
                        Entry {
                            value,
                            holds,
                            meta,
                            bytes,
                            hits: 0,
                            created: Instant::now(),
                        },
                    );
                    self.note_peak(&st);
                }
                if generation {
                    self.record_generation(took);
                }
                // Waiters that leave before reading keep the flight's lease until the channel
                // goes (the entry is in use a little longer, never freed too early).
                let flight = Flight {
                    lease: Mutex::new(Some(flight)),
                    waiting: AtomicUsize::new(tx.receiver_count()),
                };
                Ok((Arc::new(flight), took))
            }
            Err(e) => {
                if generation {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                }
                Err(e)
            }
        };
        drop(st);
        let _ = tx.send(Some(outcome));
        self.changed.notify_waiters();
    }

    fn note_peak(&self, st: &State<K, V, M, E>) {
        self.stats
            .peak_bytes
            .fetch_max((st.resident + st.reserved) as u64, Ordering::Relaxed);
    }

    fn record_generation(&self, took: Duration) {
        let s = &self.stats;
        s.generations.fetch_add(1, Ordering::Relaxed);
        s.generation_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let i = GENERATION_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(GENERATION_BUCKETS.len());
        s.generation_buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The keys and metadata of the values being generated now.
    pub fn in_flight(&self) -> Vec<(K, M)> {
        let st = self.lock();
        st.flights
            .iter()
            .map(|(k, (_, m))| (k.clone(), m.clone()))
            .collect()
    }

    /// Ready entries, most recently used first.
    pub fn entries(&self) -> Vec<EntryInfo<K, M>> {
        let st = self.lock();
        st.ready
            .iter()
            .map(|(k, e)| EntryInfo {
                key: k.clone(),
                bytes: e.bytes,
                hits: e.hits,
                age: e.created.elapsed(),
                in_use: e.holds.in_use(),
                meta: e.meta.clone(),
            })
            .collect()
    }

    /// Entries of the host-memory tier, most recently evicted first (never in use).
    pub fn host_entries(&self) -> Vec<EntryInfo<K, M>> {
        let st = self.lock();
        st.host
            .iter()
            .map(|(k, h)| EntryInfo {
                key: k.clone(),
                bytes: h.bytes,
                hits: h.hits,
                age: h.created.elapsed(),
                in_use: false,
                meta: h.meta.clone(),
            })
            .collect()
    }

    /// Removes an entry that no request holds, from whichever tier holds it.
    pub fn remove(&self, key: &K) -> Result<(), RemoveError> {
        let mut st = self.lock();
        if !st.ready.contains(key) && st.take_host(key).is_some() {
            self.stats.removals.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        match st.ready.peek(key) {
            None => return Err(RemoveError::NotFound),
            Some(e) if e.holds.in_use() => return Err(RemoveError::InUse),
            Some(_) => {}
        }
        let e = st.ready.pop(key).expect("present");
        st.resident -= e.bytes;
        self.stats.removals.fetch_add(1, Ordering::Relaxed);
        drop(st);
        self.changed.notify_waiters();
        Ok(())
    }
}
