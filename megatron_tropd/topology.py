"""Student and teacher process groups: each model gets its own tensor x pipeline x data-parallel layout.

The student is the model Megatron-Core trains (DDP, optimizer, schedules, dist-checkpointing), so its
layout is also installed in ``megatron.core.parallel_state``, where Megatron's internals still look for
it. The teacher, forward-only, gets an explicit ``ProcessGroupCollection`` built here; when the two
layouts are equal it shares the student's groups. Every caller receives its groups as arguments: nothing
in the package reads a global group. This is the only module that touches ``parallel_state`` or
``new_group``.

Rank order follows Megatron's default ``tp-cp-ep-dp-pp`` (tensor fastest, pipeline slowest):
``rank = tp_rank + TP * (dp_rank + DP * pp_rank)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megatron_tropd.config import replicas


@dataclass(frozen=True)
class ParallelLayout:
    """How one model is split over the job's ranks; data parallelism takes the rest."""

    tensor_parallel: int = 1
    """Ranks that shard each layer (and the vocabulary)."""
    pipeline_parallel: int = 1
    """Pipeline stages."""

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def data_parallel(self, world_size: int, who: str = "model") -> int:
        """Replicas of the model in a job of ``world_size`` ranks; ValueError when it does not fit."""
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ValueError(f"{who}: tensor_parallel and pipeline_parallel must be >= 1, got {self}")
        return replicas(who, self.tensor_parallel, self.pipeline_parallel, world_size)


@dataclass(frozen=True)
class GridPosition:
    """A rank's coordinates in one model's layout."""

    tp_rank: int
    dp_rank: int
    pp_rank: int


