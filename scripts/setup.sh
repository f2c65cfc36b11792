#!/usr/bin/env bash
# Installs what kabuto needs on a Debian 12 host and builds it:
# packages, the vhost-user vsock device, the release binaries, the guest image.
# Idempotent: re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

VHOST_DEVICE_VSOCK_VERSION=0.3.0
PACKAGES=(qemu-system-x86 qemu-system-common containerd runc busybox-static cpio
          libseccomp-dev pkg-config bsdutils ca-certificates openssl
          skopeo docker-registry gnupg protobuf-compiler containernetworking-plugins
          iproute2 iptables iperf3)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "== installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if ! vhost-device-vsock --version 2>/dev/null | grep -q "$VHOST_DEVICE_VSOCK_VERSION"; then
  echo "== installing vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION (vsock for hosts without /dev/vhost-vsock)"
  cargo install vhost-device-vsock --version "$VHOST_DEVICE_VSOCK_VERSION" --locked
fi

echo "== building kabuto (release, with the software TEE the tests and the demo use)"
# A production build leaves the feature off: `cargo build --release -p kabuto-shim
# -p kabuto-cli` has no software TEE (see crates/host/runtime/README.md).
cargo build --release --workspace --bins --features kabuto-shim/software-tee,kabuto-cli/software-tee
# The pause of confidential pods runs alone in its container's root: linked
# statically (its own target dir, so these flags touch nothing else).
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release -p kabuto-pause --target x86_64-unknown-linux-gnu
cp target/x86_64-unknown-linux-gnu/release/kabuto-pause target/release/kabuto-pause-static

echo "== building the guest image"
# The kernel comes through apt (apt-get download): make sure its package
# lists exist when the package is not cached yet.
if ! ls target/guest/cache/*.deb >/dev/null 2>&1 && [[ -z $(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial) ]]; then
  apt-get update -q
fi
target/release/kabuto guest build
# A debug image (with a shell for `kabuto exec`) for the debug-console tests.
target/release/kabuto guest build --debug-console --out target/guest-debug \
  --kernel-deb "$(ls target/guest/cache/linux-image-*.deb | head -1)" > /dev/null
