# syntax=docker/dockerfile:1
# The inference runner with candle's CUDA kernels: built on the CUDA devel
# image (nvcc), run on the much smaller CUDA runtime image.
#   docker build -f docker/runner-cuda.Dockerfile -t flotilla-runner:cuda .
ARG CUDA_VERSION=12.4.1
ARG RUST_VERSION=1.90

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build
ARG RUST_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/* \
 && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
ENV PATH=/root/.cargo/bin:${PATH}
# Compute capabilities to build kernels for: 80 A100, 86 A10/L4 (Ampere), 89 L4/L40S, 90 H100/H200.
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p flotilla-runner --features cuda \
 && mkdir -p /out && cp target/release/flotilla-runner /out/

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS runtime
RUN groupadd --gid 65532 flotilla && useradd --uid 65532 --gid 65532 --no-create-home flotilla
COPY --from=build /out/flotilla-runner /usr/local/bin/flotilla-runner
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/flotilla-runner"]
