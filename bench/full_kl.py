"""Time and peak memory of the exact full-vocabulary forward KL from the teacher's hidden states against the
top-k forward KL, measured in the same run; and the bytes each needs moved from the teacher.

(a) full: ``vocab_parallel_full_divergence(kind="forward_kl")`` from the student logits ``[T, V]`` (fp32),
the teacher's final hidden states ``[T, H_t]`` and its output weight ``[V, H_t]`` (fp32, as
``teacher_output_weight_shard`` returns it), forward and backward. It includes the teacher's output
layer on the student's side: one matmul pass over the vocabulary, in the forward (which also writes the
gradient; the backward only scales it).
(b) top-k: ``vocab_parallel_topk_forward_kl(family="raw")`` from the student logits and the teacher's
top-k ids and log-probs ``[T, k]``, forward and backward. Both use the same token chunk (``CHUNK_BYTES``
of the device unless ``--chunk-tokens``), TP 1, one process.

Two time ratios:

- ``full_over_topk_time``: the loss ops alone, (a) over (b).
- ``full_over_topk_in_loop_time``: what each path costs in the training loop from the teacher's final
  hidden states on. With either payload the teacher's scoring still runs its output layer, the
  log-softmax statistics, the top-k and the label log-probs (``scoring.teacher_signal_fn``: the hidden
  payload returns the hidden states besides those signals), so both paths pay
  ``teacher_output_layer_and_topk_seconds`` on top of their loss op: ``(teacher + a) / (teacher + b)``.
  That teacher side is timed once, in the full path's process after its measured passes: ``hidden @
  W^T`` over the whole vocabulary then ``teacher_signal_fn`` (k = ``--k``, no entropy) on the resulting
  logits, in token blocks of ``max(T / 8, chunk_tokens)`` tokens: the teacher's logits then take an
  eighth of a logits copy (at the full size) instead of a whole one, while the matmul still runs on
  blocks large enough to be near the speed of the unchunked output layer (512 rows at the full size).
  The teacher's and the student's forward passes up to these points cost the same in both paths and
  are not timed.

Memory: each path runs in a fresh process on inputs built in place (no temporaries). Its first pass runs
under ``torch.profiler`` with ``profile_memory=True``; the running sum of the allocation (+bytes) and free
(-bytes) events in time order gives the peak of live tensor memory above the level before the pass. The
gradient of the logits ``[T, V]`` (the op's output) is subtracted, and the rest, divided by one full fp32
logits copy ``T x V x 4``, is ``extra_memory_over_logits_copy``. The same quantity from the process's
peak resident memory (``ru_maxrss`` rise, large allocations returned to the OS at once through
``MALLOC_MMAP_THRESHOLD_``) is reported as ``..._rss``: it also counts memory outside torch's allocator
(BLAS workspaces) and allocator slack. On a GPU the peak is ``torch.cuda.max_memory_allocated``.
Time: the median of ``--repeats`` unprofiled passes after the profiled one. Before both, one pass on
the first two chunks' tokens loads the libraries. ``teacher_matmul_share_of_full_time``: one pass of the
teacher's output-layer matmul alone in the loss op's chunks (timed on four chunks and scaled to all) over
the full path's time, the part no elementwise work can remove. ``one_pass_over_two_passes_time``: a
reverse-KL loss with the forward KL that the ``bias/*`` metrics read beside it, computed in the loss's
own pass (``also``, as training does) over the same two in separate calls (one teacher matmul pass each).

Payload per token: teacher hidden states ``H_t`` values against logits ``V`` values (same element size,
``--wire-bytes``, bf16 by default) and against the top-k ``k x (8 + 4)`` bytes (int64 ids, fp32
log-probs); the weight rows ``V_local x H_t x 4`` move once per job.

    python bench/full_kl.py            # tokens 4,096, vocab 151,936, hidden 2,560, k 64
    python bench/full_kl.py --quick    # tokens 512, vocab 16,384, hidden 256, chunks of 8 tokens
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import psutil
import torch

from megatron_tropd.memory import peak_cpu_tensor_bytes
from megatron_tropd.ops import (
    vocab_parallel_full_divergence,
    vocab_parallel_full_divergence_with_stats,
    vocab_parallel_topk_forward_kl,
)
from megatron_tropd.ops.vocab_parallel import CHUNK_BYTES
from megatron_tropd.scoring import teacher_signal_fn
from megatron_tropd.spawn import run_on_ranks

# Toy sizes; the chunk is 1/64 of the tokens, about the share the CPU default takes at full size (55 of
# 4,096), so that the memory ratio stays comparable.
QUICK = {"tokens": 512, "vocab": 16384, "hidden": 256, "chunk_tokens": 8}
TARGETS = {"full_over_topk_time": 1.3, "extra_memory_over_logits_copy": 0.15}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(variant: str, config: dict, device: torch.device) -> dict:
    """The inputs of one path, each filled in place so that building them leaves no freed temporaries."""
    tokens, vocab, hidden, k = config["tokens"], config["vocab"], config["hidden"], config["k"]
    torch.manual_seed(0)
    inputs = {"logits": torch.empty(tokens, vocab, device=device).normal_(std=2.0)}
    if variant == "full":
        inputs["hidden"] = torch.empty(tokens, hidden, device=device).normal_()
        # teacher logits with a standard deviation of about 2, like the student's
        inputs["weight"] = torch.empty(vocab, hidden, device=device).normal_(std=2.0 / math.sqrt(hidden))
        return inputs
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, vocab, (tokens, 1), generator=generator)
    inputs["ids"] = ((starts + torch.arange(k) * 2377) % vocab).to(device)  # k distinct ids per token
    top_lp = torch.log_softmax(torch.randn(tokens, k, generator=generator), -1) + math.log(0.9)
    inputs["lp_teacher"] = top_lp.to(device)
    return inputs


def _step(variant: str, inputs: dict, vocab: int, chunk_tokens: int):
    """One forward and backward pass of a path; returns nothing, so the gradient dies inside the pass."""
    logits = inputs["logits"].requires_grad_(True)

    def full_step():
        value = vocab_parallel_full_divergence(
            logits, inputs["hidden"], inputs["weight"], None, vocab, "forward_kl", chunk_tokens=chunk_tokens
        )
        torch.autograd.grad(value.sum(), logits)

    def topk_step():
        value = vocab_parallel_topk_forward_kl(
            logits, inputs["ids"], inputs["lp_teacher"], None, vocab, "raw", chunk_tokens
        )
        torch.autograd.grad(value.sum(), logits)

    return full_step if variant == "full" else topk_step


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _measured_peak(fn, device) -> tuple[int, int | None, float]:
    """``(tensor peak bytes, resident-memory peak bytes or None, seconds)`` of the first pass."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        seconds = _timed(fn, device)
        return torch.cuda.max_memory_allocated() - before, None, seconds
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    tensor_peak = peak_cpu_tensor_bytes(fn)
    seconds = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return tensor_peak, rss_peak, seconds


