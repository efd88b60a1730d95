//! Refuses to build against a stale patched mistral.rs: the crates under
//! `target/mistralrs-patched/` must have been made from the patches now in `patches/`
//! (`scripts/mistralrs-patch.sh prepare` records the patch set it applied in `.dnd-stamp`).

use std::fs;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=patches");
    if std::env::var_os("CARGO_FEATURE_ENGINE").is_none() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Ok(entries) = fs::read_dir(root.join("patches")) else {
        return;
    };
    let mut crates: Vec<_> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    crates.sort();
    for cv in crates {
        let mut patches: Vec<_> = fs::read_dir(root.join("patches").join(&cv))
            .expect("patches folder readable")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "patch"))
            .collect();
        patches.sort();
        let mut want = Vec::new();
        for p in &patches {
            want.extend(fs::read(p).expect("patch readable"));
        }
        let stamp = root
            .join("target/mistralrs-patched")
            .join(&cv)
            .join(".dnd-stamp");
        println!("cargo:rerun-if-changed={}", stamp.display());
        if fs::read(&stamp).ok().as_deref() != Some(want.as_slice()) {
            panic!(
                "target/mistralrs-patched/{cv} was not made from the current patches/{cv}: \
                 run `scripts/mistralrs-patch.sh prepare`"
            );
        }
    }
}
