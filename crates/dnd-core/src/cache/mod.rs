//! The adapter cache: content keys and a bounded, single-flight LRU of device-resident values.
//!
//! Engine-independent (generic over the value), so its behaviour is tested without mistral.rs;
//! the DnD provider instantiates it with the engine's adapter type.

pub mod key;
pub mod store;

pub use key::{fingerprint, normalize_prompts, route_key, AdapterKey};
pub use store::{
    AdapterCache, CacheError, CacheLimits, CacheStats, EntryInfo, Lease, Lookup, RemoveError,
    Source, Weigher, GENERATION_BUCKETS,
};

#[cfg(test)]
mod tests;
