"""Memory-bounded local tensorization: distill the slices block by block.

The normal local mode (:class:`tnexp.modules.LocalDistillation`) holds the teacher, the
student and the activations of every slice on one device. For models that do not fit,
:func:`distill_blockwise` walks the model's chain of sequential blocks (residual blocks of
a CNN, decoder layers of a transformer) and keeps only the current *stage* on the device:

1. **prefix pass** - the model's prefix (stem, embeddings) runs once over the training
   samples the schedule will draw, and the first block's inputs go to a spill store (host
   memory for ``offload="cpu"``, raw files in ``work_dir`` for ``offload="disk"``).
   Extra block arguments (attention masks, positions, rotary cos/sin) are recomputed per
   batch by re-running the cheap prefix up to the first block, so they are never stored.
2. **per stage** - the stage's teacher weights are put on the device (``offload="cpu"``:
   moved from the teacher in host memory; ``offload="disk"``: read from a safetensors file,
   only that block's tensors, so the full teacher is never resident); the stage's student
   is the block tensorized through the one factory; its slices are trained with the local
   objective (:class:`tnexp.modules.objective.LocalObjective`, the normal mode's) and
   optimizer on (input, teacher output) pairs captured from the teacher block per step,
   exactly like the online local mode; then the stored inputs are propagated through
   the teacher block (``input_source="teacher"``) - and, for ``input_source="student"``,
   also through the trained student block, whose outputs become the next slices' inputs
   (sequential, as in GPTQ-style pipelines; the targets stay the teacher's own features,
   as in the normal mode). The trained block is written to ``work_dir/stages`` and freed.
3. **assembly** - the tensorized student is put together from the trained blocks.

What equals the normal mode (``tests/test_blockwise.py`` checks it): the batches (the
training loader's sampler and generator are replayed, so every epoch draws the normal
mode's batches in the same order), the per-slice losses, gradients and optimizer updates
(each slice's parameters get their own Adam state in both modes), and the initialisation:
with ``offload="cpu"`` the whole student is tensorized once up front, so even random
init draws the normal mode's numbers; with ``offload="disk"`` each block is tensorized on
its own, so SVD init (deterministic) is identical while random init is a different,
equally distributed draw. The remaining difference is float rounding: the stored block
inputs are computed in other batch compositions than the training batches, which changes
summation order in GEMMs/convolutions at the last bit (about 1e-7 relative) and Adam
carries that through training; the tests allow 1e-4.

Rooms: ``config`` (settings, stages, result), ``blocks`` (stage planning, module
surgery), ``weights`` (safetensors I/O, meta skeletons), ``teacher`` (paging, prefix probe,
chain check), ``spill`` (activation stores), ``replay`` (batch schedule), ``train`` (one
stage's training loop), ``resume`` (trained stages of this setup), ``driver``
(:func:`distill_blockwise`), ``stage`` (the Hydra stage).
"""

from tnexp.memory_bounded.blocks import plan_stages
from tnexp.memory_bounded.config import (
    OFFLOADS,
    BlockwiseConfig,
    BlockwiseError,
    BlockwiseResult,
    Stage,
    StageStats,
)
from tnexp.memory_bounded.driver import distill_blockwise
from tnexp.memory_bounded.replay import replay_schedule
from tnexp.memory_bounded.stage import run_memory_bounded_stage, validate
from tnexp.memory_bounded.weights import WeightsFile, build_skeleton, export_teacher_weights

__all__ = [
    "OFFLOADS",
    "BlockwiseConfig",
    "BlockwiseError",
    "BlockwiseResult",
    "Stage",
    "StageStats",
    "WeightsFile",
    "build_skeleton",
    "distill_blockwise",
    "export_teacher_weights",
    "plan_stages",
    "replay_schedule",
    "run_memory_bounded_stage",
    "validate",
]
