//! `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`: named PEFT adapters added
//! and removed while the server runs, with vLLM's request shape. Only folders inside the
//! server's `--adapter-root` are loaded, and only safetensors weights (never pickles).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::completions::body_or_error;
use super::error::ApiError;
use super::openai::parse_body;
use super::ServerState;
use crate::adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};
use crate::adapters::BaseModelShape;
use crate::error::DndError;

/// What runtime loading needs: the folder adapters may come from and the base model's shape
/// they are checked against.
#[derive(Debug, Clone)]
pub struct RuntimeLoading {
    root: PathBuf,
    shape: BaseModelShape,
}

impl RuntimeLoading {
    /// Loading from under `root` (an existing folder), for a base model of `shape`.
    pub fn new(root: &Path, shape: BaseModelShape) -> crate::Result<Self> {
        let root = root.canonicalize().map_err(|e| DndError::io(root, e))?;
        if !root.is_dir() {
            return Err(DndError::InvalidInput(format!(
                "--adapter-root {}: not a folder",
                root.display()
            )));
        }
        Ok(Self { root, shape })
    }
}

const LOAD_FIELDS: &[&str] = &["lora_name", "lora_path", "load_inplace"];
const UNLOAD_FIELDS: &[&str] = &["lora_name"];

#[derive(Deserialize)]
struct LoadBody {
    lora_name: String,
    lora_path: String,
    #[serde(default)]
    load_inplace: bool,
}

#[derive(Deserialize)]
struct UnloadBody {
    lora_name: String,
}

fn runtime(state: &ServerState) -> Result<&RuntimeLoading, ApiError> {
    state.provider()?;
    state.runtime.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "runtime_loading_disabled",
            "loading adapters at runtime is off: start the server with --adapter-root DIR",
        )
    })
}

/// The PEFT folder `path` names (relative to `root`, or absolute), confined to `root` after
/// every link is resolved, its config and weights included.
fn confine(root: &Path, path: &str) -> Result<PathBuf, ApiError> {
    let outside = || {
        ApiError::bad_request(
            "adapter_path_outside_root",
            format!("lora_path {path:?} is not inside the server's adapter root"),
        )
    };
    let resolve = |p: &Path| match p.canonicalize() {
        Ok(c) if c.starts_with(root) => Ok(c),
        Ok(_) => Err(outside()),
        Err(_) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "adapter_path_not_found",
            format!("lora_path {path:?}: no such folder under the adapter root"),
        )),
    };
    if path.trim().is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "lora_path is empty",
        ));
    }
    let dir = resolve(&root.join(path))?;
    if !dir.is_dir() {
        return Err(ApiError::bad_request(
            "invalid_adapter",
            format!("lora_path {path:?} is not a folder (a PEFT folder holds {CONFIG_FILE} and {WEIGHTS_FILE})"),
        ));
    }
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.exists() {
        let pickled = dir.join("adapter_model.bin").exists();
        return Err(ApiError::bad_request(
            "invalid_adapter",
            if pickled {
                format!("lora_path {path:?}: only {WEIGHTS_FILE} weights are loaded, not pickled adapter_model.bin (convert it with PEFT's save_pretrained(safe_serialization=True))")
            } else {
                format!("lora_path {path:?} has no {WEIGHTS_FILE}")
            },
        ));
    }
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        resolve(&dir.join(file))?;
    }
    Ok(dir)
}

pub(super) async fn load(
    State(state): State<Arc<ServerState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let rt = runtime(&state)?.clone();
    let req: LoadBody = parse_body(&body_or_error(body)?, LOAD_FIELDS)?;
    let dir = confine(&rt.root, &req.lora_path)?;
    let provider = state.provider()?.clone();
    let reserved = [state.model_name.clone(), "default".to_string()];
    let name = req.lora_name.clone();
    // Reading and checking the weights is file and tensor work: off the async threads.
    let added = tokio::task::spawn_blocking(move || {
        let reserved: Vec<&str> = reserved.iter().map(String::as_str).collect();
        if req.load_inplace {
            provider.replace_peft(&name, &dir, Some(&rt.shape), &reserved)
        } else {
            provider.add_peft(&name, &dir, Some(&rt.shape), &reserved)
        }
    })
    .await
    .map_err(|e| ApiError::internal("internal_error", format!("loading task: {e}")))?;
    added.map_err(|e| match e {
        DndError::Conflict(m) => ApiError::new(
            StatusCode::CONFLICT,
            "adapter_exists",
            format!("{m} (load_inplace: true replaces it)"),
        ),
        other => ApiError::bad_request("invalid_adapter", other.to_string()),
    })?;
    tracing::info!(name = %req.lora_name, path = %req.lora_path, "adapter loaded at runtime");
    Ok(Json(json!({
        "object": "lora_adapter",
        "id": req.lora_name,
        "loaded": true,
        "message": format!("Success: LoRA adapter '{}' added successfully.", req.lora_name),
    })))
}

pub(super) async fn unload(
    State(state): State<Arc<ServerState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    runtime(&state)?;
    let req: UnloadBody = parse_body(&body_or_error(body)?, UNLOAD_FIELDS)?;
    let kind = state
        .provider()?
        .remove_named(&req.lora_name)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "adapter_not_found",
                format!("no adapter is served under the name {:?}", req.lora_name),
            )
        })?;
    tracing::info!(name = %req.lora_name, kind, "adapter unloaded at runtime");
    Ok(Json(json!({
        "object": "lora_adapter",
        "id": req.lora_name,
        "kind": kind,
        "unloaded": true,
        "message": format!("Success: LoRA adapter '{}' removed successfully.", req.lora_name),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_confined_to_the_root_after_links() {
        let base = std::env::temp_dir().join(format!("dnd-confine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (root, outside) = (base.join("root"), base.join("outside"));
        for d in [root.join("good"), root.join("pickle"), outside.join("x")] {
            std::fs::create_dir_all(d).unwrap();
        }
        for f in [CONFIG_FILE, WEIGHTS_FILE] {
            std::fs::write(root.join("good").join(f), b"{}").unwrap();
            std::fs::write(outside.join("x").join(f), b"{}").unwrap();
        }
        std::fs::write(root.join("pickle/adapter_model.bin"), b"").unwrap();
        std::fs::create_dir_all(root.join("linked")).unwrap();
        std::fs::write(root.join("linked").join(CONFIG_FILE), b"{}").unwrap();
        std::os::unix::fs::symlink(
            outside.join("x").join(WEIGHTS_FILE),
            root.join("linked").join(WEIGHTS_FILE),
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.join("x"), root.join("escape")).unwrap();
        let root = root.canonicalize().unwrap();

        let good = confine(&root, "good").unwrap();
        assert_eq!(good, root.join("good"));
        assert_eq!(confine(&root, good.to_str().unwrap()).unwrap(), good);
        let code = |p: &str| confine(&root, p).unwrap_err().code;
        assert_eq!(code("../outside/x"), "adapter_path_outside_root");
        assert_eq!(
            code(outside.join("x").to_str().unwrap()),
            "adapter_path_outside_root"
        );
        assert_eq!(code("escape"), "adapter_path_outside_root");
        assert_eq!(code("linked"), "adapter_path_outside_root");
        assert_eq!(code("nowhere"), "adapter_path_not_found");
        assert_eq!(code("good/adapter_config.json"), "invalid_adapter");
        let pickle = confine(&root, "pickle").unwrap_err();
        assert!(pickle.message.contains("pickled"), "{}", pickle.message);
        assert_eq!(code(" "), "invalid_request");
        let _ = std::fs::remove_dir_all(&base);
    }
}
