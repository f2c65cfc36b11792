#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets, libFuzzer through cargo fuzz)
# and prints executions and crashes per target.
#   scripts/fuzz.sh [SECONDS] [TARGET...]        each target for SECONDS (default 60)
#   scripts/fuzz.sh --runs N [TARGET...]         each target for N executions
#
# Only the stable toolchain is installed: cargo fuzz needs nightly flags
# (coverage passes), so RUSTC_BOOTSTRAP=1 lets stable accept them.
# Sanitizer: none (`-s none`). The code under test is safe Rust, where
# AddressSanitizer finds nothing libFuzzer's panic and overflow checks
# (--debug-assertions) do not, and it costs 7-10x in executions (measured:
# kbs_requests 2.2 k/s with ASan, 21 k/s without). KABUTO_FUZZ_SANITIZER=address
# brings it back. Inputs found grow a work corpus in target/fuzz-corpus/<target>,
# seeded from the small committed corpus (fuzz/corpus/<target>) and, when
# they exist, the public test vectors in ../shared/testdata (never copied
# into the repository). A crash stops its target; its input is kept in
# target/fuzz-artifacts/<target>/ (turn it into a unit test).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
runs=-1
seconds=60
if [[ ${1:-} == --runs ]]; then
  runs=${2:?--runs needs a count}
  seconds=0
  shift 2
elif [[ -n ${1:-} && ${1:-} != *[!0-9]* ]]; then
  seconds=$1
  shift
fi
sanitizer=${KABUTO_FUZZ_SANITIZER:-none}
flags=(-O --debug-assertions -s "$sanitizer")

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --version 0.13.1 --locked
fi
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
echo "== building ${#targets[@]} fuzz targets"
(cd fuzz && for t in "${targets[@]}"; do cargo fuzz build "${flags[@]}" "$t"; done)

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
  started=$SECONDS
  (cd fuzz && cargo fuzz run "${flags[@]}" "$t" "../$corpus" "corpus/$t" -- \
      -max_total_time="$seconds" -runs="$runs" -print_final_stats=1 -rss_limit_mb=4096 \
      -artifact_prefix="../$artifacts/" >"../$log" 2>&1) || rc=$?
  execs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -1)
  rate=$(awk '/stat::average_exec_per_sec/ {print $2}' "$log" | tail -1)
  crashes=$(find "$artifacts" -type f | wc -l)
  printf '%-16s %8s %14s %10s %8s\n' "$t" "$((SECONDS - started))" "${execs:-?}" "${rate:-?}" "$crashes"
  if ((rc != 0 || crashes != 0)); then
    status=1
    echo "   $t: exit $rc; see $log and $artifacts/" >&2
  fi
done
exit $status
