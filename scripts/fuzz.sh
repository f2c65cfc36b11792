#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets, libFuzzer through cargo fuzz)
# for SECONDS each (default 60) and prints executions and crashes per
# target. Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Only the stable toolchain is installed: cargo fuzz needs nightly flags
# (-Z sanitizer, coverage passes), so RUSTC_BOOTSTRAP=1 lets stable accept
# them. Inputs found grow a work corpus in target/fuzz-corpus/<target>,
# seeded from the small committed corpus (fuzz/corpus/<target>) and, when
# they exist, the public test vectors in ../shared/testdata (never copied
# into the repository). A crash stops its target; its input is kept in
# target/fuzz-artifacts/<target>/ (turn it into a unit test).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
seconds=${1:-60}
shift || true

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --version 0.13.1 --locked
fi
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
echo "== building ${#targets[@]} fuzz targets"
(cd fuzz && for t in "${targets[@]}"; do cargo fuzz build -O --debug-assertions "$t"; done)

shared=../shared/testdata/attestation
if [[ -f $shared/tdx/quote-v4.collateral.json ]]; then
  export KABUTO_FUZZ_TDX_COLLATERAL=$PWD/$shared/tdx/quote-v4.collateral.json
fi

# Test vectors as seeds, in the targets' input layouts.
seed_vectors() {
  local target=$1 dir=$2
  [[ -d $shared ]] || { echo "   (no $shared: seeding $target from fuzz/corpus only)"; return 0; }
  python3 - "$target" "$dir" "$shared" <<'PY'
import struct, sys, pathlib
target, out, shared = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
def chunk(b): return struct.pack('<H', len(b)) + b
if target == 'snp_evidence':
    for report, cert in [('report-v2.bin', 'report-v2.vcek.der'), ('report-vlek.bin', 'report-vlek.vlek.der')]:
        r, c = (shared / 'snp' / report).read_bytes(), (shared / 'snp' / cert).read_bytes()
        (out / f'vector-{report}').write_bytes(b'\x00' + chunk(r) + chunk(c))
elif target == 'tdx_evidence':
    q = (shared / 'tdx' / 'quote-v4.bin').read_bytes()
    (out / 'vector-quote-v4').write_bytes(chunk(q))
PY
}

printf '\n%-16s %8s %14s %10s %8s\n' target seconds executions execs/s crashes
status=0
for t in "${targets[@]}"; do
  corpus=target/fuzz-corpus/$t
  artifacts=target/fuzz-artifacts/$t
  mkdir -p "$corpus" "$artifacts"
  seed_vectors "$t" "$corpus" >&2
  log=target/fuzz-$t.log
  rc=0
  (cd fuzz && cargo fuzz run -O --debug-assertions "$t" "../$corpus" "corpus/$t" -- \
      -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=4096 \
      -artifact_prefix="../$artifacts/" >"../$log" 2>&1) || rc=$?
  execs=$(awk -F: '/stat::number_of_executed_units/ {gsub(/ /, "", $2); print $2}' "$log" | tail -1)
  rate=$(awk -F: '/stat::average_exec_per_sec/ {gsub(/ /, "", $2); print $2}' "$log" | tail -1)
  crashes=$(find "$artifacts" -type f | wc -l)
  printf '%-16s %8s %14s %10s %8s\n' "$t" "$seconds" "${execs:-?}" "${rate:-?}" "$crashes"
  if ((rc != 0 || crashes != 0)); then
    status=1
    echo "   $t: exit $rc; see $log and $artifacts/" >&2
  fi
done
exit $status
