#!/usr/bin/env bash
# The test command: installs what the tests need, builds once, runs the gates and every suite.
# CI (.ci/run) runs exactly this. Needs root for the network-namespace suites (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each part says how long it took, and the end prints them all: the time budget (under 50 min
# on a new 2-core machine, under 25 warm) is checked part by part.
parts=""
part_name=""
part_start=$SECONDS
section() {
  if [ -n "$part_name" ]; then
    parts="$parts$(printf '  %5d s  %s' $((SECONDS - part_start)) "$part_name")"$'\n'
  fi
  part_name="$1"
  part_start=$SECONDS
  echo "== $1 (at $SECONDS s)"
}

# The dependencies (tests/setup.sh: Go, Maven, pip and npm, mostly downloads and Go builds on a
# new machine, seconds when warm) install in the background while the Rust side is checked and
# built, which needs none of them; the tests wait for them. Their own process group, so a failure
# below stops them too.
section "dependencies (tests/setup.sh, in the background until the tests)"
setup_log="$(mktemp -t irsa-imds-setup.XXXXXX)"
set -m
( s=$SECONDS; rc=0; bash tests/setup.sh || rc=$?; echo "[setup] took $((SECONDS - s)) s"; exit $rc ) </dev/null >"$setup_log" 2>&1 &
setup_pid=$!
set +m
trap 'if [ -n "$setup_pid" ]; then kill -- -"$setup_pid" 2>/dev/null || true; fi; rm -f "$setup_log"' EXIT

section "format"
cargo fmt --all -- --check
# The fuzz targets are their own workspaces, outside `--all`.
rustfmt --check --edition 2024 agent/fuzz/fuzz_targets/*.rs cni-hook/fuzz/fuzz_targets/*.rs

section "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

section "build (one build shared by every suite)"
cargo build --workspace --all-targets --locked

section "static CNI plugin (what ships to nodes; tests/build-static-cni.sh)"
bash tests/build-static-cni.sh

section "fuzz smoke (tests/fuzz-smoke.sh: each fuzz target built into the cache, run briefly from its seeds)"
# Before the wait: on a new machine its build overlaps the setup's downloads and Go builds.
bash tests/fuzz-smoke.sh

section "dependencies (waiting for tests/setup.sh)"
setup_rc=0
wait "$setup_pid" || setup_rc=$?
setup_pid=""
cat "$setup_log"
if [ "$setup_rc" -ne 0 ]; then
  echo "tests/setup.sh failed ($setup_rc)" >&2
  exit 1
fi

section "tests"
# Suites run one binary at a time; tests inside a binary run in parallel.
cargo test --workspace --locked --no-fail-fast -- --test-threads="${TEST_THREADS:-4}"

section "demo check"
# The binary the workspace build made (a `cargo run -p` would rebuild with other features).
"${CARGO_TARGET_DIR:-target}/debug/demo" --check

section "done"
printf 'time per part (wall; the dependencies ran in the background from the start):\n%s' "$parts"
echo "all green in $SECONDS s"
