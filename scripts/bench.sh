#!/usr/bin/env bash
# Benchmarks (not tests): kabuto next to runc and a bare QEMU boot, and the
# KBS next to a plain HTTP request, image pull+decrypt+unpack next to skopeo,
# pod networking next to runc pods on one CNI bridge, unsealing next to a
# KBS resource fetch,
# each measured in the same run; prints
# Markdown tables for docs/benchmarks.md.
# Usage: scripts/bench.sh [--runs N] [--max-pods N]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
export PATH="$HOME/.cargo/bin:$PATH"
export KABUTO_E2E_BIN_DIR="$PWD/target/release"
export KABUTO_E2E_GUEST_DIR="$PWD/target/guest"
target/release/kabuto-bench "$@"
# The KBS (attestation) benchmark needs no VM.
target/release/kabuto-kbs-bench --seconds 5
target/release/kabuto-kbs-bench --seconds 5 --coco
# Confidential-image pull path (library on the host, against skopeo).
target/release/kabuto-image-bench --runs 3 --in-guest
# Pod networking next to runc pods on the same CNI bridge.
target/release/kabuto-net-bench --runs 3 --seconds 5
# Sealed secrets: unseal latency through the data hub, next to a plain
# resource fetch, in one confidential pod.
target/release/kabuto-unseal-bench --requests 20 --runs 3
