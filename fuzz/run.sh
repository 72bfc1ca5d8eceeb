#!/usr/bin/env bash
# Fuzz each target for SECONDS (default 600) on one core, keeping the corpus in fuzz/corpus/.
# Needs cargo-fuzz (cargo install cargo-fuzz); runs on the stable toolchain via RUSTC_BOOTSTRAP.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
for target in envelope names; do
  RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -print_final_stats=1
done
