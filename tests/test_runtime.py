"""CPU mode and process start-up: unmodified Megatron-Core models, schedules, optimizer and checkpointing
on gloo, each checked against a single-layout reference in real separate processes.

Workers are module-level functions (the spawn helper imports them in the child); each returns plain
numbers / tensors and the assertions run in the parent, except where a check needs the live objects.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_tropd.spawn import run_on_ranks

VOCAB, SEQ, MICRO_BATCH, NUM_MICROBATCHES = 128, 16, 2, 4

# fp32: TP=2 splits the hidden/vocab reductions over an all-reduce, which changes the summation order.
# Measured here: loss bitwise equal, grad norm 1.4e-8 relative; we assert 1e-5.
TP_RTOL = 1e-5


# ---------------------------------------------------------------------------------------------------------
# helpers used inside the workers
# ---------------------------------------------------------------------------------------------------------


def _setup_megatron(tp: int = 1, pp: int = 1, seed: int = 1234):
    """CPU mode + Megatron parallel state + seeded RNGs, as a trainer would do it."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_tropd import runtime

    runtime.init_distributed()
    runtime.enable_cpu_mode()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    runtime.set_seed(seed)  # the CPU stream drives use_cpu_initialization: same full weights for any TP
    model_parallel_cuda_manual_seed(seed)  # works only with CPU mode's RNG tracker


def _tiny_gpt(tp: int, pp: int, num_layers: int = 4, tied_embeddings: bool = False):
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        tensor_model_parallel_size=tp,  # both sizes must be in the config, not only in parallel_state:
        pipeline_model_parallel_size=pp,  # otherwise every stage silently builds every layer
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        share_embeddings_and_output_weights=tied_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def _microbatches(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    """Random-token microbatches from their own generator (independent of the model-init stream)."""
    generator = torch.Generator().manual_seed(seed)
    causal_mask = torch.tril(torch.ones(1, 1, SEQ, SEQ)) < 0.5  # True = masked
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
        batches.append(
            {
                "tokens": tokens[:, :-1],  # [B, S]
                "labels": tokens[:, 1:],  # [B, S]
                "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ),
                "attention_mask": causal_mask,
            }
        )
    return batches


def _forward_step(data_iterator, model):
    """Megatron's forward_step_func contract; loss_func returns (loss_sum, num_tokens, metrics)."""
    batch = next(data_iterator)
    per_token_loss = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )  # [B, S] on the last stage, hidden states elsewhere

    def loss_func(output):
        loss_sum = output.float().sum()
        num_tokens = torch.tensor(output.numel(), dtype=torch.int)
        return loss_sum, num_tokens, {"loss_sum": loss_sum.detach().clone(), "num_tokens": num_tokens}

    return per_token_loss, loss_func


def _run_schedule(model, batches, forward_only: bool) -> list[float]:
    """Per-microbatch mean losses on the last pipeline stage, [] elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    outputs = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=forward_only,
    )
    return [float(out["loss_sum"] / out["num_tokens"]) for out in outputs]


def _global_grad_norm(model) -> float:
    """L2 norm of the full (unsharded) gradient: TP-duplicated params counted once."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    squares = torch.zeros((), dtype=torch.float64)
    for param in model.parameters():
        if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
            squares += param.grad.double().square().sum()
    torch.distributed.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
    return float(squares.sqrt())


# ---------------------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------------------


def _tp_worker(rank: int, world_size: int) -> dict:
    """The same tiny GPT at TP=1 then TP=2 in the same processes: loss and global grad norm."""
    from megatron_tropd import runtime

    info = runtime.init_distributed()
    batch = _microbatches(seed=0, count=1)[0]
    results = {"info": info}
    for tp in (1, 2):
        _setup_megatron(tp=tp)
        model = _tiny_gpt(tp=tp, pp=1)
        loss = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
        loss.mean().backward()
        results[tp] = {"loss": float(loss.mean()), "grad_norm": _global_grad_norm(model)}
    runtime.shutdown_distributed()
    return results


def _merge_stage_tensors(tensors: dict[str, torch.Tensor], layer_offset: int) -> dict[str, torch.Tensor]:
    """Rename a pipeline stage's local ``decoder.layers.<i>`` to the global layer index."""
    renamed = {}
    for name, tensor in tensors.items():
        prefix = "decoder.layers."
        if name.startswith(prefix):
            local_index, rest = name[len(prefix) :].split(".", 1)
            name = f"{prefix}{int(local_index) + layer_offset}.{rest}"
        renamed[name] = tensor.detach().clone() if isinstance(tensor, torch.Tensor) else tensor
    return renamed


