#!/usr/bin/env bash
# Fuzz smoke run (part of tests/run.sh): builds every libFuzzer target beside the code it fuzzes
# (agent/fuzz: route, token, registration, state; cni-hook/fuzz: cni) and runs each one briefly
# from its checked-in seed corpus, so a target that no longer builds, a seed that crashes, or a
# crash found within the first seconds fails the test command. The 10-minute runs are done by
# hand with the same binaries (README, "Fuzzing").
#
# Build: coverage instrumentation only (sanitizer coverage, as cargo fuzz adds it), `--cfg
# fuzzing`, the fuzz crates' release profile (debug assertions and overflow checks on). No
# AddressSanitizer: the code under test is safe Rust, whose failures are panics (an assertion,
# an overflow, an index out of bounds), which libFuzzer reports as crashes without it; ASan
# would need a nightly flag (-Zsanitizer, RUSTC_BOOTSTRAP=1) and would slow every run. All
# flags here are stable rustc flags.
#
# The build output is kept outside the repository, in
# ${IRSA_FUZZ_TARGET_DIR:-${IRSA_TESTBED_CACHE:-/var/cache/irsa-imds-testbed}/fuzz-target}, so
# a new checkout rebuilds only the project's own crates, not the dependency tree, and an unchanged
# one nothing.
# The fuzz crates are their own workspaces with their own lockfiles, built --locked. When the
# product's dependencies change, refresh them from the workspace's lock:
#   for d in agent/fuzz cni-hook/fuzz; do cp Cargo.lock $d/Cargo.lock
#     cargo metadata --format-version 1 --manifest-path $d/Cargo.toml >/dev/null; done
#
# Without a C++ compiler (libFuzzer is C++) the run is skipped with a message, except under CI
# (CI set), where it fails. New inputs libFuzzer finds go to a temporary directory; the
# checked-in corpora stay as they are. A crash input is kept and its path printed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${IRSA_FUZZ_SMOKE_SECONDS:-10}"
cache="${IRSA_TESTBED_CACHE:-/var/cache/irsa-imds-testbed}"
target_dir="${IRSA_FUZZ_TARGET_DIR:-$cache/fuzz-target}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
say() { printf '[fuzz-smoke] %s\n' "$*"; }

if ! command -v c++ >/dev/null; then
  if [ -n "${CI:-}" ]; then
    say "FAIL: no C++ compiler (libFuzzer is C++); CI is set: the smoke run must run"
    exit 1
  fi
  say "skipped: no C++ compiler (libFuzzer is C++)"
  exit 0
fi

flags="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags="$flags -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags="$flags -Cllvm-args=-sanitizer-coverage-pc-table"
flags="$flags -Cllvm-args=-sanitizer-coverage-trace-compares"

# Runs from two checkouts go one after the other: a target's binary has one name per target dir.
mkdir -p "$(dirname "$target_dir")"
exec 9>"$target_dir.lock"
flock 9

# The project's own crates are built once per checkout path (about 55 MB each: cargo hashes the
# path of a path dependency outside the fuzz workspace), so the cache grows with every new
# checkout location; past the cap it is dropped and rebuilt once.
max_mb="${IRSA_FUZZ_CACHE_MAX_MB:-4096}"
if [ -d "$target_dir" ] && [ "$(du -sm "$target_dir" | cut -f1)" -gt "$max_mb" ]; then
  say "$target_dir is over $max_mb MB: removing it (one cold build follows)"
  rm -rf "$target_dir"
fi
mkdir -p "$target_dir"
t0=$SECONDS
for dir in agent/fuzz cni-hook/fuzz; do
  say "building $dir (into $target_dir)"
  # --target: the flags reach the fuzzed code only, not build scripts or proc macros.
  if ! RUSTFLAGS="$flags" cargo build --locked --release --quiet \
    --manifest-path "$dir/Cargo.toml" --target "$triple" --target-dir "$target_dir" --bins; then
    say "FAIL: $dir does not build (if the lockfile is stale, see the top of $0)"
    exit 1
  fi
done
say "built in $((SECONDS - t0)) s"

work="$(mktemp -d -t irsa-imds-fuzz.XXXXXX)"
keep=""
trap 'if [ -z "$keep" ]; then rm -rf "$work"; fi' EXIT
failed=0
for src in agent/fuzz/fuzz_targets/*.rs cni-hook/fuzz/fuzz_targets/*.rs; do
  dir="${src%/fuzz_targets/*}"
  name="$(basename "$src" .rs)"
  mkdir -p "$work/$name/new" "$work/$name/crash"
  seeds=()
  if [ -d "$dir/corpus/$name" ]; then seeds=("$dir/corpus/$name"); fi
  log="$work/$name/log"
  if "$target_dir/$triple/release/$name" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$work/$name/crash/" \
    "$work/$name/new" "${seeds[@]}" >"$log" 2>&1; then
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    say "$dir $name: ${runs:-?} runs in ${secs} s (seeds: $(ls "$dir/corpus/$name" 2>/dev/null | wc -l)), no crash"
  else
    say "FAIL: $dir $name crashed (input kept in $work/$name/crash/)"
    tail -n 40 "$log"
    keep=1
    failed=1
  fi
done
say "total $((SECONDS - t0)) s"
exit "$failed"
