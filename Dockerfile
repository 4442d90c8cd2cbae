# syntax=docker/dockerfile:1
#
# kubenurse agent image.
#   docker build --build-arg REVISION="$(git rev-parse --short=12 HEAD)" -t ghcr.io/example/kubenurse-rs:0.1.0 .
# REVISION becomes the `revision` label of kubenurse_build_info (`unknown` when not given).
#
# Build stages use the official Rust image. Dependencies are compiled in their own layer
# (cargo-chef "cook" from a recipe of Cargo.toml/Cargo.lock and the target layout), so an edit
# of the sources rebuilds only the kubenurse crate; the layer is rebuilt when the manifests or
# the lock file change. Release profile from Cargo.toml (fat LTO, opt-level "s", stripped, panic=abort).
#
# Runtime: distroless "cc" (glibc, libgcc, CA certificates for the system trust store; no
# shell, no package manager), as the non-root user 65532. TLS is rustls: no OpenSSL needed.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# The dependency recipe: changes only when manifests, lock file or target layout change.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --bin kubenurse --recipe-path recipe.json
COPY . .
# Declared after the dependency layer, so a new revision rebuilds only the kubenurse crate.
ARG REVISION=unknown
RUN KUBENURSE_REVISION="${REVISION}" cargo build --release --locked --bin kubenurse \
 && install -D -m 0755 target/release/kubenurse /out/kubenurse

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/kubenurse /kubenurse
USER 65532:65532
# 8080: HTTP (probes, /metrics, /alwayshappy); 8443: TLS listener with KUBENURSE_USE_TLS=true.
EXPOSE 8080 8443
ENTRYPOINT ["/kubenurse"]