def grid_position(rank: int, layout: ParallelLayout, data_parallel: int) -> GridPosition:
    tp = layout.tensor_parallel
    return GridPosition(rank % tp, (rank // tp) % data_parallel, rank // (tp * data_parallel))


def grid_rank(position: GridPosition, layout: ParallelLayout, data_parallel: int) -> int:
    tp = layout.tensor_parallel
    return position.tp_rank + tp * (position.dp_rank + data_parallel * position.pp_rank)


@dataclass
class ModelGroups:
    """One model's process groups and this rank's place in them."""

    layout: ParallelLayout
    data_parallel: int
    position: GridPosition
    pg_collection: object  # megatron.core.process_groups_config.ProcessGroupCollection
    pipeline_ranks: tuple[int, ...]  # global ranks of this rank's pipeline, first stage first

    @property
    def tp_group(self):
        return self.pg_collection.tp

    @property
    def pp_group(self):
        return self.pg_collection.pp

    @property
    def dp_group(self):
        return self.pg_collection.dp

    @property
    def is_first_stage(self) -> bool:
        return self.position.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.position.pp_rank == self.layout.pipeline_parallel - 1

    @property
    def is_reporting_rank(self) -> bool:
        """The one rank whose reduced metrics are logged: last stage, data- and tensor-parallel rank 0."""
        return self.is_last_stage and self.position.dp_rank == 0 and self.position.tp_rank == 0


@dataclass
class Topology:
    """The job's layouts: the student's, the (first) teacher's, and those of further teachers."""

    student: ModelGroups
    teacher: ModelGroups
    world_size: int
    rank: int
    others: dict[ParallelLayout, ModelGroups] = field(default_factory=dict)

    def groups_for(self, layout: ParallelLayout) -> ModelGroups:
        """The groups of ``layout``: a layout the job has already, else new groups (collective: every rank
        asks for the same layouts in the same order)."""
        for known in (self.student, self.teacher, *self.others.values()):
            if known.layout == layout:
                return known
        self.others[layout] = _explicit_groups(layout, self.world_size, self.rank, "teacher")
        return self.others[layout]


def _ranks_varying(layout: ParallelLayout, data_parallel: int, fixed: GridPosition, axes: tuple[str, ...]):
    """Global ranks that share ``fixed``'s coordinates except along ``axes``, in grid order."""
    sizes = {"tp_rank": layout.tensor_parallel, "dp_rank": data_parallel, "pp_rank": layout.pipeline_parallel}
    ranks = []
    for pp in range(sizes["pp_rank"]) if "pp_rank" in axes else [fixed.pp_rank]:
        for dp in range(sizes["dp_rank"]) if "dp_rank" in axes else [fixed.dp_rank]:
            for tp in range(sizes["tp_rank"]) if "tp_rank" in axes else [fixed.tp_rank]:
                ranks.append(grid_rank(GridPosition(tp, dp, pp), layout, data_parallel))
    return sorted(ranks)


def _my_group(layout: ParallelLayout, data_parallel: int, me: GridPosition, axes: tuple[str, ...], pick=None):
    """Create every group of the given kind (all ranks must call, in the same order); return mine."""
    world_size = layout.model_parallel * data_parallel
    seen, mine = set(), None
    for rank in range(world_size):
        ranks = _ranks_varying(layout, data_parallel, grid_position(rank, layout, data_parallel), axes)
        ranks = tuple(pick(ranks) if pick else ranks)
        if ranks in seen:
            continue
        seen.add(ranks)
        group = dist.new_group(list(ranks))
        if grid_rank(me, layout, data_parallel) in ranks:
            mine = group
    return mine


def _explicit_pg_collection(layout: ParallelLayout, data_parallel: int, me: GridPosition):
    """A full ``ProcessGroupCollection`` for a dense model on its own layout (no CP, no experts)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    tp = _my_group(layout, data_parallel, me, ("tp_rank",))
    pp = _my_group(layout, data_parallel, me, ("pp_rank",))
    dp = _my_group(layout, data_parallel, me, ("dp_rank",))
    mp = _my_group(layout, data_parallel, me, ("tp_rank", "pp_rank"))
    tp_dp = _my_group(layout, data_parallel, me, ("tp_rank", "dp_rank"))
    single = _my_group(layout, data_parallel, me, ())
    embd = _my_group(layout, data_parallel, me, ("pp_rank",), pick=lambda r: sorted({r[0], r[-1]}))
    pos_embd = _my_group(layout, data_parallel, me, ("pp_rank",), pick=lambda r: r[:1])
    return ProcessGroupCollection(
        tp=tp, pp=pp, mp=mp, embd=embd, pos_embd=pos_embd, cp=single, tp_cp=tp, hcp=[single],
        ep=single, expt_tp=tp, tp_ep=tp, tp_ep_pp=mp, tp_dp_cp=tp_dp, dp=dp, dp_cp=dp,
        expt_dp=dp, intra_dp_cp=dp, intra_expt_dp=dp,
    )  # fmt: skip


def _student_groups(layout: ParallelLayout, world_size: int, rank: int) -> ModelGroups:
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    data_parallel = layout.data_parallel(world_size, "student")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
    )
    me = grid_position(rank, layout, data_parallel)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    expected_tp = _ranks_varying(layout, data_parallel, me, ("tp_rank",))
    assert dist.get_process_group_ranks(pgs.tp) == expected_tp, "megatron rank order changed"
    pipeline = tuple(_ranks_varying(layout, data_parallel, me, ("pp_rank",)))
    return ModelGroups(layout, data_parallel, me, pgs, pipeline)


def build_topology(student: ParallelLayout, teacher: ParallelLayout) -> Topology:
    """Build both models' groups on the initialised default process group (collective on all ranks)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call runtime.init_distributed() first")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    teacher.data_parallel(world_size, "teacher")  # check both before creating any group
    student_groups = _student_groups(student, world_size, rank)
    if teacher == student:
        return Topology(student_groups, student_groups, world_size, rank)
    return Topology(student_groups, _explicit_groups(teacher, world_size, rank, "teacher"), world_size, rank)


def _explicit_groups(layout: ParallelLayout, world_size: int, rank: int, who: str) -> ModelGroups:
    """A frozen model's groups on ``layout``, created explicitly (collective on all ranks)."""
    data_parallel = layout.data_parallel(world_size, who)
    me = grid_position(rank, layout, data_parallel)
    pgs = _explicit_pg_collection(layout, data_parallel, me)
    pipeline = tuple(_ranks_varying(layout, data_parallel, me, ("pp_rank",)))
    return ModelGroups(layout, data_parallel, me, pgs, pipeline)


def replica_rows(
    num_rows: int, data_parallel: int, dp_rank: int, lengths=None, uneven: bool = False
) -> slice:
    """The contiguous rows of the global batch that data-parallel rank ``dp_rank`` owns: equal row counts,
    or, given each row's token count in ``lengths``, balanced token counts (``packing``); ``uneven`` (with
    ``lengths``): a sub-batch of any size, some ranks possibly empty."""
    if lengths is None:
        return data_parallel_rows(num_rows, data_parallel, dp_rank)
    from megatron_tropd.packing import token_balanced_ranges

    return token_balanced_ranges(lengths, data_parallel, allow_empty=uneven)[dp_rank]


def data_parallel_rows(num_rows: int, data_parallel: int, dp_rank: int) -> slice:
    """The contiguous rows of the global batch that data-parallel rank ``dp_rank`` owns."""
    if num_rows % data_parallel:
        raise ValueError(
            f"the global batch of {num_rows} sequences does not split over {data_parallel} data-parallel "
            "ranks; make the number of rollouts per step a multiple of every model's data-parallel size"
        )
    per_rank = num_rows // data_parallel
    return slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
