#!/bin/bash
# Several nodes under Slurm, one `accelerate launch` per node (8 GPUs each), as OmniCorpus trains.
#SBATCH --job-name=flaminko
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=29500
srun bash -c 'accelerate launch \
    --config_file examples/accelerate_deepspeed_zero2.yaml \
    --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * 8)) \
    --machine_rank "$SLURM_PROCID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    -m flaminko.cli train examples/train_openflaminko.yaml'
