#!/usr/bin/env bash
# The test command: sets up what the tests need (scripts/setup.sh), then runs
# every test, including the end-to-end ones that boot real VMs through a
# private containerd (they are #[ignore]d in a plain `cargo test`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
export KABUTO_E2E_BIN_DIR="$PWD/target/release"
export KABUTO_E2E_GUEST_DIR="$PWD/target/guest"
# Each booting VM takes about one core under TCG: two tests at a time.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace --no-fail-fast --features kabuto-shim/software-tee,kabuto-cli/software-tee -- --include-ignored --test-threads=2 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit $status
