# syntax=docker/dockerfile:1
# Build (one platform):  docker build -t irsa-imds .
# Multi-arch:            docker buildx build --platform linux/amd64,linux/arm64 -t <registry>/irsa-imds:<tag> .
# Each platform builds natively (buildx runs the other one under emulation), so aws-lc-rs's C parts (aws-lc-sys)
# need no cross toolchain.
#
# The image carries the agent (glibc, dynamic: it runs in this image), the CNI plugin built
# static for musl (it is copied onto the node and run by the host's container runtime, whatever
# the host's libc), and Debian's iptables, which has both the legacy and the nft backends the
# agent chooses between.

FROM rust:1.95-bookworm AS build
ARG TARGETARCH
RUN case "${TARGETARCH:-amd64}" in \
      amd64) echo x86_64 ;; \
      arm64) echo aarch64 ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac > /musl-arch \
 && rustup target add "$(cat /musl-arch)-unknown-linux-musl" \
 && apt-get update && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependencies first, from the manifests alone with stub sources: a source change reuses this
# layer instead of rebuilding every crate.
COPY Cargo.toml Cargo.lock ./
COPY agent/Cargo.toml agent/
COPY cni-hook/Cargo.toml cni-hook/
COPY proto/Cargo.toml proto/
COPY tests/Cargo.toml tests/
RUN mkdir -p agent/src cni-hook/src proto/src tests/src \
 && echo 'fn main() {}' > agent/src/main.rs && touch agent/src/lib.rs \
 && echo 'fn main() {}' > cni-hook/src/main.rs && touch cni-hook/src/lib.rs \
 && touch proto/src/lib.rs tests/src/lib.rs \
 && cargo build --release --locked -p irsa-imds-agent \
 && cargo build --release --locked -p irsa-imds-cni --target "$(cat /musl-arch)-unknown-linux-musl" \
 && rm -rf agent/src cni-hook/src proto/src tests/src

COPY . .
# COPY keeps the context's mtimes, which may predate the stub build: make cargo see the change.
RUN touch agent/src/main.rs agent/src/lib.rs cni-hook/src/main.rs cni-hook/src/lib.rs proto/src/lib.rs \
 && cargo build --release --locked -p irsa-imds-agent \
 && cargo build --release --locked -p irsa-imds-cni --target "$(cat /musl-arch)-unknown-linux-musl" \
 && cp target/release/irsa-imds-agent /irsa-imds-agent \
 && cp "target/$(cat /musl-arch)-unknown-linux-musl/release/irsa-imds-cni" /irsa-imds-cni

FROM debian:bookworm-slim
# iptables: iptables-legacy and iptables-nft (host mode picks the node's); ca-certificates: STS
# and the API server over TLS.
RUN apt-get update && apt-get install -y --no-install-recommends iptables ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /irsa-imds-agent /irsa-imds-agent
COPY --from=build /irsa-imds-cni /irsa-imds-cni
ENTRYPOINT ["/irsa-imds-agent"]
