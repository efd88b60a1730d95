//! The adapter cache: content keys and a bounded, single-flight LRU of device-resident values,
//! with an optional host-memory tier for evicted ones.
//!
//! Engine-independent (generic over the value), so its behaviour is tested without mistral.rs;
//! the DnD provider instantiates it with the engine's adapter type.

pub mod key;
pub mod store;

pub use key::{fingerprint, normalize_prompts, route_key, AdapterKey};
pub use store::{
    AdapterCache, CacheError, CacheLimits, CacheStats, EntryInfo, HostTier, Lease, Lookup,
    RemoveError, Source, Transfer, Weigher, GENERATION_BUCKETS,
};

#[cfg(test)]
mod tests;
