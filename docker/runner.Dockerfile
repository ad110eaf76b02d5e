# syntax=docker/dockerfile:1
# The inference runner alone (CPU), for replicas started as pods.
#   docker build -f docker/runner.Dockerfile -t flotilla-runner .
ARG RUST_VERSION=1.90

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p flotilla-runner \
 && mkdir -p /out && cp target/release/flotilla-runner /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/flotilla-runner /usr/local/bin/flotilla-runner
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/flotilla-runner"]