def _teacher_matmul_pass(inputs: dict, chunk_tokens: int, device, sample_chunks: int = 4) -> float:
    """Seconds of one chunked pass of the teacher's output layer alone (the full path's one pass),
    extrapolated from the first ``sample_chunks`` chunks (all chunks cost the same but the last)."""
    hidden, weight = inputs["hidden"], inputs["weight"]
    num_chunks = -(-hidden.shape[0] // chunk_tokens)
    sampled = min(sample_chunks, num_chunks)

    def few_chunks():
        for index in range(sampled):
            torch.mm(hidden[index * chunk_tokens : (index + 1) * chunk_tokens], weight.t())

    return _timed(few_chunks, device) * num_chunks / sampled


TEACHER_BLOCKS = 8  # token blocks of the teacher-side timing: its logits stay at 1/8 of a logits copy


def _teacher_output_layer_and_topk(inputs: dict, config: dict, device) -> float:
    """Seconds of the teacher's scoring from its final hidden states (both paths pay it): the output
    layer over the whole vocabulary and ``teacher_signal_fn``, in ``TEACHER_BLOCKS`` token blocks."""
    hidden, weight, vocab = inputs["hidden"], inputs["weight"], config["vocab"]
    tokens = hidden.shape[0]
    block = max(config["chunk_tokens"], -(-tokens // TEACHER_BLOCKS))
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(1)).to(device)
    signals = teacher_signal_fn(None, vocab, config["k"], with_entropy=False)

    def score(begin: int, end: int) -> None:
        logits = torch.mm(hidden[begin:end], weight.t())  # [block, V], as the teacher's output layer
        signals(logits.unsqueeze(0), labels[begin:end].unsqueeze(0))

    def all_blocks() -> None:
        for begin in range(0, tokens, block):
            score(begin, min(begin + block, tokens))

    score(0, min(2, tokens))  # loads the top-k and sort kernels' libraries outside the timing
    return _timed(all_blocks, device)


def _loss_and_metrics_divergence(inputs: dict, config: dict, device, one_pass: bool) -> float:
    """Seconds of a reverse-KL loss (forward and backward) plus the forward KL the ``bias/*`` metrics
    read: in one pass over the teacher's vocabulary (``also``), or in two calls, one pass each."""
    logits, vocab, chunk = inputs["logits"], config["vocab"], config["chunk_tokens"]
    args = (logits, inputs["hidden"], inputs["weight"], None, vocab, "reverse_kl")

    def step() -> None:
        if one_pass:
            value = vocab_parallel_full_divergence_with_stats(*args, chunk_tokens=chunk, also=("forward_kl",))
            value = value.value
        else:
            value = vocab_parallel_full_divergence(*args, chunk_tokens=chunk)
            with torch.no_grad():
                vocab_parallel_full_divergence(*args[:5], "forward_kl", chunk_tokens=chunk)
        torch.autograd.grad(value.sum(), logits)

    return _timed(step, device)


def _warm_up(variant: str, inputs: dict, config: dict) -> None:
    """One pass on the first two chunks' tokens: loads the kernels' libraries, whose pages would otherwise
    count as the measured pass's resident memory."""
    rows = 2 * config["chunk_tokens"]
    few = {name: tensor[:rows].clone() if name != "weight" else tensor for name, tensor in inputs.items()}
    _step(variant, few, config["vocab"], config["chunk_tokens"])()


def bench_worker(rank, world, variant: str, config: dict) -> dict:
    device = _device()
    inputs = _inputs(variant, config, device)
    _warm_up(variant, inputs, config)
    step = _step(variant, inputs, config["vocab"], config["chunk_tokens"])
    tensor_peak, rss_peak, first_seconds = _measured_peak(step, device)
    times = [_timed(step, device) for _ in range(config["repeats"])]
    gradient_bytes = config["tokens"] * config["vocab"] * 4
    result = {
        "seconds": statistics.median(times),
        "first_pass_seconds_profiled": first_seconds,
        "peak_bytes": tensor_peak,
        "extra_bytes": tensor_peak - gradient_bytes,
        "extra_bytes_rss": None if rss_peak is None else rss_peak - gradient_bytes,
    }
    if variant == "full":
        result["teacher_matmul_pass_seconds"] = _teacher_matmul_pass(inputs, config["chunk_tokens"], device)
        result["teacher_output_layer_and_topk_seconds"] = _teacher_output_layer_and_topk(
            inputs, config, device
        )
        for name, one_pass in (("one_pass", True), ("two_passes", False)):
            seconds = _loss_and_metrics_divergence(inputs, config, device, one_pass)
            result[f"reverse_kl_with_metrics_{name}_seconds"] = seconds
    return result


def _payload(config: dict) -> dict:
    tokens, vocab, hidden, k, wire = (config[key] for key in ("tokens", "vocab", "hidden", "k", "wire_bytes"))
    hidden_bytes, logits_bytes, topk_bytes = tokens * hidden * wire, tokens * vocab * wire, tokens * k * 12
    return {
        "hidden_bytes": hidden_bytes,
        "logits_bytes": logits_bytes,
        "topk_bytes": topk_bytes,
        "weight_bytes_once_per_job": vocab * hidden * 4,
        "payload_bytes_hidden_over_logits": hidden_bytes / logits_bytes,
        "payload_bytes_hidden_over_topk": hidden_bytes / topk_bytes,
    }


def run(config: dict) -> dict:
    # Large allocations through mmap go back to the OS as soon as they are freed, so the resident-memory
    # peak tracks live memory (glibc's default would keep freed chunks and inflate it).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    device = _device()
    budget = CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    config["chunk_tokens"] = config["chunk_tokens"] or max(1, budget // (4 * config["vocab"]))
    started = time.perf_counter()
    full = run_on_ranks(bench_worker, 1, "full", config)[0]
    topk = run_on_ranks(bench_worker, 1, "topk", config)[0]
    logits_copy = config["tokens"] * config["vocab"] * 4
    teacher = full["teacher_output_layer_and_topk_seconds"]
    results = {
        "config": config,
        "host": platform.node(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{os.cpu_count()}",
        "full": full,
        "topk": topk,
        "teacher_output_layer_and_topk_seconds": teacher,
        "full_over_topk_time": full["seconds"] / topk["seconds"],
        "full_over_topk_in_loop_time": (teacher + full["seconds"]) / (teacher + topk["seconds"]),
        "teacher_matmul_share_of_full_time": full["teacher_matmul_pass_seconds"] / full["seconds"],
        "one_pass_over_two_passes_time": full["reverse_kl_with_metrics_one_pass_seconds"]
        / full["reverse_kl_with_metrics_two_passes_seconds"],
        "extra_memory_over_logits_copy": full["extra_bytes"] / logits_copy,
        "topk_extra_memory_over_logits_copy": topk["extra_bytes"] / logits_copy,
        "payload": _payload(config),
        "targets": TARGETS,
    }
    if full["extra_bytes_rss"] is not None:
        results["extra_memory_over_logits_copy_rss"] = full["extra_bytes_rss"] / logits_copy
    results["wall_seconds"] = time.perf_counter() - started
    return results


def _print(results: dict) -> None:
    config, full, topk, payload = results["config"], results["full"], results["topk"], results["payload"]
    print(
        f"device: {results['device']}  tokens={config['tokens']} vocab={config['vocab']} "
        f"hidden={config['hidden']} k={config['k']} chunk_tokens={config['chunk_tokens']}"
    )
    matmul, teacher = full["teacher_matmul_pass_seconds"], results["teacher_output_layer_and_topk_seconds"]
    print(
        f"full-vocab FKL fwd+bwd  {full['seconds']:8.3f} s   (teacher matmul alone {matmul:.3f} s, one pass)"
    )
    print(f"top-k FKL fwd+bwd       {topk['seconds']:8.3f} s")
    print(f"teacher output layer + top-k signals (both paths, in the loop) {teacher:8.3f} s")
    print(f"full_over_topk_time             {results['full_over_topk_time']:8.3f}  (target <= 1.3)")
    print(f"full_over_topk_in_loop_time     {results['full_over_topk_in_loop_time']:8.3f}")
    print(f"teacher_matmul_share_of_full_time {results['teacher_matmul_share_of_full_time']:6.3f}")
    one, two = (
        full["reverse_kl_with_metrics_one_pass_seconds"],
        full["reverse_kl_with_metrics_two_passes_seconds"],
    )
    print(f"reverse-KL loss + forward-KL metrics: one pass {one:.3f} s, two passes {two:.3f} s")
    print(f"one_pass_over_two_passes_time   {results['one_pass_over_two_passes_time']:8.3f}")
    print(
        f"extra_memory_over_logits_copy   {results['extra_memory_over_logits_copy']:8.3f}  (target <= 0.15)"
    )
    if "extra_memory_over_logits_copy_rss" in results:
        print(f"  same from resident memory     {results['extra_memory_over_logits_copy_rss']:8.3f}")
    print(f"  top-k path                    {results['topk_extra_memory_over_logits_copy']:8.3f}")
    print(f"payload_bytes_hidden_over_logits {payload['payload_bytes_hidden_over_logits']:.4f}")
    print(f"payload_bytes_hidden_over_topk   {payload['payload_bytes_hidden_over_topk']:.2f}")
    print(f"wall time {results['wall_seconds']:.0f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=2560, help="teacher hidden size")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes after the profiled one")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="default: the device's CHUNK_BYTES")
    parser.add_argument("--wire-bytes", type=int, default=2, help="bytes per moved hidden/logit value")
    parser.add_argument("--quick", action="store_true", help="toy sizes: " + str(QUICK))
    parser.add_argument("--out", type=Path, default=Path("bench/results/full_kl.json"))
    args = parser.parse_args(argv)
    config = {key: value for key, value in vars(args).items() if key not in ("quick", "out")}
    if args.quick:
        config.update(QUICK)
    results = run(config)
    _print(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results["config"]["out"] = str(args.out)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
