#!/usr/bin/env bash
# Deliberately broken agents: applies each mutation below, one at a time, to a scratch copy of the
# repository (outside it, under mktemp -d, with its own CARGO_TARGET_DIR seeded from the current
# one) and runs the tests that claim to catch it. Every mutation must make them fail; a mutation
# that survives, or whose code pattern is no longer found (the code moved: update the pattern
# here), makes the script exit non-zero. Not part of tests/run.sh (a few minutes per mutation).
#
#   bash tests/mutations.sh            # all
#   bash tests/mutations.sh del-revoke # only the named ones
#
# Needs what the suites need (tests/setup.sh: moto), and a built workspace to seed from.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SEED_TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
export IRSA_TESTBED_DEPS=${IRSA_TESTBED_DEPS:-$ROOT/tests/.deps}

# NAME|description|apply function|suite;suite...  (a suite is "test-binary [name filter]")
MUTATIONS=(
  "sts-constant-token|STS receives a constant string instead of the pod's token|m_sts_token|agent_imds;cni_registration ip_reuse"
  "garbage-secret|served SecretAccessKey and Token are garbage (key id kept)|m_garbage|agent_moto;agent_imds;cni_registration ip_reuse"
  "del-revoke|CNI DEL no longer revokes the IP|m_del_revoke|cni_registration ip_reuse"
  "max-attempts|no STS retries (MAX_ATTEMPTS = 1)|m_max_attempts|agent_imds retried"
  "single-flight|no single flight (concurrent misses each fetch)|m_single_flight|agent_imds concurrent_first_requests"
)

SELECTED=()
for m in "${MUTATIONS[@]}"; do
  name=${m%%|*}
  if [ $# -eq 0 ]; then
    SELECTED+=("$m")
  else
    for o in "$@"; do [ "$o" = "$name" ] && SELECTED+=("$m"); done
  fi
done
for o in "$@"; do
  if ! printf '%s\n' "${MUTATIONS[@]}" | grep -q "^$o|"; then
    echo "unknown mutation: $o (known: $(printf '%s\n' "${MUTATIONS[@]}" | cut -d'|' -f1 | tr '\n' ' '))" >&2
    exit 2
  fi
done


SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/irsa-mutations.XXXXXX")
cleanup() { rm -rf "$SCRATCH"; }
trap cleanup EXIT
SRC=$SCRATCH/src
mkdir -p "$SRC"
# Each suite's output: MUTATIONS_LOGS=DIR keeps them after the run.
LOGS=${MUTATIONS_LOGS:-$SCRATCH/logs}
mkdir -p "$LOGS"
CURRENT=baseline
# The working tree as it is (uncommitted changes included), without build output or test deps.
tar -C "$ROOT" --exclude=./target --exclude=./tests/.deps --exclude=./.git -cf - . | tar -C "$SRC" -xf -
if [ -d "$SEED_TARGET/debug" ]; then
  echo "== seeding $SCRATCH/target from $SEED_TARGET"
  mkdir -p "$SCRATCH/target"
  cp -a --reflink=auto "$SEED_TARGET/debug" "$SCRATCH/target/"
fi
export CARGO_TARGET_DIR=$SCRATCH/target

# replace FILE FROM TO: exact-string replacement that must match exactly once.
replace() {
  python3 - "$SRC/$1" "$2" "$3" <<'PY'
import sys
path, old, new = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path).read()
n = text.count(old)
if n != 1:
    sys.exit(f"pattern found {n} times in {path} (expected once): the code moved, update tests/mutations.sh\n--- pattern ---\n{old}")
open(path, "w").write(text.replace(old, new))
PY
}

# run SUITE [FILTER]: runs one test binary of the test bed; fails if no test ran.
run() {
  local log t0=$SECONDS
  log=$LOGS/$CURRENT-$1${2:+-$2}.log
  set +e
  (cd "$SRC" && cargo test -q --workspace --locked --test "$1" -- ${2:+"$2"} --test-threads=4) >"$log" 2>&1
  local rc=$?
  set -e
  local took="$((SECONDS - t0)) s"
  if grep -qE "^test result: ok\. 0 passed" "$log" && ! grep -qE "^test result: ok\. [1-9]" "$log"; then
    echo "    $1 ${2:-}: NO TEST MATCHED (filter moved?) ($took)"
    return 2
  fi
  if [ $rc -eq 0 ]; then
    echo "    $1 ${2:-}: passed ($took)"
    return 0
  fi
  if grep -qE "^error(\[E[0-9]+\])?:" "$log" && ! grep -q "^test result" "$log"; then
    echo "    $1 ${2:-}: DID NOT BUILD ($took)"
    tail -20 "$log" | sed 's/^/      /'
    return 2
  fi
  # Each failed test prints a "---- NAME stdout ----" block (also under cargo test -q).
  echo "    $1 ${2:-}: FAILED ($(grep -cE '^---- .* stdout ----$' "$log") failing tests: $(grep -E '^---- .* stdout ----$' "$log" | sed -E 's/^---- (.*) stdout ----$/\1/' | tr '\n' ' ')) ($took)"
  return 1
}