def _pp_worker(rank: int, world_size: int) -> dict:
    """PP=2 through get_forward_backward_func (1F1B, 4 microbatches), then the same weights at PP=1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_tropd import runtime

    batches = _microbatches(seed=1, count=NUM_MICROBATCHES)
    _setup_megatron(pp=2)
    stage = _tiny_gpt(tp=1, pp=2, tied_embeddings=True)
    pipelined_losses = _run_schedule(stage, batches, forward_only=False)
    offset = parallel_state.get_pipeline_model_parallel_rank() * 2  # 4 layers / 2 stages
    stage_weights = _merge_stage_tensors(stage.state_dict(), offset)
    stage_grads = _merge_stage_tensors({n: p.grad for n, p in stage.named_parameters()}, offset)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (pipelined_losses, stage_weights, stage_grads))

    full_weights = {**gathered[0][1], **gathered[1][1]}
    # Tied embeddings: the last stage holds a copy of the word embeddings as output_layer.weight, synced
    # from the first stage at construction; a PP=1 model has no separate output weight.
    tied_copy = full_weights.pop("output_layer.weight")
    _setup_megatron(pp=1)
    full = _tiny_gpt(tp=1, pp=1, tied_embeddings=True)
    full.load_state_dict(full_weights, strict=True)
    full_losses = _run_schedule(full, batches, forward_only=False)
    full_grads = {n: p.grad.detach().clone() for n, p in full.named_parameters()}
    runtime.shutdown_distributed()
    return {
        "pipelined_losses": gathered[1][0],  # the last stage holds the losses
        "first_stage_losses": gathered[0][0],
        "full_losses": full_losses,
        "tied_copy_matches": torch.equal(tied_copy, full_weights["embedding.word_embeddings.weight"]),
        "stage_grads": {**gathered[0][2], **gathered[1][2]},
        "full_grads": full_grads,
    }


def _ddp_with_distributed_optimizer(gpt):
    """Megatron DDP (fp32 grad buffers) + Adam from get_megatron_optimizer, as a DistributedOptimizer."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = DistributedDataParallel(gpt.config, ddp_config, gpt)
    gpt.config.finalize_model_grads_func = finalize_model_grads  # DP reduce-scatter of the grad buffers
    gpt.config.no_sync_func = model.no_sync
    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=1.0
    )
    return model, get_megatron_optimizer(optimizer_config, [model])


def _checkpoint_round_trip(gpt, optimizer, checkpoint_dir: str) -> bool:
    """Save model + optimizer with dist-checkpointing, scramble the weights, load: bitwise equal again?"""
    from megatron.core import dist_checkpointing

    saved = {name: t.clone() for name, t in gpt.state_dict().items() if isinstance(t, torch.Tensor)}
    sharded_model = gpt.sharded_state_dict()
    # The DistOpt default format (fully_sharded_model_space) is refused by the torch_dist backend.
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    sharded_optimizer = optimizer.sharded_state_dict(sharded_model, metadata=metadata)
    dist_checkpointing.save({"model": sharded_model, "optimizer": sharded_optimizer}, checkpoint_dir)
    with torch.no_grad():
        for param in gpt.parameters():
            param.add_(1.0)  # so that an ignored load cannot pass
    loaded = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, checkpoint_dir)
    gpt.load_state_dict(loaded["model"], strict=True)
    return all(torch.equal(tensor, gpt.state_dict()[name]) for name, tensor in saved.items())


def _distributed_optimizer_worker(rank: int, world_size: int, checkpoint_dir: str) -> dict:
    """DDP + DistributedOptimizer (Adam) at DP=2, then a dist-checkpointing save/load round trip."""
    import torch.distributed as dist

    from megatron_tropd import runtime

    _setup_megatron()
    gpt = _tiny_gpt(tp=1, pp=1, num_layers=2)
    model, optimizer = _ddp_with_distributed_optimizer(gpt)
    batches = _microbatches(seed=100 + rank, count=2)  # each DP rank trains on its own data

    def eval_loss() -> float:  # mean over microbatches and DP ranks
        loss = torch.tensor(sum(_run_schedule(model, batches, forward_only=True)) / len(batches))
        dist.all_reduce(loss)
        return float(loss) / world_size

    loss_before = eval_loss()
    for _ in range(3):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        _run_schedule(model, batches, forward_only=False)
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful and grad_norm > 0
    loss_after = eval_loss()

    # DistributedOptimizer updates a shard per rank then all-gathers params: replicas must agree bitwise.
    checksum = torch.stack([p.detach().double().sum() for p in gpt.parameters()])
    replicas = [torch.empty_like(checksum) for _ in range(world_size)]
    dist.all_gather(replicas, checksum)
    restored_bitwise = _checkpoint_round_trip(gpt, optimizer, checkpoint_dir)
    loss_restored = eval_loss()
    runtime.shutdown_distributed()
    # get_megatron_optimizer wraps its per-param-group optimizers in a ChainedOptimizer.
    sub_optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    return {
        "optimizer_types": {type(sub).__name__ for sub in sub_optimizers},
        "loss_before": loss_before,
        "loss_after": loss_after,
        "replicas_equal": all(torch.equal(replicas[0], other) for other in replicas),
        "restored_bitwise": restored_bitwise,
        "loss_restored": loss_restored,
        "checkpoint_files": sorted(os.listdir(checkpoint_dir)),
    }


