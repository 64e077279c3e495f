# Multi-stage build of the OpenClaw binaries (claw, claw-gateway, claw-worker, claw-archiver).
# The runtime stage is Debian slim with CA roots (TLS to NATS and LLM endpoints) and bash (the
# compose healthcheck), running as an unprivileged user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins --locked \
 && mkdir -p /out \
 && cp target/release/claw target/release/claw-gateway target/release/claw-worker \
       target/release/claw-archiver /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/claw claw && mkdir -p /var/lib/claw && chown claw /var/lib/claw
COPY --from=build /out/ /usr/local/bin/
USER claw
WORKDIR /var/lib/claw
VOLUME /var/lib/claw
EXPOSE 8080
CMD ["claw-gateway", "--http", "0.0.0.0:8080"]
