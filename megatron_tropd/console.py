"""What a job prints: log lines once (from rank 0), and no dependency warnings a user cannot act on.

``configure_console`` is the first call on every rank of a job (``python -m megatron_tropd.train``, the
demo's spawned ranks), before Megatron is imported, because most of the warnings below fire at import.
Rank 0 (``RANK`` unset or "0") logs at INFO; every other rank logs warnings and errors only, since its
INFO lines repeat rank 0's. The metrics' reporting rank keeps its step lines wherever it sits
(``metrics_log.MetricsLog``).

``KNOWN_WARNINGS`` lists, one by one, the warnings of megatron-core and torch that every run of this
project triggers and whose fix lies in those packages, not with the user. Each filter matches a message
and the module the warning is attributed to, so a new warning, or the same text from elsewhere, still
shows. The "not installed" notices about transformer-engine and apex are hidden only without CUDA: they
cannot be installed for the CPU, but on a GPU node installing them is the fix.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(message)s"


@dataclass(frozen=True)
class KnownWarning:
    """One dependency warning to hide; ``message`` and ``module`` are regular expressions matched at
    the start of the text (as ``warnings.filterwarnings`` matches them)."""

    category: type[Warning]
    message: str
    module: str
    cpu_only: bool = False


KNOWN_WARNINGS = (
    # megatron-core probes for its fused kernels at import and falls back to torch's.
    KnownWarning(
        UserWarning,
        r"(Transformer Engine and Apex are|Apex is) not installed",
        r"megatron\.core\.",
        cpu_only=True,
    ),
    # TransformerConfig's own default cuda_graph_scope ("full") is the deprecated spelling.
    KnownWarning(
        UserWarning, r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config"
    ),
    # The distributed optimizer's zero_grad asks its shard views for .grad; under the CPU mode the access
    # is attributed to runtime's torch-function hook.
    KnownWarning(
        UserWarning,
        r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
        r"(megatron\.core\.optimizer\.optimizer|megatron_tropd\.runtime)",
    ),
    # megatron-core's gradient buffers call the collectives torch renamed.
    KnownWarning(
        FutureWarning,
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        r"torch\.distributed\.c10d_logger",
    ),
    # megatron-core's dist-checkpointing loads through torch's deprecated API and ShardedTensor.
    KnownWarning(
        FutureWarning,
        r"`load_state_dict` is deprecated",
        r"megatron\.core\.dist_checkpointing\.strategies\.torch",
    ),
    KnownWarning(
        FutureWarning,
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        r"(megatron\.core\.dist_checkpointing\.|torch\.distributed\.|megatron_tropd\.runtime)",
    ),
)


def is_console_rank(environ: Mapping[str, str] = os.environ) -> bool:
    """Rank 0 of a launched job, or a process outside any launcher (``RANK`` unset)."""
    return environ.get("RANK", "0") == "0"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def filter_dependency_warnings(*, cuda: bool | None = None) -> None:
    """Hide ``KNOWN_WARNINGS`` (the CPU-only ones when ``cuda`` is false; None: ask torch). Idempotent."""
    if cuda is None:
        cuda = _cuda_available()
    for known in KNOWN_WARNINGS:
        if not (known.cpu_only and cuda):
            warnings.filterwarnings("ignore", known.message, known.category, known.module)


def configure_console(
    environ: Mapping[str, str] = os.environ, *, fmt: str = CONSOLE_FORMAT, cuda: bool | None = None
) -> None:
    """Log to stderr at INFO on rank 0 and at WARNING elsewhere; hide the known dependency warnings.

    Like ``logging.basicConfig``, it leaves a root logger that already has handlers (a launcher's, a test
    runner's) as it is on rank 0; other ranks are raised to WARNING in any case."""
    filter_dependency_warnings(cuda=cuda)
    logging.basicConfig(level=logging.INFO, format=fmt)
    root = logging.getLogger()
    if not is_console_rank(environ) and root.level < logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-parameter listings at INFO
