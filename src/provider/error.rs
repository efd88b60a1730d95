//! Why the provider could not give a request its adapter.

use std::fmt;
use std::time::Duration;

use crate::policy::PolicyError;

/// A failed generation.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationError {
    /// The generator (or the copy to the device) failed.
    Failed(String),
    /// The generated weights hold NaN or infinite values.
    NonFinite(String),
}

impl fmt::Display for GenerationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed(m) => write!(f, "adapter generation failed: {m}"),
            Self::NonFinite(m) => write!(f, "the generator produced an unusable adapter: {m}"),
        }
    }
}

impl From<crate::error::DndError> for GenerationError {
    /// Non-finite weights keep their own kind (and client code); anything else failed.
    fn from(e: crate::error::DndError) -> Self {
        match e {
            crate::error::DndError::NonFinite(m) => Self::NonFinite(m),
            other => Self::Failed(other.to_string()),
        }
    }
}

/// A request the provider could not serve.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderError {
    /// The request's prompts were refused by the policy.
    Policy(PolicyError),
    /// The request named an adapter key that is not cached.
    UnknownAdapter(String),
    /// Every cached adapter stayed in use for the whole wait.
    CacheBusy(Duration),
    /// One adapter is larger than the cache budget.
    TooLarge {
        /// Bytes of one adapter.
        bytes: usize,
        /// The budget.
        budget: usize,
    },
    /// The generation failed.
    Generation(GenerationError),
}

impl ProviderError {
    /// A stable machine-readable code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Policy(p) => p.code(),
            Self::UnknownAdapter(_) => "adapter_not_found",
            Self::CacheBusy(_) => "adapter_cache_busy",
            Self::TooLarge { .. } => "adapter_too_large",
            Self::Generation(GenerationError::Failed(_)) => "generation_failed",
            Self::Generation(GenerationError::NonFinite(_)) => "adapter_not_finite",
        }
    }

    /// Whether the request itself is at fault (as opposed to the server).
    pub fn is_client_error(&self) -> bool {
        matches!(self, Self::Policy(_) | Self::UnknownAdapter(_))
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Policy(p) => p.fmt(f),
            Self::UnknownAdapter(k) => write!(f, "no cached adapter has key {k:?}"),
            Self::CacheBusy(w) => write!(
                f,
                "every cached adapter stayed in use for {:.1} s; retry later",
                w.as_secs_f64()
            ),
            Self::TooLarge { bytes, budget } => write!(
                f,
                "an adapter takes {bytes} bytes, more than the cache budget of {budget}"
            ),
            Self::Generation(g) => g.fmt(f),
        }
    }
}

impl std::error::Error for ProviderError {}

impl From<PolicyError> for ProviderError {
    fn from(e: PolicyError) -> Self {
        Self::Policy(e)
    }
}
