#!/usr/bin/env bash
# Builds irsa-imds-cni as a static executable (it is copied onto nodes and run by the host's
# container runtime, whose libc may be older than any build image's) into
# ${CARGO_TARGET_DIR:-target}/static/irsa-imds-cni, and records how in irsa-imds-cni.how.
# Prefers the musl target; where rustup cannot add it (no network for toolchains), glibc with
# crt-static on the host target. An explicit --target keeps RUSTFLAGS off build scripts and proc
# macros, so only the plugin's own crates are rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
arch="$(uname -m)"
out="$target_dir/static"
mkdir -p "$out"

say() { printf '[static-cni] %s\n' "$*"; }

musl="$arch-unknown-linux-musl"
# IRSA_STATIC_CNI_LIBC=glibc forces the fallback (to check it still links static).
if [ "${IRSA_STATIC_CNI_LIBC:-musl}" = musl ] && { rustup target list --installed 2>/dev/null | grep -qx "$musl" \
  || timeout 120 rustup target add "$musl" >/dev/null 2>&1; }; then
  triple="$musl"
  how="musl ($musl)"
  flags=""
else
  triple="$arch-unknown-linux-gnu"
  how="glibc crt-static ($triple)"
  flags="-C target-feature=+crt-static"
fi
say "building irsa-imds-cni: $how"
RUSTFLAGS="$flags" cargo build --locked --release -p irsa-imds-cni --bin irsa-imds-cni --target "$triple" \
  --target-dir "$target_dir/static-build"
cp "$target_dir/static-build/$triple/release/irsa-imds-cni" "$out/irsa-imds-cni.tmp"
mv "$out/irsa-imds-cni.tmp" "$out/irsa-imds-cni"
printf '%s\n' "$how" > "$out/irsa-imds-cni.how"
say "ready: $out/irsa-imds-cni"
