#!/usr/bin/env bash
# One job of a multi-node relax run: torchrun on every node, rendezvous through the c10d store
# on the first node. Run this same script on each of the NNODES nodes (SLURM does it for you:
# see slurm_relax.sbatch), with:
#
#   NNODES=2 GPUS_PER_NODE=8 RDZV_HOST=node001 JOB_ID=fmnist-s0-a RELAX_TIMES=0,1,2 SEED=0 \
#       bash examples/multinode_relax.sh
#
# Each rank takes the GPU of its LOCAL_RANK (torchrun sets it); NCCL carries the collectives.
# --fsdp shards every eFCN layer over all NNODES * GPUS_PER_NODE ranks (FSDP2), so a model whose
# eFCN does not fit one GPU trains as long as each single layer does: check first with
#   efcn plan --model resnet18 --image-size 32 --halo full --world-size 16 --optimizer sgd \
#       --param-dtype bfloat16 --device-memory 80
# The run directory must be on a file system every node sees: each rank writes its own shard of
# the checkpoints (checkpoints/ARM.dcp), and --resume continues with any world size.
#
# Splitting the protocol into jobs: every job trains the CNN (the same one: the seed fixes it) up
# to its relax times, then its eFCNs; give the FCN baseline to one job only (--no-fcn elsewhere).
# Jobs of one seed are joined with
#   efcn merge runs/fmnist-s0-a runs/fmnist-s0-b -o runs/fmnist-s0
# Runs of different seeds differ in --seed, so each seed is merged into its own directory.
set -euo pipefail

NNODES=${NNODES:?number of nodes}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RDZV_HOST=${RDZV_HOST:?host name of the first node}
RDZV_PORT=${RDZV_PORT:-29500}
JOB_ID=${JOB_ID:?a name shared by the nodes of this job}
RELAX_TIMES=${RELAX_TIMES:?comma-separated relax times of this job}
SEED=${SEED:-0}
FCN=${FCN:-0}           # 1 in exactly one job of each seed
RUNS=${RUNS:-runs}      # on a shared file system
PYTHON=${PYTHON:-python}

extra=()
[ "$FCN" = 1 ] || extra+=(--no-fcn)

exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "$JOB_ID" \
    -m efcn_sparse relax \
    --model resnet18 --dataset cifar10 --data-dir data/cifar10 \
    --halo full --epochs 100 --relax-times "$RELAX_TIMES" --seed "$SEED" \
    --optimizer sgd --lr 0.05 --momentum 0.9 --lr-schedule cosine --batch-size 256 \
    --fsdp --param-dtype bfloat16 \
    --out "$RUNS/$JOB_ID" --resume --quiet "${extra[@]}"
