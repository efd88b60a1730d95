//! Adapter-affinity routing behind a real load balancer: `scripts/affinity.py` starts three
//! `mistralrs-server` replicas (golden tiny Qwen2, a small random generator) and Debian's
//! nginx in front of them on loopback (`scripts/fetch-assets.sh nginx` installs it), then
//! sends round-robin, hashed and failover phases. The script checks the invariants on every
//! answer (always an adapter, the same adapter key for a condition on any replica, the
//! routing key the client computed, residency in the replicas' metrics) and exits non-zero on
//! a violation; this test also checks the figures the README reports.
#![cfg(feature = "server")]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::tiny_generator;

#[test]
fn affinity_routing_generates_each_condition_once_and_survives_a_killed_replica() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("dnd-routing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gen = tiny_generator(&dir);
    let out_json = dir.join("affinity.json");
    let (sets, requests) = (8, 32);
    let out = Command::new("python3")
        .arg(root.join("scripts/affinity.py"))
        .arg("--server")
        .arg(env!("CARGO_BIN_EXE_mistralrs-server"))
        .arg("--generator")
        .arg(&gen)
        .args(["--replicas", "3", "--concurrency", "4", "--max-tokens", "4"])
        .args([
            "--sets",
            &sets.to_string(),
            "--requests",
            &requests.to_string(),
        ])
        .arg("--out-json")
        .arg(&out_json)
        .args(["--", "plain", "-m"])
        .arg(common::golden_path("tiny-qwen2"))
        .args(["-d", "f32"])
        .current_dir(&root)
        .output()
        .expect("python3 runs scripts/affinity.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "affinity run failed:\n{stdout}\n{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out_json).unwrap()).unwrap();
    assert_eq!(report["violations"], serde_json::json!([]));
    let phase = |name: &str| {
        report["summary"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["phase"] == name)
            .unwrap_or_else(|| panic!("no {name} phase"))
            .clone()
    };
    let (rr, aff, fail) = (phase("round-robin"), phase("affinity"), phase("failover"));
    for p in [&rr, &aff, &fail] {
        assert_eq!(p["answered"], requests, "{p}");
    }
    // Hashed: each condition generated once, on one replica; 8 conditions over 3 replicas
    // (coprime) round-robin reach every replica, so each is generated more than once.
    assert_eq!(aff["generations"], sets, "{aff}");
    let rr_generations = rr["generations"].as_u64().unwrap();
    assert!(rr_generations > sets as u64, "{rr}");
    assert!(aff["hit_rate"].as_f64().unwrap() > rr["hit_rate"].as_f64().unwrap());
    // Failover: a replica was killed mid-phase, every request still answered by its adapter
    // (the violations list is empty); the killed replica's conditions were generated again.
    assert!(fail["killed_replica"].is_u64(), "{fail}");
    assert!(
        fail["generations"].as_u64().unwrap() > sets as u64,
        "{fail}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
