# Build stage: compiles handoff in release mode.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake make g++ && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY bridge-config.yaml ./
RUN cargo build --release --locked && strip target/release/handoff

# Runtime stage: the binary, CA certificates, curl for the health check, a non-root user.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 1337 --home-dir /data handoff \
    && mkdir -p /data /opt/handoff && chown handoff /data
COPY --from=build /src/target/release/handoff /usr/local/bin/handoff
COPY bridge-config.yaml /opt/handoff/bridge-config.yaml
COPY docker/run.sh /opt/handoff/run.sh
USER handoff
VOLUME /data
EXPOSE 29340
# The appservice port from the example config; change both if you change appservice.port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD curl -fsS http://127.0.0.1:29340/health || exit 1
ENTRYPOINT ["/opt/handoff/run.sh"]
