# syntax=docker/dockerfile:1
# The picker (`/epp`, the entrypoint) and the simulated vLLM server (`/vllm-sim`) in one small
# non-root image:
#   docker build -t ghcr.io/endpoint-picker/epp:latest .
# manifests/ refers to that name as a placeholder: push the image to your registry and use its
# name there.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The registry and target caches speed up rebuilds (BuildKit); the binaries are copied out of the
# cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin epp --bin vllm-sim \
    && cp target/release/epp target/release/vllm-sim /

# glibc and libgcc_s, which the binaries link dynamically; nothing else (TLS is rustls).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /epp /vllm-sim /
# distroless's nonroot:nonroot, given by number so that Kubernetes can check runAsNonRoot
# (it refuses to start a runAsNonRoot container whose image names its user).
USER 65532:65532
# ext_proc gRPC, gRPC health, Prometheus metrics.
EXPOSE 9002 9003 9090
ENTRYPOINT ["/epp"]