def _cuda_allocation() -> str:
    try:
        return "allowed" if torch.zeros(2, device="cuda").device.type == "cuda" else "cpu"
    except (AssertionError, RuntimeError):  # torch built without CUDA
        return "refused"


def _cpu_mode_toggle_worker(rank: int, world_size: int) -> dict:
    """enable/disable semantics, and init_distributed without launcher variables."""
    from megatron.core import utils as megatron_utils
    from megatron.core.tensor_parallel import random as megatron_random

    from megatron_tropd import runtime

    originals = {
        "current_device": torch.cuda.current_device,
        "synchronize": torch.cuda.synchronize,
        "Event": torch.cuda.Event,
        "get_tensor": megatron_utils.GlobalMemoryBuffer.get_tensor,
        "tracker_class": megatron_random.CudaRNGStatesTracker,
    }
    checks = {"enabled_first": runtime.enable_cpu_mode(), "flag_on": runtime.cpu_mode_enabled()}
    tracker = megatron_random.get_cuda_rng_tracker()
    stub = torch.cuda.current_device
    checks["enabled_again"] = runtime.enable_cpu_mode()
    stack = torch.overrides._get_current_function_mode_stack()
    checks["modes_on_stack"] = sum(type(mode).__name__ == "_CudaToCpuFunctionMode" for mode in stack)
    checks["same_stub_and_tracker"] = (
        torch.cuda.current_device is stub and megatron_random.get_cuda_rng_tracker() is tracker
    )
    checks["cuda_alloc_device"] = torch.zeros(2, device="cuda").device.type
    checks["to_int_device"] = torch.ones(2).to(0).device.type
    tensor = torch.ones(2)
    checks["cuda_is_identity"] = tensor.cuda() is tensor
    checks["type_on"] = tensor.type()
    checks["buffer_device"] = (
        megatron_utils.GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x").device.type
    )
    with runtime.cpu_mode_suspended():  # no interception inside: a "cuda" placement is refused again
        checks["suspended_alloc"] = _cuda_allocation()
    checks["resumed_alloc"] = _cuda_allocation()

    # The tracker forks the CPU stream: draws inside a fork are reproducible and leave the outer stream alone.
    megatron_random.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = megatron_random.get_cuda_rng_tracker()
    torch.manual_seed(0)
    expected_outer = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        inside_first = torch.rand(3)
    outer = torch.rand(3)
    megatron_random.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    with megatron_random.get_cuda_rng_tracker().fork():
        inside_again = torch.rand(3)
    checks["fork_reproducible"] = torch.equal(inside_first, inside_again)
    checks["outer_stream_untouched"] = torch.equal(outer, expected_outer)

    runtime.disable_cpu_mode()
    runtime.disable_cpu_mode()  # second call is a no-op
    checks["flag_off"] = runtime.cpu_mode_enabled()
    checks["restored"] = {
        "current_device": torch.cuda.current_device is originals["current_device"],
        "synchronize": torch.cuda.synchronize is originals["synchronize"],
        "Event": torch.cuda.Event is originals["Event"],
        "get_tensor": megatron_utils.GlobalMemoryBuffer.get_tensor is originals["get_tensor"],
        "tracker_class": megatron_random.CudaRNGStatesTracker is originals["tracker_class"],
    }
    checks["type_off"] = torch.ones(2).type()
    checks["cuda_alloc_after_disable"] = _cuda_allocation()

    # Without launcher variables init_distributed starts a single-process gloo group by itself.
    runtime.shutdown_distributed()
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    first, second = runtime.init_distributed(), runtime.init_distributed()
    summed = torch.ones(1)
    torch.distributed.all_reduce(summed)
    checks["single_process"] = (first, second == first, float(summed))
    runtime.shutdown_distributed()
    return checks


def _gpu_start_up_worker(rank: int, world_size: int) -> dict:
    """On a GPU: launcher-less init picks nccl and the GPU; enable_cpu_mode touches nothing."""
    import torch.distributed as dist

    from megatron_tropd import runtime

    runtime.shutdown_distributed()  # the spawn helper started gloo; start as a user script would
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    current_device = torch.cuda.current_device
    info = runtime.init_distributed()
    enabled = runtime.enable_cpu_mode()
    summed = torch.ones(2, device=runtime.default_device())
    dist.all_reduce(summed)
    checks = {
        "info": info,
        "default_device": runtime.default_device(),
        "enabled": enabled,
        "untouched": torch.cuda.current_device is current_device and not runtime.cpu_mode_enabled(),
        "summed_device": summed.device.type,
    }
    runtime.shutdown_distributed()
    return checks


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------


