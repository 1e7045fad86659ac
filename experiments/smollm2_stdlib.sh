#!/usr/bin/env bash
# Real run on the offline SmolLM2-135M (docs/results.md): MLP blocks as 2-site MPOs at an
# overall CR of 0.3 (per-layer CR solved by the factory, SVD init), recovered by local
# and by global with the same wall-clock budget, on Python's own English help text.
# Usage: bash experiments/smollm2_stdlib.sh [output root] [budget hh:mm:ss]
set -euo pipefail
root=${1:-outputs/smollm2_stdlib}
budget=${2:-00:00:12:00}
common=(model=smollm2_135m data=stdlib_text tensorize=mpo_llama_mlp tensorize.overall_cr=0.3
        tensorize.init=svd tensorize.layout=balanced tensorize.allocation=uniform
        data.seq_len=128 data.batch_size=8 trainer.max_epochs=1 "+trainer.max_time=$budget"
        trainer.limit_val_batches=8 eval.perplexity.max_length=512 eval.perplexity.stride=256
        eval.perplexity.max_tokens=8192 logger=csv callbacks.progress_bar=tqdm
        experiment_name=smollm2_stdlib)
uv run tnexp method=local "${common[@]}" method.local.batch_size=8 \
  method.local.optimizer.lr=1e-4 hydra.run.dir="$root/local"
uv run tnexp method=global "${common[@]}" method.global.batch_size=8 \
  method.global.optimizer.lr=1e-4 eval.perplexity.teacher=false hydra.run.dir="$root/global"
