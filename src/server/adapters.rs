//! `/v1/adapters`: list, inspect, export and evict cached adapters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::ServerState;
use crate::cache::{AdapterKey, EntryInfo, RemoveError};
use crate::provider::{AdapterMeta, Origin, ProviderError};

/// Where an entry is: on the model's device, or in the host-memory tier.
#[derive(Clone, Copy)]
enum Tier {
    Device,
    Host,
}

fn describe(e: &EntryInfo<AdapterKey, AdapterMeta>, tier: Tier, with_prompts: bool) -> Value {
    let mut v = json!({
        "id": e.key.as_str(),
        "object": "adapter",
        "tier": match tier { Tier::Device => "device", Tier::Host => "host" },
        "bytes": e.bytes,
        "hits": e.hits,
        "age_seconds": e.age.as_secs_f64(),
        "in_use": e.in_use,
        "num_prompts": e.meta.prompts.len(),
    });
    if let Origin::Peft { name, dir } = &e.meta.origin {
        v["name"] = json!(name);
        v["peft_dir"] = json!(dir.display().to_string());
    }
    if with_prompts {
        v["prompts"] = json!(e.meta.prompts.as_slice());
    }
    v
}

pub(super) async fn list(State(state): State<Arc<ServerState>>) -> Result<Json<Value>, ApiError> {
    let p = state.provider()?;
    let cache = p.cache();
    let device = cache.entries();
    let host = cache.host_entries();
    let data: Vec<Value> = device
        .iter()
        .map(|e| describe(e, Tier::Device, false))
        .chain(host.iter().map(|e| describe(e, Tier::Host, false)))
        .collect();
    let limits = cache.limits();
    let mut body = json!({
        "object": "list",
        "data": data,
        "resident_bytes": cache.resident_bytes(),
        "budget_bytes": limits.max_bytes,
        "max_entries": limits.max_entries,
        "generator": {
            "id": p.generator_id(),
            "note": p.generator().config().note,
        },
    });
    if let Some(budget) = cache.host_budget() {
        body["host_bytes"] = json!(cache.host_usage().0);
        body["host_budget_bytes"] = json!(budget);
    }
    Ok(Json(body))
}

/// The entry with `key` in either tier (the device first).
fn find(
    state: &ServerState,
    key: &str,
) -> Result<(EntryInfo<AdapterKey, AdapterMeta>, Tier), ApiError> {
    let p = state.provider()?;
    let cache = p.cache();
    let device = cache.entries().into_iter().map(|e| (e, Tier::Device));
    let host = cache.host_entries().into_iter().map(|e| (e, Tier::Host));
    device
        .chain(host)
        .find(|(e, _)| e.key.as_str() == key)
        .ok_or_else(|| ProviderError::UnknownAdapter(key.to_string()).into())
}

pub(super) async fn show(
    State(state): State<Arc<ServerState>>,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (entry, tier) = find(&state, &key)?;
    Ok(Json(describe(&entry, tier, true)))
}

pub(super) async fn remove(
    State(state): State<Arc<ServerState>>,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let p = state.provider()?;
    let unknown = || ApiError::from(ProviderError::UnknownAdapter(key.clone()));
    let k = AdapterKey::parse(&key).ok_or_else(unknown)?;
    match p.cache().remove(&k) {
        Ok(()) => Ok(Json(
            json!({"id": key, "object": "adapter", "deleted": true}),
        )),
        Err(RemoveError::NotFound) => Err(unknown()),
        Err(RemoveError::InUse) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "adapter_in_use",
            format!("adapter {key} is serving running requests; retry when they finish"),
        )),
    }
}

/// The adapter as a tar of its PEFT folder (`<key>/adapter_config.json`,
/// `<key>/adapter_model.safetensors`).
pub(super) async fn export(
    State(state): State<Arc<ServerState>>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let p = state.provider()?;
    let adapter = p.export(&key).await?;
    let base = p.options().base_model_id.clone();
    let k = key.clone();
    let tar = tokio::task::spawn_blocking(move || -> crate::Result<Vec<u8>> {
        // A folder of its own per export: two exports of one key may run at once.
        static EXPORTS: AtomicU64 = AtomicU64::new(0);
        let n = EXPORTS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dnd-export-{}-{n}-{k}", std::process::id()));
        let packed = adapter.save_peft(&dir, Some(&base)).and_then(|()| {
            let mut builder = tar::Builder::new(Vec::new());
            builder
                .append_dir_all(&k, &dir)
                .and_then(|_| builder.into_inner())
                .map_err(|e| crate::DndError::io(&dir, e))
        });
        let _ = std::fs::remove_dir_all(&dir);
        packed
    })
    .await
    .map_err(|e| ApiError::internal("export_failed", e.to_string()))?
    .map_err(|e| ApiError::internal("export_failed", e.to_string()))?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{key}.tar\""),
            ),
        ],
        tar,
    )
        .into_response())
}
