#!/usr/bin/env bash
# N radnet processes on this machine, each with D fake CPU devices, joined by
# jax.distributed over localhost (gloo collectives). For testing multi-process code.
#
#   launch/local_multiprocess.sh [-n 2] [-d 2] [-p PORT] [--dry_run] -- RADNET_ARGS...
#   launch/local_multiprocess.sh -n 2 -d 2 -- --config=configs/pretrain.py:tiny --workdir=/tmp/mp
#
# Logs: WORKDIR/logs/process_<i>.log (or ./mp_logs when no --workdir is given).
set -euo pipefail
n=2; d=2; port=""; dry=0
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "radnet: error: $1 (launch/local_multiprocess.sh; -h for its usage)" >&2; exit 2; }
count() { [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "$1 takes a positive whole number, not '${2:-}'"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) count -n "${2:-}"; n="$2"; shift 2 ;;
    -d) count -d "${2:-}"; d="$2"; shift 2 ;;
    -p) count -p "${2:-}"; port="$2"; shift 2 ;;
    --dry_run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1'; radnet's own flags go after --" ;;
  esac
done
[[ " $* " == *" --config="* ]] || die "no --config=... after --, e.g. -- --config=configs/pretrain.py:tiny --workdir=/tmp/mp"
PYTHON="${PYTHON:-.venv/bin/python}"
if [[ -z "$port" ]]; then
  port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 12355)
fi
workdir=""
for a in "$@"; do [[ "$a" == --workdir=* ]] && workdir="${a#--workdir=}"; done
logdir="${workdir:-.}/logs"; [[ -z "$workdir" ]] && logdir="./mp_logs"

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < n; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$d"
       "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$n" "JAX_PROCESS_ID=$i"
       "$PYTHON" -m radnet.main "$@")
  if [[ $dry -eq 1 ]]; then
    printf '%q ' "${cmd[@]}"; printf '> %s\n' "$logdir/process_$i.log"
    continue
  fi
  mkdir -p "$logdir"
  "${cmd[@]}" > "$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done
[[ $dry -eq 1 ]] && exit 0
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $logdir/process_$i.log" >&2; status=1
  fi
done
exit $status
