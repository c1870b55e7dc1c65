"""The student's sharded state dicts (model + optimizer), the DistributedOptimizer's formats on disk, and
the workarounds Megatron-Core needs for torch's Adam.

The formats (``config.OPTIMIZER_FORMATS``, set by ``checkpoint.optimizer_format``): ``dp_reshardable``
(every rank writes its own buffer shards, no gather) reshards over DP only, so a resume must keep TP and
PP; ``fully_reshardable`` (gathers each parameter's state over DP at save time) resumes on any TP/PP/DP.
The non-distributed optimizer is always model-space and reshards freely.

Megatron-Core quirks handled here (``docs/research/feasibility.md`` section 3), for torch's Adam -- the
optimizer Megatron falls back to without TE/apex (CPU, and GPUs without those packages):
1. ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` asserts one Adam ``step`` over all
   parameters, which fails while the Adam state is still empty: we fill it with zeros first.
2. The per-parameter ``step`` is not restored (``dp_reshardable`` brings back 0, so bias correction would
   restart): we set it from the checkpoint's ``param_groups`` step.
3. The ``fully_reshardable`` loader copies every key of the live Adam state from the checkpoint and fails
   with ``KeyError: 'step'``: we hide ``step`` while it runs, then set it as in (2).
With TE's or apex's fused Adam (GPU containers) ``step`` lives in the param groups, and none is applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_tropd.checkpoint.errors import CheckpointError


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel stage inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_metadata(model: torch.nn.Module, optimizer_format: str | None = None) -> dict[str, Any]:
    """``sharded_state_dict`` metadata: the model's own DP group (never the global parallel_state's)."""
    metadata: dict[str, Any] = {"dp_cp_group": model.pg_collection.dp_cp}
    if optimizer_format is not None:
        metadata["distrib_optim_sharding_type"] = optimizer_format
    return metadata


def sub_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def check_optimizer_can_resume(saved: dict[str, Any], student: Any, directory: Path) -> None:
    """The saved optimizer must be of the same kind, and a DP-only format needs the same TP and PP."""
    optimizer, layout = saved["optimizer"], saved["layout"]
    distributed = student.optim_config.use_distributed_optimizer
    if optimizer["distributed"] != distributed:
        raise CheckpointError(
            f"{directory} holds {'a distributed' if optimizer['distributed'] else 'a non-distributed'} "
            f"optimizer state but the student uses use_distributed_optimizer={distributed}: resume with "
            f"optim.use_distributed_optimizer={optimizer['distributed']}"
        )
    now = student.groups.layout
    same_model_split = (layout["tensor_parallel"], layout["pipeline_parallel"]) == (
        now.tensor_parallel,
        now.pipeline_parallel,
    )
    if distributed and optimizer["format"] == "dp_reshardable" and not same_model_split:
        raise CheckpointError(
            f"{directory} was saved at TP={layout['tensor_parallel']} PP={layout['pipeline_parallel']} "
            f"with the DP-only optimizer format 'dp_reshardable'; the student runs TP={now.tensor_parallel} "
            f"PP={now.pipeline_parallel}: resume on the saved TP/PP (any DP), or save the run with "
            "checkpoint.optimizer_format=fully_reshardable (resumable on any layout) before changing it"
        )


# ---------------------------------------------------------------------------------------------------------
# Sharded state dicts and the torch-Adam workarounds
# ---------------------------------------------------------------------------------------------------------


def _uses_torch_adam_distributed(sub_optimizer: Any) -> bool:
    """A DistributedOptimizer over torch's Adam (no TE/apex): the one that needs workarounds 1-3."""
    from megatron.core.optimizer import distrib_optimizer

    return isinstance(sub_optimizer, distrib_optimizer.DistributedOptimizer) and not (
        distrib_optimizer.HAVE_APEX_OR_TE
    )


def _fill_empty_adam_state(sub_optimizer: Any) -> None:
    """Workaround 1: give every main parameter the state torch's Adam would create lazily (zeros, step 0).

    Megatron's ``state_dict()`` asserts one common ``step`` over the Adam state, so an optimizer that has
    not stepped yet could be neither saved nor loaded. Zeros and step 0 are exactly what Adam's first step
    starts from, so the update is unchanged.
    """
    adam = sub_optimizer.optimizer
    for group in adam.param_groups:
        for param in group["params"]:
            if not adam.state[param]:
                adam.state[param].update(
                    step=torch.tensor(0.0, dtype=_adam_step_dtype()),
                    exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format),
                )


def _adam_step_dtype() -> torch.dtype:
    """The dtype torch's Adam keeps ``step`` in (float32 unless the default dtype is float64)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def student_state_dict(student: Any, optimizer_format: str | None, *, is_loading: bool) -> dict[str, Any]:
    """``{"model": ..., "optimizer": ...}`` sharded state dict of the student (the same for save and load)."""
    metadata = model_metadata(student.module, optimizer_format)
    model_state = student.module.sharded_state_dict(metadata=metadata)
    for sub_optimizer in sub_optimizers(student.optimizer):
        if _uses_torch_adam_distributed(sub_optimizer):
            _fill_empty_adam_state(sub_optimizer)
    optimizer_state = student.optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=metadata
    )
    return {"model": model_state, "optimizer": optimizer_state}


def _load_distributed_torch_adam(sub_optimizer: Any, state_dict: dict[str, Any]) -> None:
    """Load a DistributedOptimizer over torch's Adam, working around Megatron's ``step`` handling.

    Megatron's ``load_state_dict`` first puts the checkpoint's step into the Adam state, then lets the
    parameter-state loader overwrite every key of that state from the checkpoint: ``dp_reshardable``
    overwrites ``step`` with the loading template's 0 (workaround 2), ``fully_reshardable`` has no
    ``step`` and raises ``KeyError`` (workaround 3). So the parameter state is loaded with ``step``
    hidden, and ``step`` is then set from the checkpoint's param groups -- one tensor per parameter:
    Megatron would share a single tensor, which torch's in-place ``step += 1`` would advance once per
    parameter.
    """
    state_dict = dict(state_dict)
    param_state = state_dict.pop("param_state")
    sharding_type = state_dict.pop("param_state_sharding_type")
    sub_optimizer.load_state_dict(state_dict)  # param groups (lr, betas, step); no parameter state
    steps = {group["step"] for group in state_dict["optimizer"]["param_groups"]}
    assert len(steps) == 1, f"expected one Adam step in the checkpoint, got {steps}"
    adam_states = list(sub_optimizer.optimizer.state.values())
    for adam_state in adam_states:
        adam_state.pop("step", None)
    loaders = {
        "dp_reshardable": sub_optimizer.load_parameter_state_from_dp_reshardable,
        "fully_reshardable": sub_optimizer.load_parameter_state_from_fully_reshardable,
    }
    loaders[sharding_type](param_state)
    step = float(steps.pop())
    for adam_state in adam_states:
        adam_state["step"] = torch.tensor(step, dtype=_adam_step_dtype())


@torch.no_grad()  # the fp32 main parameters can be views of the (leaf) model parameters
def load_optimizer_state(optimizer: Any, loaded: Any) -> None:
    subs = sub_optimizers(optimizer)
    if not any(_uses_torch_adam_distributed(sub) for sub in subs):
        optimizer.load_state_dict(loaded)
        return
    parts = [loaded] if len(subs) == 1 else [loaded[index] for index in range(len(subs))]
    for sub_optimizer, part in zip(subs, parts, strict=True):
        if _uses_torch_adam_distributed(sub_optimizer):
            _load_distributed_torch_adam(sub_optimizer, part)
        else:
            sub_optimizer.load_state_dict(part)
