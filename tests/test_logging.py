"""The console: INFO lines from rank 0 only (the metrics' reporting rank keeps its step lines wherever it
sits), the known dependency warnings hidden while every other warning shows, and the W&B settings of
``logging`` checked before anything starts."""

from __future__ import annotations

import contextlib
import logging
import warnings

import pytest

from megatron_tropd.config import LoggingConfig, RunConfig
from megatron_tropd.console import configure_console, filter_dependency_warnings, is_console_rank
from megatron_tropd.metrics_log import MetricsLog
from megatron_tropd.overrides import apply_overrides


@contextlib.contextmanager
def _fresh_root_logger():
    """An unconfigured root logger for the block (as in a new rank), restored before pytest's own
    capture handlers are removed at the end of the test."""
    root, megatron = logging.getLogger(), logging.getLogger("megatron")
    saved = (root.handlers, root.level, megatron.level)
    root.handlers = []
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers = saved[0]
        root.setLevel(saved[1])
        megatron.setLevel(saved[2])


def _console_lines(capsys, environ):
    with _fresh_root_logger():
        configure_console(environ, cuda=False)
        logging.getLogger("megatron_tropd.trainer").info("saved checkpoint step-2")
        logging.getLogger("megatron_tropd.trainer").warning("checkpoint dir is nearly full")
        logging.getLogger("megatron.core.optimizer").info("parameter listing")
    return capsys.readouterr().err.splitlines()


def test_rank_zero_logs_info_lines(capsys):
    lines = _console_lines(capsys, {"RANK": "0"})
    assert len(lines) == 2
    assert "INFO saved checkpoint step-2" in lines[0] and "WARNING checkpoint dir" in lines[1]


@pytest.mark.parametrize("rank", ["1", "7"])
def test_other_ranks_log_no_info_lines_but_keep_warnings(capsys, rank):
    lines = _console_lines(capsys, {"RANK": rank})
    assert len(lines) == 1 and "WARNING checkpoint dir is nearly full" in lines[0]


def test_a_process_outside_a_launcher_is_the_console_rank():
    assert is_console_rank({}) and is_console_rank({"RANK": "0"}) and not is_console_rank({"RANK": "3"})


def test_the_reporting_rank_keeps_its_step_lines_on_a_later_rank(capsys, tmp_path):
    """With pipeline parallelism the student's last stage reports, which is not rank 0."""
    with _fresh_root_logger():
        configure_console({"RANK": "1"}, cuda=False)
        log = MetricsLog(
            tmp_path, LoggingConfig(tensorboard=False), active=True, total_steps=1, progress_bar=False
        )
        log.write({"step": 0, "loss": 0.25})
        log.close()
        logging.getLogger("megatron_tropd.trainer").info("saved checkpoint step-1")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "INFO step 0  loss=0.25" in lines[0]


TE_MESSAGE = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
GRAD_MESSAGE = (
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad attribute "
    "won't be populated during autograd.backward()."
)
# (message, category, module the warning is attributed to), as a CPU run of the trainer raises them.
KNOWN = [
    (TE_MESSAGE, UserWarning, "megatron.core.optimizer"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends"),
    (
        "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
        UserWarning,
        "megatron.core.transformer.transformer_config",
    ),
    (GRAD_MESSAGE, UserWarning, "megatron_tropd.runtime"),
    (GRAD_MESSAGE, UserWarning, "megatron.core.optimizer.optimizer"),
    (
        "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
        "`torch.distributed.reduce_scatter_single` instead.",
        FutureWarning,
        "torch.distributed.c10d_logger",
    ),
    (
        "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
        "`torch.distributed.all_gather_single` instead.",
        FutureWarning,
        "torch.distributed.c10d_logger",
    ),
    (
        "`load_state_dict` is deprecated and will be removed in future versions. Please use `load` instead.",
        FutureWarning,
        "megatron.core.dist_checkpointing.strategies.torch",
    ),
    (
        "Please use DTensor instead and we are deprecating ShardedTensor.",
        FutureWarning,
        "megatron_tropd.runtime",
    ),
]
UNRELATED = [
    ("learning rate warmup is longer than the run", UserWarning, "megatron_tropd.trainer"),
    ("some other notice", UserWarning, "megatron.core.optimizer"),  # a known module, a new message
    (TE_MESSAGE, UserWarning, "my_project.train"),  # a known message from another module
    (GRAD_MESSAGE, UserWarning, "my_project.losses"),  # the user's own non-leaf .grad access
    ("full scope is deprecated.", DeprecationWarning, "megatron.core.transformer.transformer_config"),
]


def _shown(message, category, module, *, cuda=False) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_dependency_warnings(cuda=cuda)
        warnings.warn_explicit(message, category, "dependency.py", 1, module=module, registry={})
    return len(caught) == 1


@pytest.mark.parametrize("message, category, module", KNOWN)
def test_known_dependency_warnings_are_hidden(message, category, module):
    assert not _shown(message, category, module)


@pytest.mark.parametrize("message, category, module", UNRELATED)
def test_every_other_warning_still_shows(message, category, module):
    assert _shown(message, category, module)


def test_missing_fused_kernels_are_still_said_on_a_gpu_node():
    assert _shown(TE_MESSAGE, UserWarning, "megatron.core.optimizer", cuda=True)
    assert not _shown(KNOWN[2][0], UserWarning, KNOWN[2][2], cuda=True)  # not CPU-specific: still hidden


def test_wandb_settings_come_from_the_command_line():
    config = apply_overrides(
        RunConfig(),
        ["logging.wandb_project=p", "logging.wandb_name=run-1", "logging.wandb_entity=team",
         'logging.wandb_tags=["tropd", "ablation"]'],
    )  # fmt: skip
    config.logging.validate()
    assert config.logging.wandb_tags == ("tropd", "ablation")
    assert (config.logging.wandb_name, config.logging.wandb_entity) == ("run-1", "team")


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"wandb_tags": "tropd"}, r"logging\.wandb_tags must be a list of non-empty strings.*got 'tropd'"),
        ({"wandb_tags": ("tropd", 3)}, r"logging\.wandb_tags must be a list of non-empty strings"),
        ({"wandb_tags": ("tropd", " ")}, r"logging\.wandb_tags must be a list of non-empty strings"),
        ({"wandb_entity": 7}, r"logging\.wandb_entity must be a string; got 7"),
        ({"wandb_name": None}, r"logging\.wandb_name must be a string; got None"),
    ],
)
def test_wandb_settings_of_the_wrong_type_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        LoggingConfig(wandb_project="p", **fields).validate()


def test_wandb_settings_without_a_project_are_refused():
    with pytest.raises(
        ValueError, match=r"logging\.wandb_name, logging\.wandb_tags set but logging\.wandb_project"
    ):
        LoggingConfig(wandb_name="run-1", wandb_tags=("x",)).validate()
    LoggingConfig().validate()  # W&B off and nothing of it set
