#!/usr/bin/env bash
# Installs what the tests need, idempotently (a stamp per component; a second run takes seconds):
#   tests/.deps/venv         moto[server] + current boto3 (IMDSv2 client)
#   tests/.deps/legacy-venv  boto3 1.9.199 / botocore 1.12.199: the last before web identity
#   tests/.deps/node         aws-sdk for JavaScript 2.400.0 (before web identity)
#   iptables, iproute2       Debian packages, only if missing
# Override the location with IRSA_TESTBED_DEPS.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
deps="${IRSA_TESTBED_DEPS:-$here/.deps}"
mkdir -p "$deps"
python="${PYTHON:-python3}"

MOTO_PKGS=("moto[server]==5.2.5" "boto3==1.44.5")
LEGACY_PKGS=("boto3==1.9.199" "botocore==1.12.199")
NODE_PKG="aws-sdk@2.400.0"

say() { printf '[setup] %s\n' "$*"; }
fail() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

stamp_ok() { [ -f "$deps/$1.stamp" ] && [ "$(cat "$deps/$1.stamp")" = "$2" ]; }
stamp() { printf '%s' "$2" > "$deps/$1.stamp"; }

# --- Debian packages -------------------------------------------------------------------------
need=()
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
if [ "${#need[@]}" -gt 0 ]; then
  say "installing Debian packages: ${need[*]}"
  if [ "$(id -u)" -ne 0 ]; then fail "need root to install ${need[*]}"; fi
  apt-get update -qq >/dev/null || say "apt-get update failed; trying the install anyway"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null || fail "apt-get install ${need[*]} failed"
fi

# --- moto + current boto3 --------------------------------------------------------------------
want="${MOTO_PKGS[*]}"
if ! stamp_ok venv "$want" || ! "$deps/venv/bin/python" -c "import moto, boto3" 2>/dev/null; then
  say "creating $deps/venv (${MOTO_PKGS[*]})"
  rm -rf "$deps/venv"
  "$python" -m venv "$deps/venv" || fail "python3 -m venv failed"
  "$deps/venv/bin/pip" install -q "${MOTO_PKGS[@]}" || fail "pip install ${MOTO_PKGS[*]} failed"
  "$deps/venv/bin/python" -c "import moto, boto3" || fail "moto/boto3 do not import"
  stamp venv "$want"
fi

# --- legacy botocore (no web identity) -------------------------------------------------------
want="${LEGACY_PKGS[*]}+shim1"
if ! stamp_ok legacy-venv "$want" || ! "$deps/legacy-venv/bin/python" -c "import boto3" 2>/dev/null; then
  say "creating $deps/legacy-venv (${LEGACY_PKGS[*]})"
  rm -rf "$deps/legacy-venv"
  "$python" -m venv "$deps/legacy-venv" || fail "python3 -m venv failed"
  "$deps/legacy-venv/bin/pip" install -q "${LEGACY_PKGS[@]}" || fail "pip install ${LEGACY_PKGS[*]} failed"
  site="$("$deps/legacy-venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # botocore 1.12 (and its vendored requests/urllib3) import ABCs from `collections`, which
  # Python 3.10 removed: alias them back before anything imports botocore.
  cat > "$site/sitecustomize.py" <<'PY'
import collections
import collections.abc
for _name in ("Mapping", "MutableMapping", "Sequence", "MutableSequence", "Set", "MutableSet",
              "Callable", "Iterable", "Iterator", "Hashable", "Sized", "Container", "OrderedDict"):
    if not hasattr(collections, _name) and hasattr(collections.abc, _name):
        setattr(collections, _name, getattr(collections.abc, _name))
PY
  "$deps/legacy-venv/bin/python" -c "import boto3, botocore; assert botocore.__version__ == '1.12.199', botocore.__version__" \
    || fail "legacy boto3 does not import"
  stamp legacy-venv "$want"
fi

# --- aws-sdk for JavaScript 2.400.0 ----------------------------------------------------------
if ! stamp_ok node "$NODE_PKG" || ! NODE_PATH="$deps/node/node_modules" node -e "require('aws-sdk')" 2>/dev/null; then
  say "installing $NODE_PKG into $deps/node"
  mkdir -p "$deps/node"
  npm install --silent --no-audit --no-fund --prefix "$deps/node" "$NODE_PKG" >/dev/null || fail "npm install $NODE_PKG failed"
  NODE_PATH="$deps/node/node_modules" node -e "const A=require('aws-sdk'); if (A.VERSION !== '2.400.0') { throw new Error(A.VERSION) }" \
    || fail "aws-sdk does not load"
  stamp node "$NODE_PKG"
fi

bash "$here/setup-sdk-clients.sh"  # Java and Go SDK clients, built into the test-bed cache
bash "$here/setup-helm.sh"         # helm and kubernetes-validate (chart tests), into the test-bed cache
bash "$here/setup-promtool.sh" && bash "$here/setup-awscli.sh" # docs/: promtool for deploy/prometheus-rules.yaml, the install guide's awscli 1.16
bash "$here/setup-controlplane.sh"  # etcd, kube-apiserver, kubectl (Go) into $IRSA_TESTBED_CACHE/bin

say "dependencies ready in $deps"
