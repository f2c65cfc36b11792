#!/usr/bin/env bash
# The code-shape rules of issue 16, checked in CI: outside tests, no Rust
# file over 600 lines, no `Result<_, String>`, no function over 80 lines
# (clippy's too_many_lines, threshold in clippy.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
# Library and binary sources: not test files, not the e2e harness or fuzzers.
sources=$(find crates -name '*.rs' -not -path '*/tests/*' -not -name 'tests.rs' -not -name '*_tests.rs')
# Test modules inline in a source file are test code: counted up to them.
for file in $sources; do
    lines=$(awk '/^#\[cfg\(test\)\]/ { exit } END { print NR }' "$file")
    if [ "$lines" -gt 600 ]; then
        echo "check-structure: $file has $lines lines before its tests (at most 600: split it)"
        status=1
    fi
    if awk '/^#\[cfg\(test\)\]/ { exit } { print }' "$file" | grep -n 'Result<[^;{]*, *String>' >/dev/null; then
        awk '/^#\[cfg\(test\)\]/ { exit } { print FILENAME ":" FNR ": " $0 }' "$file" | grep 'Result<[^;{]*, *String>'
        echo "check-structure: $file returns String errors (use a typed error)"
        status=1
    fi
done
if ! cargo clippy --quiet --workspace --lib --bins --exclude kabuto-e2e \
    --features kabuto-shim/software-tee,kabuto-cli/software-tee -- \
    -A clippy::all -D clippy::too_many_lines; then
    echo "check-structure: functions over 80 lines (clippy::too_many_lines above)"
    status=1
fi
exit $status
