#!/usr/bin/env bash
# The test command: installs what the tests need, builds once, runs the gates and every suite.
# CI (.ci/run) runs exactly this. Needs root for the network-namespace suites (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== dependencies (tests/setup.sh)"
bash tests/setup.sh

echo "== format"
cargo fmt --all -- --check

echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build (one build shared by every suite)"
cargo build --workspace --all-targets --locked

echo "== static CNI plugin (what ships to nodes; tests/build-static-cni.sh)"
bash tests/build-static-cni.sh

echo "== tests"
# Suites run one binary at a time; tests inside a binary run in parallel.
cargo test --workspace --locked --no-fail-fast -- --test-threads="${TEST_THREADS:-4}"

echo "== demo check"
# The binary the workspace build made (a `cargo run -p` would rebuild with other features).
"${CARGO_TARGET_DIR:-target}/debug/demo" --check

echo "all green"
