#!/usr/bin/env bash
# What every rank runs under launch/multinode.sh (the DeepSpeed launcher with --no_python): picks this
# host's network interface towards the master and logs it (launch/network.sh), applies the NCCL
# fail-fast defaults, then becomes `python -m violet_ds.cli ARGS ...`.
#   launch/rank.sh COMMAND [violet-ds arguments ...]
# VIOLET_DS_MASTER_ADDR (else MASTER_ADDR) names the master; VIOLET_DS_PYTHON the interpreter (python3).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/network.sh
source "$here/network.sh"
violet_ds_fail_fast_env
violet_ds_network_env "${VIOLET_DS_MASTER_ADDR:-${MASTER_ADDR:-127.0.0.1}}" "rank ${RANK:-?}"
exec "${VIOLET_DS_PYTHON:-python3}" -m violet_ds.cli "$@"
