//! `GET /metrics`: Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::ServerState;
use crate::cache::GENERATION_BUCKETS;

/// Requests answered, by endpoint and status.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    counts: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

impl HttpMetrics {
    /// Counts one answered request.
    pub fn record(&self, endpoint: &'static str, status: u16) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((endpoint, status))
            .or_default() += 1;
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

pub(super) async fn prometheus(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP dnd_http_requests_total Requests answered, by endpoint and status.\n\
         # TYPE dnd_http_requests_total counter"
    );
    for ((endpoint, status), n) in state
        .metrics
        .counts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let _ = writeln!(
            out,
            "dnd_http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
        );
    }
    if let Some(p) = &state.provider {
        let cache = p.cache();
        let s = cache.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let counters = [
            (
                "dnd_adapter_cache_hits_total",
                "Requests served a cached adapter.",
                &s.hits,
            ),
            (
                "dnd_adapter_cache_misses_total",
                "Requests that generated an adapter.",
                &s.misses,
            ),
            (
                "dnd_adapter_cache_joins_total",
                "Requests that waited for another request's generation of the same adapter.",
                &s.joins,
            ),
            (
                "dnd_adapter_cache_evictions_total",
                "Adapters evicted to make room.",
                &s.evictions,
            ),
            (
                "dnd_adapter_cache_removals_total",
                "Adapters removed on request.",
                &s.removals,
            ),
            (
                "dnd_adapter_generation_failures_total",
                "Failed generations.",
                &s.failures,
            ),
            (
                "dnd_adapter_cache_busy_total",
                "Requests refused because every cached adapter stayed in use.",
                &s.busy,
            ),
        ];
        for (name, help, v) in counters {
            metric(&mut out, name, "counter", help, load(v));
        }
        let limits = cache.limits();
        metric(
            &mut out,
            "dnd_adapter_bytes_resident",
            "gauge",
            "Bytes of cached adapters on the model's device (including generations in flight).",
            cache.resident_bytes(),
        );
        metric(
            &mut out,
            "dnd_adapter_bytes_resident_peak",
            "gauge",
            "Highest dnd_adapter_bytes_resident since start.",
            load(&s.peak_bytes),
        );
        metric(
            &mut out,
            "dnd_adapter_bytes_budget",
            "gauge",
            "Cache byte budget.",
            limits.max_bytes,
        );
        metric(
            &mut out,
            "dnd_adapter_cache_entries",
            "gauge",
            "Cached adapters.",
            cache.len(),
        );
        metric(
            &mut out,
            "dnd_adapter_cache_max_entries",
            "gauge",
            "Cache entry limit.",
            limits.max_entries,
        );
        let _ = writeln!(
            out,
            "# HELP dnd_adapter_generation_seconds Time to generate an adapter.\n\
             # TYPE dnd_adapter_generation_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in GENERATION_BUCKETS.iter().enumerate() {
            cumulative += load(&s.generation_buckets[i]);
            let _ = writeln!(
                out,
                "dnd_adapter_generation_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += load(&s.generation_buckets[GENERATION_BUCKETS.len()]);
        let _ = writeln!(
            out,
            "dnd_adapter_generation_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "dnd_adapter_generation_seconds_sum {}\ndnd_adapter_generation_seconds_count {}",
            load(&s.generation_micros) as f64 / 1e6,
            load(&s.generations)
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
