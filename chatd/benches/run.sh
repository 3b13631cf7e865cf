#!/usr/bin/env bash
# Runs the fan-out benchmark (docs/PERFORMANCE.md): chatd against ngIRCd and
# InspIRCd, all scenarios unless told otherwise. Arguments go to chatbench,
# e.g. `bash chatd/benches/run.sh --runs 5` or `... -s a,c -t chatd,ngircd`.
# Needs Debian (apt-get) and root or sudo the first time, to install the peers.
set -euo pipefail
cd "$(dirname "$0")/../.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for prog in ngircd inspircd; do
    if ! command -v "$prog" >/dev/null && [ ! -x "/usr/sbin/$prog" ]; then
        missing+=("$prog")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "run.sh: installing ${missing[*]} from Debian" >&2
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

# The packages start system-wide instances: stop them, so that they hold no
# port and take no CPU from the run. The benchmark starts its own, in the
# foreground, on free loopback ports.
for svc in ngircd inspircd; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
        as_root systemctl stop "$svc"
    fi
    pidfile="/run/$svc/$svc.pid"
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        as_root kill "$(cat "$pidfile")"
    fi
done

exec cargo bench -p chatd --bench chatbench -- "$@"
