#!/usr/bin/env bash
# The test command (README, .ci/run): install the test assets, build the patched mistral.rs
# sources from pristine crates.io + patches/, run every test with the engine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
scripts/mistralrs-patch.sh prepare
cargo test --features engine "$@"
