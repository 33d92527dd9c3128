#!/usr/bin/env bash
# Single-node launch: one rank per GPU (or CPU ranks when no GPU).
#   launch/torchrun.sh 4 --config deepseek_v4_pro --set tokens=128
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node (same values except NODE_RANK).
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NPROC_PER_NODE [ep_runtime.cli args...]}"
shift
# NVLink multicast stays off: our machines disable it and our all-reduce does not need it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29511}" \
  --nproc-per-node "$nproc" -m ep_runtime.cli "$@"
