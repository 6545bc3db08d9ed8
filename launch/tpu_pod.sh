#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every worker VM.
# jax.distributed.initialize() detects the pod from the TPU VM environment.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config=configs/pretrain.py --workdir=gs://bucket/runs/rn50
#   launch/tpu_pod.sh --dry_run --config=... --workdir=...     # print the gcloud command
#
# Assumes the repository is checked out at $REMOTE_DIR (default ~/radnet) with `make venv` done on
# every worker (e.g. a first run with REMOTE_CMD="cd radnet && make venv").
# The workdir should be a gs:// path: Orbax writes checkpoints collectively there.
set -euo pipefail
dry=0
if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
if [[ "${1:-}" == "--dry_run" ]]; then dry=1; shift; fi
die() { echo "radnet: error: $1 (launch/tpu_pod.sh; -h for its usage)" >&2; exit 2; }
[[ " $* " == *" --config="* && " $* " == *" --workdir="* ]] \
  || die "radnet needs --config=... and --workdir=..., e.g. --config=configs/pretrain.py --workdir=gs://bucket/runs/rn50"
[[ $dry -eq 1 ]] || command -v gcloud > /dev/null \
  || die "gcloud is not installed here (https://cloud.google.com/sdk/docs/install), or use --dry_run"
: "${TPU_NAME:=radnet-tpu}" "${ZONE:=us-central2-b}" "${REMOTE_DIR:=radnet}"
args=$(printf '%q ' "$@")
remote="${REMOTE_CMD:-cd $REMOTE_DIR && .venv/bin/python -m radnet.main $args}"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$remote")
if [[ $dry -eq 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
