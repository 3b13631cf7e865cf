#!/usr/bin/env bash
# Runs one fuzz target for a while: scripts/fuzz.sh TARGET SECONDS
#
# TARGET is one of: framer command sanitize config bans (fuzz/fuzz_targets).
# Needs a nightly toolchain and cargo-fuzz (`cargo +nightly install
# cargo-fuzz`); CI never runs this. The committed seeds are in
# fuzz/seeds/TARGET; what the fuzzer finds grows fuzz/corpus/TARGET (not
# committed) and a crashing input lands in fuzz/artifacts/TARGET. The last
# line printed gives the executions and the coverage reached, the figures
# docs/RELIABILITY.md records.
set -euo pipefail

target=${1:?usage: scripts/fuzz.sh TARGET SECONDS}
seconds=${2:?usage: scripts/fuzz.sh TARGET SECONDS}
cd "$(dirname "$0")/../fuzz"
if [ ! -f "fuzz_targets/$target.rs" ]; then
    echo "scripts/fuzz.sh: no target '$target'; the targets are: $(cd fuzz_targets && ls ./*.rs | sed 's|^./||; s|\.rs$||' | tr '\n' ' ')" >&2
    exit 2
fi
if ! command -v rustup >/dev/null 2>&1 || ! rustup toolchain list | grep -q '^nightly'; then
    echo "scripts/fuzz.sh: needs the nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "scripts/fuzz.sh: needs cargo-fuzz: cargo +nightly install cargo-fuzz" >&2
    exit 2
fi
mkdir -p "corpus/$target"

# One job: the machine's cores are shared. No sanitizer: the code it runs
# has no unsafe, and the build is much faster without one.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
nice -n 10 cargo +nightly fuzz run --sanitizer none "$target" \
    "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -print_final_stats=1 >"$log" 2>&1 || status=$?
grep -E -A3 'DONE|Done [0-9]+ runs|ERROR|panicked|SUMMARY|stat::|Test unit written' "$log" || true
runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')
cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || echo 'cov: ?')
echo "fuzz $target: ${seconds}s, $runs executions, $cov, exit $status"
exit "$status"
