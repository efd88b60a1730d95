//! `GET /metrics`: Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ServerState;
use crate::cache::GENERATION_BUCKETS;

/// Requests answered, by endpoint and status, and requests in progress.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    counts: Mutex<BTreeMap<(String, u16), u64>>,
    /// Completion requests not yet handed to the engine (reading, waiting for their adapter).
    waiting: Arc<AtomicI64>,
    /// Completion requests the engine is answering.
    running: Arc<AtomicI64>,
}

/// One completion request in progress: counted as waiting, then (after [`running`]) as
/// running, until dropped.
///
/// [`running`]: RequestGauge::running
#[derive(Debug)]
pub struct RequestGauge {
    waiting: Arc<AtomicI64>,
    running: Arc<AtomicI64>,
    is_running: bool,
}

impl RequestGauge {
    /// The request has reached the engine.
    pub fn running(&mut self) {
        if !self.is_running {
            self.is_running = true;
            self.running.fetch_add(1, Ordering::Relaxed);
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for RequestGauge {
    fn drop(&mut self) {
        let counter = if self.is_running {
            &self.running
        } else {
            &self.waiting
        };
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HttpMetrics {
    /// Counts a completion request as waiting until the gauge says otherwise or is dropped.
    pub fn waiting(&self) -> RequestGauge {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        RequestGauge {
            waiting: self.waiting.clone(),
            running: self.running.clone(),
            is_running: false,
        }
    }

    /// Counts one answered request.
    pub fn record(&self, endpoint: &str, status: u16) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
    }
}

/// Counts every request a route answered, under the route's path (requests for no route are
/// not counted: their paths are the clients' to choose).
pub(super) async fn count(
    State(state): State<Arc<ServerState>>,
    request: Request,
    next: Next,
) -> Response {
    let endpoint = request.extensions().get::<MatchedPath>().cloned();
    let response = next.run(request).await;
    if let Some(endpoint) = endpoint {
        state
            .metrics
            .record(endpoint.as_str(), response.status().as_u16());
    }
    response
}

/// vLLM's `lora_requests_info` in our namespace, the shape the Gateway API inference
/// extension's endpoint picker reads: `running_lora_adapters` lists what is resident and ready
/// (a generated adapter by its condition's routing key, the `x-dnd-key` a gateway hashes on; a
/// named PEFT adapter by its name), `waiting_lora_adapters` the generations in flight, and
/// `max_lora` the cache's entry limit. The value is the time of the reading, as in vLLM.
fn lora_info(out: &mut String, p: &crate::provider::DndProvider) {
    use crate::provider::{AdapterMeta, Origin};
    let label = |meta: &AdapterMeta| match &meta.origin {
        Origin::Generated => crate::cache::route_key(&meta.prompts),
        Origin::Peft { name, .. } => name.clone(),
    };
    let cache = p.cache();
    let running: Vec<String> = cache.entries().iter().map(|e| label(&e.meta)).collect();
    let waiting: Vec<String> = cache.in_flight().iter().map(|(_, m)| label(m)).collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let _ = writeln!(
        out,
        "# HELP dnd:lora_requests_info Adapters resident (running) and being generated \
         (waiting), as vLLM's lora_requests_info.\n# TYPE dnd:lora_requests_info gauge\n\
         dnd:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",\
         waiting_lora_adapters=\"{}\"}} {now}",
        cache.limits().max_entries,
        running.join(","),
        waiting.join(","),
    );
    metric(
        out,
        "dnd:adapter_cache_usage_perc",
        "gauge",
        "Share of the adapter cache's byte budget in use, 0 to 1 (the adapters' counterpart of \
         vLLM's kv_cache_usage_perc; this CPU engine has no fixed KV-cache pool to report).",
        cache.resident_bytes() as f64 / cache.limits().max_bytes.max(1) as f64,
    );
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
    let m = &state.metrics;
    metric(
        &mut out,
        "dnd:num_requests_running",
        "gauge",
        "Completion requests the engine is answering (vLLM's num_requests_running).",
        m.running.load(Ordering::Relaxed).max(0),
    );
    metric(
        &mut out,
        "dnd:num_requests_waiting",
        "gauge",
        "Completion requests not yet handed to the engine, most waiting for their adapter \
         (vLLM's num_requests_waiting).",
        m.waiting.load(Ordering::Relaxed).max(0),
    );
    if let Some(p) = &state.provider {
        lora_info(&mut out, p);
        let cache = p.cache();
        let s = cache.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let counters = [
            (
                "dnd_adapter_cache_hits_total",
                "Requests served an adapter ready on the device (copies back from host memory count in dnd_adapter_host_restores_total).",
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
        if let Some(budget) = cache.host_budget() {
            let (bytes, entries) = cache.host_usage();
            let host = [
                (
                    "dnd_adapter_host_bytes",
                    "gauge",
                    "Bytes of evicted adapters held in host memory.",
                    bytes as u64,
                ),
                (
                    "dnd_adapter_host_bytes_budget",
                    "gauge",
                    "Host-memory tier byte budget.",
                    budget as u64,
                ),
                (
                    "dnd_adapter_host_entries",
                    "gauge",
                    "Evicted adapters held in host memory.",
                    entries as u64,
                ),
                (
                    "dnd_adapter_host_offloads_total",
                    "counter",
                    "Evicted adapters copied to host memory.",
                    load(&s.offloads),
                ),
                (
                    "dnd_adapter_host_restores_total",
                    "counter",
                    "Requests served an adapter copied back from host memory.",
                    load(&s.restores),
                ),
                (
                    "dnd_adapter_host_drops_total",
                    "counter",
                    "Adapters dropped from host memory for room (or whose copy failed).",
                    load(&s.host_drops),
                ),
            ];
            for (name, kind, help, v) in host {
                metric(&mut out, name, kind, help, v);
            }
        }
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
