"""Checkpoints of the student (resumable training state) and of model weights (teachers, conversion).

On disk, a run's checkpoint root holds one directory per saved step and a marker naming the newest::

    root/
      latest                    "step-0000200": the checkpoint a resume starts from
      step-0000100/  step-0000200/
      tmp-step-0000300-3fa9c2e1/   a save in progress (or one that crashed; removed by the next save)

Each step directory is a Megatron dist-checkpoint (``torch_dist`` backend: ``metadata.json``,
``common.pt``, ``*.distcp``) of ``{"model": GPTModel stage, "optimizer": MegatronOptimizer}`` plus:

- ``tropd_checkpoint.json`` (rank 0): step, the caller's loop state (JSON), the LR scheduler's state, the
  student's ``ModelConfig`` (a resume into another shape is refused before anything is read), the layout
  it was saved from, the optimizer format and every other file's size and hash. Written last, it marks
  the directory complete.
- ``rng/rank-00000.pt`` (every rank): its generator states, restored only when the world size is unchanged.

Atomicity: every rank writes into ``tmp-step-XXXXXXX-<nonce>`` (the nonce is drawn on rank 0 and
broadcast), then rank 0 renames it to ``step-XXXXXXX`` and only then replaces ``latest`` (temp file +
``os.replace``), then prunes old steps. A crash at any point leaves ``latest`` naming a complete
directory; the next save deletes leftover ``tmp-*`` entries. A save written in the background
(``async_save=True``) stays a ``tmp-*`` directory until it is finalized (``finalize_pending_save``, or
the next save or load), which records and publishes it the same way. One job per root: saves are not safe
against a second job writing into the same root.

Resharding: weights always reshard over TP/PP/DP (dist-checkpointing; the vocabulary padding, which grows
with TP, is absorbed by Megatron's ``allow_shape_mismatch`` on the embedding and LM head). The
DistributedOptimizer's state reshards over DP only in the default format ``dp_reshardable``, over any
layout in ``fully_reshardable`` (``checkpoint.optimizer_format``; see ``optimizer``).

Every function that saves is collective over the default process group. Megatron's asynchronous writer
starts worker processes with the ``spawn`` method, so a script that saves must keep its entry point under
``if __name__ == "__main__":`` (torchrun scripts and ``megatron_tropd.spawn`` workers do).

Modules, each with one concern:

- ``errors``      ``CheckpointError``
- ``background``  saves written by a helper process while training goes on, published once complete
- ``atomic``      durable writes and the atomic publish of a directory (also used by HF conversion)
- ``collective``  rank-0 decisions shared with every rank
- ``layout``      names on disk, the ``latest`` marker, publishing a step, pruning, damaged steps
- ``manifest``    the file manifest, hashed and checked over all ranks (``megatron_tropd.integrity``)
- ``metadata``    ``tropd_checkpoint.json`` and the model-shape check
- ``optimizer``   the formats, the sharded state dicts and the torch-Adam workarounds
- ``rng``         the per-rank RNG side files
- ``save``        ``save_checkpoint``, ``save_model_weights``
- ``load``        ``load_checkpoint``, ``load_model_weights``, ``read_weights_config``
"""

from __future__ import annotations

from megatron_tropd.checkpoint.background import abandon_pending_save, finalize_pending_save
from megatron_tropd.checkpoint.errors import CheckpointError
from megatron_tropd.checkpoint.layout import CHECKPOINT_METADATA, LATEST, latest_checkpoint, step_dir_name
from megatron_tropd.checkpoint.load import load_checkpoint, load_model_weights, read_weights_config
from megatron_tropd.checkpoint.save import save_checkpoint, save_model_weights, signal_safe_save_strategy
from megatron_tropd.config import ON_DAMAGED, OPTIMIZER_FORMATS  # torch-free: the run config validates them

__all__ = [
    "CHECKPOINT_METADATA",
    "LATEST",
    "OPTIMIZER_FORMATS",
    "ON_DAMAGED",
    "CheckpointError",
    "abandon_pending_save",
    "finalize_pending_save",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "read_weights_config",
    "save_checkpoint",
    "save_model_weights",
    "signal_safe_save_strategy",
    "step_dir_name",
]