declare -A RESULT
# mutate NAME "description" APPLY SUITE...: a fresh copy of agent/, APPLY, then each SUITE ("binary
# [filter]") must fail; caught only if every one of them does.
mutate() {
  local name=$1 desc=$2 apply=$3 t0=$SECONDS
  shift 3
  CURRENT=$name
  echo "== $name: $desc"
  # A fresh source tree for each mutation. The restored files keep their old times, which cargo
  # would take for "unchanged": every mutation edits the agent crate, so it is rebuilt anyway.
  rm -rf "$SRC/agent" && tar -C "$ROOT" -cf - agent | tar -C "$SRC" -xf -
  if ! $apply; then
    RESULT[$name]="PATTERN NOT FOUND"
    return
  fi
  local caught=0 errors=0
  for suite in "$@"; do
    local r=0
    # shellcheck disable=SC2086
    run $suite || r=$?
    case $r in
      1) caught=$((caught + 1)) ;;
      2) errors=$((errors + 1)) ;;
    esac
  done
  local took="$((SECONDS - t0)) s"
  if [ $errors -gt 0 ]; then
    RESULT[$name]="ERROR ($took)"
  elif [ $caught -eq $# ]; then
    RESULT[$name]="caught by all $# suites ($took)"
  elif [ $caught -gt 0 ]; then
    RESULT[$name]="caught by only $caught of $# suites ($took)"
  else
    RESULT[$name]="SURVIVED ($took)"
  fi
}

m_sts_token() {
  replace agent/src/identity/sts.rs \
    '.web_identity_token(req.web_identity_token.expose())' \
    '.web_identity_token("constant-token")'
}
m_garbage() {
  replace agent/src/imds/wire.rs \
    $'        secret_access_key: secret,\n        token,\n' \
    $'        secret_access_key: { let _ = secret; "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzzzzzzzzz" },\n        token: { let _ = token; "IQoJb3JpZ2luX2VjEGARBAGE" },\n'
}
m_del_revoke() {
  replace agent/src/pods/mod.rs \
    $'            unindex_reg(&mut st, &entry.reg);\n            for ip in &entry.reg.ips {\n                st.revoke(*ip, &entry, now);\n            }\n            Some(entry.reg)' \
    $'            unindex_reg(&mut st, &entry.reg);\n            let _ = now;\n            Some(entry.reg)'
}
m_max_attempts() {
  replace agent/src/identity/cache.rs 'const MAX_ATTEMPTS: u32 = 3;' 'const MAX_ATTEMPTS: u32 = 1;'
}
m_single_flight() {
  replace agent/src/identity/cache.rs \
    'let _guard = slot.fetch.lock().await;' \
    'let _guard = ();'
}

# Control: unmutated, every suite the selected mutations name passes (else a "caught" would mean
# nothing). The first run also builds the scratch copy.
echo "== baseline: no mutation"
t0=$SECONDS
rm -rf "$SRC/agent" && tar -C "$ROOT" -cf - agent | tar -C "$SRC" -xf -
bad=0
while IFS= read -r suite; do
  # shellcheck disable=SC2086
  run $suite || bad=1
done < <(printf '%s\n' "${SELECTED[@]}" | cut -d'|' -f4 | tr ';' '\n' | sort -u)
if [ $bad -ne 0 ]; then
  echo "baseline failed: fix the suites before judging mutations"
  exit 1
fi
echo "   baseline took $((SECONDS - t0)) s"

for m in "${SELECTED[@]}"; do
  IFS='|' read -r name desc apply suites <<<"$m"
  IFS=';' read -r -a suite_list <<<"$suites"
  mutate "$name" "$desc" "$apply" "${suite_list[@]}"
done

echo
echo "== summary"
status=0
for m in "${SELECTED[@]}"; do
  name=${m%%|*}
  printf '  %-20s %s\n' "$name" "${RESULT[$name]}"
  case ${RESULT[$name]} in
    "caught by all"*) ;;
    *) status=1 ;;
  esac
done
exit $status
