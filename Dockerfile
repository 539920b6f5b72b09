# syntax=docker/dockerfile:1
# agentsecrets: the operator, admission webhook and CLI, in one static-ish binary on distroless.
#
#   docker build -t ghcr.io/agent-secrets/agentsecrets:0.1.0 .   (the chart's image, tag = appVersion)
#   docker run --rm ghcr.io/agent-secrets/agentsecrets:0.1.0 keys generate --id demo

# Build stage: the locked dependency set, release profile.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release --bin agentsecrets \
    && install -D -m 0755 target/release/agentsecrets /out/agentsecrets

# Runtime: glibc and CA roots only, no shell or package manager, non-root (uid/gid 65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/agentsecrets /agentsecrets
USER 65532:65532
# Webhook (HTTPS) and admin (probes, metrics) ports of `agentsecrets run`.
EXPOSE 8443 8080
ENTRYPOINT ["/agentsecrets"]
CMD ["run"]
