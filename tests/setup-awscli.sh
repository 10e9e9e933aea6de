#!/usr/bin/env bash
# Installs the AWS CLI 1.16.209 (botocore 1.12.199: no web identity, metadata service only) into a
# venv in the test-bed cache, outside the repository, for the install guide's verify step
# (docs/install.md, "Verify with an old SDK"). Idempotent: a stamp names the version.
set -euo pipefail
cache="${IRSA_TESTBED_CACHE:-/var/cache/irsa-imds-testbed}"
AWSCLI_PKGS=("awscli==1.16.209" "botocore==1.12.199")
venv="$cache/awscli-1.16"
want="${AWSCLI_PKGS[*]}+shim1"
python="${PYTHON:-python3}"

say() { printf '[setup-awscli] %s\n' "$*"; }
fail() { printf '[setup-awscli] error: %s\n' "$*" >&2; exit 1; }

if [ -f "$venv/stamp" ] && [ "$(cat "$venv/stamp")" = "$want" ] && [ -x "$venv/bin/aws" ]; then
  exit 0
fi
say "creating $venv (${AWSCLI_PKGS[*]})"
rm -rf "$venv"
mkdir -p "$cache"
"$python" -m venv "$venv" || fail "python3 -m venv failed"
"$venv/bin/pip" install -q "${AWSCLI_PKGS[@]}" || fail "pip install ${AWSCLI_PKGS[*]} failed"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# botocore 1.12's vendored requests/urllib3 import ABCs from `collections`, which Python 3.10
# removed: alias them back before anything imports botocore (the CLI itself is unchanged).
cat > "$site/sitecustomize.py" <<'PY'
import collections
import collections.abc
for _name in ("Mapping", "MutableMapping", "Sequence", "MutableSequence", "Set", "MutableSet",
              "Callable", "Iterable", "Iterator", "Hashable", "Sized", "Container", "OrderedDict"):
    if not hasattr(collections, _name) and hasattr(collections.abc, _name):
        setattr(collections, _name, getattr(collections.abc, _name))
PY
"$venv/bin/aws" --version 2>&1 | grep -q 'aws-cli/1.16.209' || fail "aws --version is not 1.16.209"
printf '%s' "$want" > "$venv/stamp"
say "aws-cli 1.16.209 ready: $venv/bin/aws"
