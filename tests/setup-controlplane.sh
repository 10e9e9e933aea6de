#!/usr/bin/env bash
# Builds the real Kubernetes control plane the test bed starts (tests/src/controlplane.rs):
#   kube-apiserver, kubectl   k8s.io/kubernetes (pinned in tests/controlplane/go.mod)
#   etcd                      go.etcd.io/etcd/server/v3 (pinned in tests/controlplane/etcd/go.mod;
#                             Debian's etcd-server is 3.4, too old for this apiserver)
# from their Go modules through the Go module proxy, into ${IRSA_TESTBED_CACHE}/bin, with the Go
# build and module caches beside them, outside the repository. Idempotent: a stamp per binary names
# the version and the hash of the go.mod/go.sum it was built from, so a warm run takes well under a
# second. A cold build takes tens of minutes on 2 cores (the note in README.md says how long).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${IRSA_TESTBED_CACHE:-/var/cache/irsa-imds-testbed}"
bin="$cache/bin"
mods="$here/controlplane"

say() { printf '[setup-controlplane] %s\n' "$*"; }
fail() { printf '[setup-controlplane] error: %s\n' "$*" >&2; exit 1; }
mkdir -p "$bin"

# openssl makes the ServiceAccount signing key; setpriv ties the servers' lifetime to the tests.
need=()
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
if [ "${#need[@]}" -gt 0 ]; then
  say "installing Debian packages: ${need[*]}"
  apt-get update -qq >/dev/null || say "apt-get update failed; trying the install anyway"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null || fail "apt-get install ${need[*]} failed"
fi

k8s_version="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3 }' "$mods/go.mod")"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "$mods/etcd/go.mod")"
[ -n "$k8s_version" ] || fail "no k8s.io/kubernetes version in $mods/go.mod"
[ -n "$etcd_version" ] || fail "no go.etcd.io/etcd/server/v3 version in $mods/etcd/go.mod"
k8s_stamp="$k8s_version $(cat "$mods/go.mod" "$mods/go.sum" | sha256sum | cut -c1-16)"
etcd_stamp="$etcd_version $(cat "$mods/etcd/go.mod" "$mods/etcd/go.sum" | sha256sum | cut -c1-16)"

stamp_ok() { [ -x "$bin/$1" ] && [ -f "$bin/$1.stamp" ] && [ "$(cat "$bin/$1.stamp")" = "$2" ]; }

go_env() {
  command -v go >/dev/null 2>&1 || fail "go is not installed (needed to build the control plane)"
  mkdir -p "$cache/go/mod" "$cache/go/build"
  export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=readonly -modcacherw"
}

# build "NAMES" DIR "PACKAGES" STAMP [LDFLAGS]: one `go build` for all of PACKAGES (mains that
# share most of their packages link in parallel), each into $bin/<name>. Prints wall and CPU time.
build() {
  local names="$1" dir="$2" pkgs="$3" want="$4" ldflags="${5:-}" n todo=0
  for n in $names; do stamp_ok "$n" "$want" || todo=1; done
  [ "$todo" = 1 ] || return 0
  go_env
  say "building $names ($pkgs, ${want%% *}) into $bin"
  local tmp="$bin/.build-${names// /-}"
  rm -rf "$tmp" && mkdir -p "$tmp"
  # One package: named by its binary; several: each named by its path's last element.
  local out="$tmp/"
  [ "${names// /}" = "$names" ] && out="$tmp/$names"
  local TIMEFORMAT="[setup-controlplane] $names built in %0Rs wall, %0Us user + %0Ss sys CPU"
  # shellcheck disable=SC2086 # $pkgs is a list of package paths
  time (cd "$dir" && nice -n 10 go build -trimpath -ldflags "-s -w $ldflags" -o "$out" $pkgs) \
    || fail "go build $pkgs failed"
  for n in $names; do
    mv -f "$tmp/$n" "$bin/$n"
    printf '%s' "$want" > "$bin/$n.stamp"
  done
  rm -rf "$tmp"
}

minor="${k8s_version#v1.}"; minor="${minor%%.*}"
k8s_ldflags=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $p.gitVersion=$k8s_version -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done

build etcd "$mods/etcd" go.etcd.io/etcd/server/v3 "$etcd_stamp"
build "kube-apiserver kubectl" "$mods" "k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl" \
  "$k8s_stamp" "$k8s_ldflags"

"$bin/etcd" --version >/dev/null 2>&1 || fail "$bin/etcd does not run"
"$bin/kube-apiserver" --version >/dev/null 2>&1 || fail "$bin/kube-apiserver does not run"
"$bin/kubectl" version --client >/dev/null 2>&1 || fail "$bin/kubectl does not run"
say "control plane ready in $bin (kube-apiserver/kubectl $k8s_version, etcd $etcd_version)"
