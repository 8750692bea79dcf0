# syntax=docker/dockerfile:1
#
# floodgate's container image: one runtime image holding every binary
# (floodgate-ingress, floodgate-worker, floodgate-notifier and the `floodgate` operator
# command); the command picks the service. docker-compose.yml builds it and runs each
# service from it.
#
#   docker build -t floodgate .                      the runtime image (target `runtime`)
#   docker build --target loadtest -t floodgate-loadtest .   the goose load test
#
# Stages: chef (the toolchain and cargo-chef), planner (the dependency recipe), cook (the
# dependencies alone, cached until Cargo.toml or Cargo.lock change), builder (floodgate's
# own crates), runtime (Debian slim, no toolchain). The loadtest stages build
# ops/loadtest, a workspace of its own, for compose's opt-in `loadtest` profile.
#
# The migrations are compiled in (`refinery::embed_migrations!` in common/src/db.rs), so
# `floodgate migrate` needs no files at run time.

# The toolchain CI tests with; bookworm, so the binaries link against the glibc of the
# bookworm runtime image below.
ARG RUST_IMAGE=rust:1.95.0-bookworm
ARG RUNTIME_IMAGE=debian:12.12-slim

FROM ${RUST_IMAGE} AS chef
# Installed once per toolchain image, then cached as its own layer.
RUN cargo install --locked cargo-chef --version 0.1.77
WORKDIR /src

# The recipe: every manifest and the lock file, with the crates' sources stubbed out.
# It changes only when a dependency does, which is what keeps `cook` cached.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# The dependencies of the four binaries, built alone.
FROM chef AS cook
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json \
    -p floodgate-ingress -p floodgate-worker -p floodgate-notifier -p floodgate-cli

# floodgate's own crates, on top of the cooked dependencies (the same build as `ops/stack up`).
FROM cook AS builder
COPY . .
RUN cargo build --release --locked \
    -p floodgate-ingress -p floodgate-worker -p floodgate-notifier -p floodgate-cli

# The load generator (ops/loadtest: goose), for `docker compose --profile loadtest`.
# cargo-chef plans one workspace and this is another (with its own Cargo.lock), so its
# crates are cached with BuildKit cache mounts instead. It builds floodgate-common, which
# inherits from the root workspace's manifest: copy the whole context.
FROM chef AS loadtest-builder
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/ops/loadtest/target \
    cargo build --release --locked --manifest-path ops/loadtest/Cargo.toml --bin floodgate-loadtest \
    && cp ops/loadtest/target/release/floodgate-loadtest /usr/local/bin/

# What every runtime image shares: Debian slim, CA certificates, curl for the health
# check, and an unprivileged user.
FROM ${RUNTIME_IMAGE} AS runtime-base
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 floodgate \
    && useradd --system --uid 10001 --gid floodgate --no-create-home --shell /usr/sbin/nologin floodgate

FROM runtime-base AS loadtest
COPY --from=loadtest-builder /usr/local/bin/floodgate-loadtest /usr/local/bin/
USER floodgate:floodgate
ENTRYPOINT ["floodgate-loadtest"]

# The runtime image (the default target: it comes last).
FROM runtime-base AS runtime
COPY --from=builder /src/target/release/floodgate-ingress /usr/local/bin/
COPY --from=builder /src/target/release/floodgate-worker /usr/local/bin/
COPY --from=builder /src/target/release/floodgate-notifier /usr/local/bin/
COPY --from=builder /src/target/release/floodgate /usr/local/bin/
COPY ops/docker/healthcheck /usr/local/bin/floodgate-healthcheck
USER floodgate:floodgate
# The default ports: ingress, notifier, worker (health and metrics only).
EXPOSE 8080 8081 8082
# Probes /readyz of whichever floodgate service runs in the container, on the port of its
# own FLOODGATE_*_ADDR, so one image-wide default fits every service (a container that
# runs `floodgate` one-shots reports unhealthy; compose gives those no health check).
# docker-compose.yml states each service's probe explicitly.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["floodgate-healthcheck"]
CMD ["floodgate-ingress"]
