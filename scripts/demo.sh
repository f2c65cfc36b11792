#!/usr/bin/env bash
# The main job: build and install kabuto, then run a container in its own
# micro-VM through containerd and show that it ran on the guest's kernel.
# Uses a private containerd under /tmp/kabuto-demo so a system one is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:/usr/local/bin:$PATH"
target/release/kabuto install
target/release/kabuto check

demo=/tmp/kabuto-demo
mkdir -p "$demo"
cat > "$demo/containerd.toml" <<TOML
version = 2
root = "$demo/root"
state = "$demo/state"
[grpc]
  address = "$demo/containerd.sock"
[ttrpc]
  address = "$demo/containerd.sock.ttrpc"
TOML
containerd --config "$demo/containerd.toml" > "$demo/containerd.log" 2>&1 &
containerd_pid=$!
trap 'kill $containerd_pid 2>/dev/null; wait $containerd_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do ctr --address "$demo/containerd.sock" version >/dev/null 2>&1 && break; sleep 0.1; done

target/release/make-test-image "$demo/busybox-oci.tar"
ctr --address "$demo/containerd.sock" image import "$demo/busybox-oci.tar" >/dev/null

echo "host kernel:      $(uname -r)"
echo -n "container kernel: "
ctr --address "$demo/containerd.sock" run --rm --runtime io.containerd.kabuto.v2 \
  localhost/busybox:latest demo uname -r
