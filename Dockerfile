# syntax=docker/dockerfile:1
# One build, three images: docker build --target api|worker|fsctl .
FROM rust:1-bookworm AS builder
WORKDIR /src
# Dependency cache layer: manifests and stub sources first.
COPY Cargo.toml Cargo.lock ./
COPY services/engine/Cargo.toml services/engine/
COPY services/api/Cargo.toml services/api/
COPY services/worker/Cargo.toml services/worker/
COPY services/testkit/Cargo.toml services/testkit/
COPY cli/Cargo.toml cli/
COPY bench/Cargo.toml bench/
COPY services/sim/Cargo.toml services/sim/
COPY .cargo .cargo
RUN for d in services/engine services/api services/worker services/testkit services/sim cli bench; do \
      mkdir -p $d/src && echo 'fn main() {}' > $d/src/main.rs && touch $d/src/lib.rs; \
    done \
 && mkdir -p migrations \
 && cargo build --release -p flashsale-api -p flashsale-worker -p fsctl || true
# The real sources.
COPY . .
RUN touch services/*/src/*.rs cli/src/*.rs \
 && cargo build --release -p flashsale-api -p flashsale-worker -p fsctl

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home flashsale
USER flashsale

FROM runtime AS api
COPY --from=builder /src/target/release/flashsale-api /usr/local/bin/
ENV API_ADDR=0.0.0.0:3000
EXPOSE 3000
HEALTHCHECK --interval=5s --timeout=2s --retries=5 CMD curl -fsS http://127.0.0.1:3000/health/live || exit 1
ENTRYPOINT ["flashsale-api"]

FROM runtime AS worker
COPY --from=builder /src/target/release/flashsale-worker /usr/local/bin/
ENV METRICS_ADDR=0.0.0.0:3001
EXPOSE 3001
HEALTHCHECK --interval=5s --timeout=2s --retries=5 CMD curl -fsS http://127.0.0.1:3001/health/live || exit 1
ENTRYPOINT ["flashsale-worker"]

FROM runtime AS fsctl
COPY --from=builder /src/target/release/fsctl /usr/local/bin/
COPY --chown=flashsale scenarios /scenarios
ENTRYPOINT ["fsctl"]
