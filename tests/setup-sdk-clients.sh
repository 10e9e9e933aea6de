#!/usr/bin/env bash
# Builds the Java and Go SDK clients of tests/clients/ once, into the test-bed cache outside the
# repository (tests/setup.sh calls this):
#   $CACHE/bin/go-legacy-client          AWS SDK for Go v1.23.0 (before web identity; IMDSv1)
#   $CACHE/bin/go-current-client         current AWS SDK for Go v2 (IMDSv2)
#   $CACHE/sdk-clients/java-legacy/      AWS SDK for Java 1.11.600 (before web identity; IMDSv1)
#   $CACHE/sdk-clients/java-current/     current AWS SDK for Java 2.x (IMDSv2)
# Each Java client is classes/ plus lib/*.jar, run offline with `java -cp`. The Maven repository
# ($CACHE/m2) and the Go module and build caches ($CACHE/go) live in the cache too.
# CACHE is ${IRSA_TESTBED_CACHE:-/var/cache/irsa-imds-testbed}. A stamp per client (a hash of its
# sources and of the toolchain) makes a warm run take a second or two.
# A client that fails to build is reported and left missing; the suite that needs it
# (tests/tests/e2e_sdks.rs) then fails and names it, while every other suite still runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${IRSA_TESTBED_CACHE:-/var/cache/irsa-imds-testbed}"
out="$cache/sdk-clients"
mkdir -p "$cache/bin" "$out/logs" "$out/stamps"
# One build at a time per cache (two checkouts may run their setup at once).
exec 9>"$out/.lock"
flock 9

say() { printf '[setup-sdk-clients] %s\n' "$*"; }
trap 'say "error: unexpected failure (line $LINENO)" >&2' ERR

# Static binaries; the same module and build caches as the other Go builds of the test bed.
export GOPATH="$cache/go" GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" CGO_ENABLED=0
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -modcacherw -buildvcs=false"
# Go's own install folder, in case this shell's PATH lacks it.
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH="$PATH:/usr/local/go/bin"
fi
mvn_args=(-B -q -Dstyle.color=never "-Dmaven.repo.local=$cache/m2")

# A hash of a client's sources (and the toolchain that builds it).
src_hash() {
  local dir="$1" tool="$2"
  {
    printf '%s\n' "$tool"
    (cd "$dir" && find . -type f -not -path './target/*' | LC_ALL=C sort | xargs sha256sum)
  } | sha256sum | cut -d' ' -f1
}

failed=()

# build NAME CHECK_PATH TOOL_VERSION COMMAND...: runs COMMAND unless the stamp matches and
# CHECK_PATH exists; logs to $out/logs/NAME.log.
build() {
  local name="$1" check="$2" tool="$3"
  shift 3
  local want
  want="$(src_hash "$here/clients/$name" "$tool")"
  if [ -e "$check" ] && [ -f "$out/stamps/$name" ] && [ "$(cat "$out/stamps/$name")" = "$want" ]; then
    return 0
  fi
  say "building $name"
  rm -rf "$out/stamps/$name" "$check"
  local start=$SECONDS
  if (cd "$here/clients/$name" && nice -n 10 "$@") >"$out/logs/$name.log" 2>&1 && [ -e "$check" ]; then
    printf '%s' "$want" > "$out/stamps/$name"
    say "built $name in $((SECONDS - start))s"
  else
    say "error: building $name failed after $((SECONDS - start))s; last lines of $out/logs/$name.log:"
    tail -n 20 "$out/logs/$name.log" | sed 's/^/    /' >&2
    failed+=("$name")
  fi
}

# --- Go ----------------------------------------------------------------------------------------
if command -v go >/dev/null 2>&1; then
  gov="$(go version) CGO_ENABLED=$CGO_ENABLED" || gov="go version failed"
  for name in go-legacy go-current; do
    build "$name" "$cache/bin/$name-client" "$gov" \
      go build -trimpath -o "$cache/bin/$name-client" .
  done
else
  say "error: go is not installed: cannot build go-legacy and go-current"
  failed+=(go-legacy go-current)
fi

# --- Java (Maven) ------------------------------------------------------------------------------
if command -v mvn >/dev/null 2>&1 && command -v java >/dev/null 2>&1; then
  # sed, not head: head closing the pipe early would fail the pipeline under pipefail.
  jv="$(java -version 2>&1 | sed -n 1p) / $(mvn -B -v 2>/dev/null | sed -n 1p)"
  for name in java-legacy java-current; do
    dest="$out/$name"
    # Fresh output each build: copy-dependencies never removes a jar a new version dropped.
    build "$name" "$dest/classes" "$jv" \
      bash -c 'rm -rf "$1" && exec mvn "${@:2}" "-DoutDir=$1" compile dependency:copy-dependencies' \
      _ "$dest" "${mvn_args[@]}"
  done
else
  say "error: java/mvn not installed: cannot build java-legacy and java-current"
  failed+=(java-legacy java-current)
fi

if [ "${#failed[@]}" -gt 0 ]; then
  say "error: not built: ${failed[*]} (tests/tests/e2e_sdks.rs will fail on them)"
else
  say "SDK clients ready in $cache"
fi
