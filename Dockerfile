# Build: docker build -t irsa-imds .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p irsa-imds-agent -p irsa-imds-cni

FROM debian:bookworm-slim
# iptables for host mode; nothing else.
RUN apt-get update && apt-get install -y --no-install-recommends iptables ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/irsa-imds-agent /irsa-imds-agent
COPY --from=build /src/target/release/irsa-imds-cni /irsa-imds-cni
ENTRYPOINT ["/irsa-imds-agent"]