def test_tensor_parallel_gpt_matches_single_rank():
    """TP=2 equals TP=1 in loss and full-gradient norm (fp32, relative 1e-5)."""
    results = run_on_ranks(_tp_worker, 2)
    for rank, result in enumerate(results):
        info = result["info"]
        assert (info.rank, info.world_size, info.local_rank) == (rank, 2, rank)
        assert (info.device.type, info.backend) == ("cpu", "gloo")
        assert result[1]["loss"] == pytest.approx(result[2]["loss"], rel=TP_RTOL)
        assert result[1]["grad_norm"] == pytest.approx(result[2]["grad_norm"], rel=TP_RTOL)
        assert result[2]["grad_norm"] > 0
    assert results[0][2] == results[1][2]  # both TP ranks see the same loss and norm


def test_pipeline_parallel_schedule_matches_unpipelined_model():
    """PP=2 1F1B over 4 microbatches equals the same weights at PP=1: losses and per-layer grads bitwise;
    the tied embedding grad (first-stage + last-stage copy) to fp32 rounding."""
    result = run_on_ranks(_pp_worker, 2)[0]
    assert result["first_stage_losses"] == []
    assert len(result["pipelined_losses"]) == NUM_MICROBATCHES
    assert result["pipelined_losses"] == result["full_losses"]
    assert result["tied_copy_matches"]
    stage_grads, full_grads = result["stage_grads"], result["full_grads"]
    embedding_grad = stage_grads.pop("embedding.word_embeddings.weight") + stage_grads.pop(
        "output_layer.weight"
    )
    torch.testing.assert_close(embedding_grad, full_grads.pop("embedding.word_embeddings.weight"))
    assert stage_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        assert torch.equal(stage_grads[name], grad), name


def test_distributed_optimizer_step_and_checkpoint_round_trip(tmp_path):
    """Adam via DistributedOptimizer at DP=2 lowers the loss; dist-checkpointing restores weights bitwise."""
    results = run_on_ranks(_distributed_optimizer_worker, 2, str(tmp_path))
    for result in results:
        assert result["optimizer_types"] == {"DistributedOptimizer"}
        assert result["loss_after"] < result["loss_before"] - 0.1
        assert result["replicas_equal"]
        assert result["restored_bitwise"]
        assert result["loss_restored"] == result["loss_after"]
    assert results[0]["loss_after"] == results[1]["loss_after"]
    assert "metadata.json" in results[0]["checkpoint_files"]


def test_cpu_mode_is_idempotent_and_reversible():
    checks = run_on_ranks(_cpu_mode_toggle_worker, 1)[0]
    assert checks["enabled_first"] and checks["flag_on"] and checks["enabled_again"]
    assert checks["modes_on_stack"] == 1
    assert checks["same_stub_and_tracker"]
    assert checks["cuda_alloc_device"] == checks["to_int_device"] == checks["buffer_device"] == "cpu"
    assert checks["cuda_is_identity"]
    assert (checks["suspended_alloc"], checks["resumed_alloc"]) == ("refused", "cpu")
    assert checks["type_on"] == "torch.cuda.FloatTensor"
    assert checks["fork_reproducible"] and checks["outer_stream_untouched"]
    assert not checks["flag_off"]
    assert all(checks["restored"].values()), checks["restored"]
    assert checks["type_off"] == "torch.FloatTensor"
    assert checks["cuda_alloc_after_disable"] == "refused"
    info, repeat_equal, summed = checks["single_process"]
    assert (info.rank, info.world_size, info.backend, repeat_equal, summed) == (0, 1, "gloo", True, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_start_up_uses_nccl_and_leaves_cuda_alone():
    checks = run_on_ranks(_gpu_start_up_worker, 1)[0]
    info = checks["info"]
    assert (info.rank, info.world_size, info.backend) == (0, 1, "nccl")
    assert info.device == checks["default_device"] == torch.device("cuda", 0)
    assert checks["enabled"] is False and checks["untouched"]
    assert checks["summed_device"] == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_init_distributed_refuses_bad_launch_settings(monkeypatch):
    from megatron_tropd import runtime

    if torch.distributed.is_initialized():
        pytest.skip("this process already runs a process group")
    with pytest.raises(ValueError, match="use backend='gloo'"):
        runtime.init_distributed(backend="nccl")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="launch with torchrun"):
        runtime.init_distributed()
    assert not torch.distributed.is_initialized()
