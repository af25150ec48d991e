#!/usr/bin/env bash
# Build and run one fuzz target with libFuzzer: fuzz/run.sh TARGET SECONDS [libFuzzer args…]
# The instrumentation is what `cargo fuzz run -s none` uses (sancov, inline 8-bit counters,
# compare tracing; debug assertions and overflow checks on), built with nightly, so nothing
# but rustup's nightly toolchain is needed. The corpus lives in fuzz/corpus/TARGET (seeds
# checked in under fuzz/seeds/TARGET are copied in first); crashes land in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
target=$1 secs=$2
shift 2
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo +nightly build --quiet --release --target x86_64-unknown-linux-gnu --bins
mkdir -p "corpus/$target" "artifacts/$target"
if [ -d "seeds/$target" ]; then cp -n "seeds/$target"/* "corpus/$target/" 2>/dev/null || true; fi
exec "target/x86_64-unknown-linux-gnu/release/$target" "corpus/$target" \
  -artifact_prefix="artifacts/$target/" -max_total_time="$secs" -print_final_stats=1 "$@"
