#!/usr/bin/env bash
# Data-aware tensorization of the offline SmolLM2-135M (docs/results.md, docs/data_aware.md):
# all 90 MLP projections as whitened low-rank MPOs at an overall CR of 0.3, per-layer ranks
# from the whitened spectra, then local recovery with a warm-up + cosine schedule.
# Usage: bash experiments/smollm2_data_aware.sh [output root] [budget dd:hh:mm:ss] [cr] [overrides...]
# Environment: LR (default 5e-4), ALLOCATION (adaptive), CALIBRATION_BATCHES (64).
set -euo pipefail
root=${1:-outputs/smollm2_data_aware}
budget=${2:-00:00:20:00}
cr=${3:-0.3}
shift $(( $# < 3 ? $# : 3 ))  # the rest are extra tnexp overrides
common=(model=smollm2_135m data=stdlib_text tensorize=mpo_llama_mlp "tensorize.overall_cr=$cr"
        tensorize.init=whiten tensorize.layout=lowrank "tensorize.allocation=${ALLOCATION:-adaptive}"
        tensorize.calibration.num_batches=${CALIBRATION_BATCHES:-64}
        data.seq_len=128 data.batch_size=8 trainer.max_epochs=1 "+trainer.max_time=$budget"
        trainer.limit_val_batches=8 +trainer.val_check_interval=25
        eval.perplexity.max_length=512 eval.perplexity.stride=256
        eval.perplexity.max_tokens=8192 logger=csv callbacks.progress_bar=tqdm
        experiment_name=smollm2_data_aware)
uv run tnexp method=local "${common[@]}" method.local.batch_size=8 \
  "method.local.optimizer.lr=${LR:-5e-4}" +method.local.optimizer.scheduler=cosine \
  +method.local.optimizer.warmup_steps=10 hydra.run.dir="$root/local-cr$cr-lr${LR:-5e-4}" "$@"
