#!/usr/bin/env bash
# Builds helm (for `helm lint` / `helm template` on deploy/chart/irsa-imds) from its Go module
# through the Go module proxy, and kubernetes-validate (PyPI, strict schema validation of every
# rendered object) into a venv, both under ${IRSA_TESTBED_CACHE}, outside the repository.
# Idempotent: stamps name the versions; a warm run takes well under a second.
set -euo pipefail
cache="${IRSA_TESTBED_CACHE:-/var/cache/irsa-imds-testbed}"
HELM_VERSION="v3.19.5"
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"
bin="$cache/bin"
python="${PYTHON:-python3}"

say() { printf '[setup-helm] %s\n' "$*"; }
fail() { printf '[setup-helm] error: %s\n' "$*" >&2; exit 1; }
mkdir -p "$bin"

# --- helm ------------------------------------------------------------------------------------
if ! { [ -x "$bin/helm" ] && [ -f "$bin/helm.stamp" ] && [ "$(cat "$bin/helm.stamp")" = "$HELM_VERSION" ]; }; then
  command -v go >/dev/null 2>&1 || fail "go is not installed (needed to build helm)"
  mkdir -p "$cache/go/mod" "$cache/go/build"
  say "building helm $HELM_VERSION (Go module proxy) into $bin"
  export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOBIN="$bin" GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-modcacherw
  nice -n 10 go install -trimpath -ldflags "-s -w" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    || fail "go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION failed"
  "$bin/helm" version >/dev/null 2>&1 || fail "$bin/helm does not run"
  printf '%s' "$HELM_VERSION" > "$bin/helm.stamp"
  say "helm ready: $bin/helm"
fi

# --- kubernetes-validate ---------------------------------------------------------------------
venv="$cache/kubernetes-validate-venv"
if ! { [ -x "$bin/kubernetes-validate" ] && [ -f "$venv.stamp" ] && [ "$(cat "$venv.stamp")" = "$KUBERNETES_VALIDATE" ]; }; then
  say "installing $KUBERNETES_VALIDATE into $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv" || fail "python3 -m venv failed"
  "$venv/bin/pip" install -q "$KUBERNETES_VALIDATE" || fail "pip install $KUBERNETES_VALIDATE failed"
  ln -sf "$venv/bin/kubernetes-validate" "$bin/kubernetes-validate"
  "$bin/kubernetes-validate" --version >/dev/null 2>&1 || fail "kubernetes-validate does not run"
  printf '%s' "$KUBERNETES_VALIDATE" > "$venv.stamp"
  say "kubernetes-validate ready: $bin/kubernetes-validate"
fi
