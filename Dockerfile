# Multi-stage build of the OpenClaw binaries (claw, claw-gateway, claw-worker, claw-archiver).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/claw claw && mkdir -p /var/lib/claw && chown claw /var/lib/claw
COPY --from=build /src/target/release/claw /src/target/release/claw-gateway \
     /src/target/release/claw-worker /src/target/release/claw-archiver /usr/local/bin/
USER claw
WORKDIR /var/lib/claw
