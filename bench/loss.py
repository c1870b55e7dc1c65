"""Peak memory and time of the student's distillation loss: chunked vocab-parallel ops vs a naive
full-vocabulary implementation, measured in the same run.

The measured step is what the trainer does per microbatch on the student: log-prob of the sampled token
plus the top-k forward KL against the teacher's top-k, and their backward, from logits ``[T, V/TP]``
(fp32 here). "naive" materialises full fp32 log-softmax tensors of the (local) vocabulary and lets
autograd differentiate them, all-reducing the log-sum-exp across TP ranks like Megatron's cross-entropy;
"chunked" is ``vocab_parallel_token_stats`` with ``inplace_backward=True`` followed by the top-k KL.

Each (TP, variant) runs in fresh processes, so the peak resident memory of a rank (``ru_maxrss``; CUDA's
peak allocator counter on a GPU) minus its memory once the inputs exist is the op's own extra memory.
Prints ratios against the naive baseline and writes JSON.

    python bench/loss.py                         # tokens 4096, vocab 151,936, k 64, TP 1 and 2
    python bench/loss.py --tokens 512 --tp 1     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from megatron_tropd.ops import topk_forward_kl, vocab_parallel, vocab_parallel_token_stats
from megatron_tropd.spawn import run_on_ranks


class _AllReduceSum(torch.autograd.Function):
    """Sum over TP ranks; the upstream gradient is replicated, so each rank's part gets it unchanged."""

    @staticmethod
    def forward(ctx, tensor, group):
        tensor = tensor.clone()
        if group is not None:
            dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def naive_loss(logits, targets, teacher_ids, lp_teacher, group, vocab_start):
    """Dense vocab-parallel log-softmax over the whole local vocabulary, differentiated by autograd."""
    local_max = logits.detach().max(-1, keepdim=True).values
    if group is not None:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = _AllReduceSum.apply((logits - local_max).exp().sum(-1, keepdim=True), group)
    log_probs = logits - local_max - sum_exp.log()  # [T, V_local] full fp32 copy
    ids = torch.cat([targets[:, None], teacher_ids], -1) - vocab_start
    owned = (ids >= 0) & (ids < logits.shape[-1])
    picked = log_probs.gather(-1, ids.clamp(0, logits.shape[-1] - 1))
    picked = _AllReduceSum.apply(torch.where(owned, picked, torch.zeros_like(picked)), group)
    fkl = (lp_teacher.exp() * (lp_teacher - picked[:, 1:])).sum(-1)
    return (-picked[:, 0] + fkl).sum()


def chunked_loss(logits, targets, teacher_ids, lp_teacher, group, vocab_size):
    ids = torch.cat([targets[:, None], teacher_ids], -1)
    log_probs, _ = vocab_parallel_token_stats(
        logits, ids, group, vocab_size, with_entropy=False, inplace_backward=True
    )
    return (-log_probs[:, 0] + topk_forward_kl(log_probs[:, 1:], lp_teacher, "raw")).sum()


def _inputs(num_tokens, vocab_size, k, rank, world, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    local = vocab_size // world
    logits = torch.empty(num_tokens, local, device=device).normal_(generator=None) * 2.0
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=generator).to(device)
    starts = torch.randint(0, vocab_size, (num_tokens, 1), generator=generator)
    teacher_ids = ((starts + torch.arange(k) * 2377) % vocab_size).to(device)  # k distinct ids per token
    lp_teacher = (
        torch.log_softmax(torch.randn(num_tokens, k, generator=generator), -1) + torch.tensor(0.9).log()
    )
    return logits, targets, teacher_ids, lp_teacher.to(device)


def _memory_now(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return psutil.Process().memory_info().rss


def _memory_peak(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_worker(rank, world, variant, num_tokens, vocab_size, k, repeats, chunk_mib=None):
    if chunk_mib is not None:  # the scratch budget of one fp32 vocabulary chunk (see vocab_parallel.py)
        vocab_parallel.CHUNK_BYTES = dict.fromkeys(vocab_parallel.CHUNK_BYTES, chunk_mib * 1024 * 1024)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    group = dist.new_group(list(range(world))) if world > 1 else None
    torch.manual_seed(rank)
    inputs = _inputs(num_tokens, vocab_size, k, rank, world, device)
    times, extra = [], None
    for _ in range(repeats):
        logits = inputs[0].clone().requires_grad_(True)
        before = _memory_now(device)
        start = time.perf_counter()
        if variant == "naive":
            loss = naive_loss(logits, *inputs[1:], group, rank * (vocab_size // world))
        else:
            loss = chunked_loss(logits, *inputs[1:], group, vocab_size)
        (grad,) = torch.autograd.grad(loss, logits)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        extra = _memory_peak(device) - before if extra is None else extra  # first pass: a clean peak
        del logits, grad, loss
    return {"seconds": statistics.median(times), "extra_bytes": extra, "loss": None}


def run(args) -> dict:
    # Large allocations through mmap go back to the OS as soon as they are freed, so a rank's resident
    # memory tracks its live tensors; glibc's default would keep freed chunks and inflate the peak.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    results = {"config": vars(args), "host": platform.node(), "device": _device_name(), "tp": {}}
    full_copy = args.tokens * args.vocab * 4
    for tp in args.tp:
        row = {}
        variants = [("naive", None), ("chunked", None)] + [
            (f"chunked_{mib}MiB", mib) for mib in args.chunk_mib
        ]
        for name, mib in variants:
            kind = "naive" if name == "naive" else "chunked"
            per_rank = run_on_ranks(
                bench_worker, tp, kind, args.tokens, args.vocab, args.k, args.repeats, mib
            )
            row[name] = {
                "seconds": max(r["seconds"] for r in per_rank),
                "extra_bytes_per_rank": max(r["extra_bytes"] for r in per_rank),
            }
        for name, _ in variants[2:]:
            row[name]["time_ratio_vs_naive"] = row[name]["seconds"] / row["naive"]["seconds"]
            row[name]["memory_ratio_vs_full_fp32_copy"] = row[name]["extra_bytes_per_rank"] / full_copy
        row["memory_ratio_vs_full_fp32_copy"] = row["chunked"]["extra_bytes_per_rank"] / full_copy
        row["memory_ratio_vs_local_fp32_shard"] = row["chunked"]["extra_bytes_per_rank"] / (full_copy / tp)
        row["memory_reduction_vs_naive"] = (
            row["naive"]["extra_bytes_per_rank"] / row["chunked"]["extra_bytes_per_rank"]
        )
        row["time_ratio_vs_naive"] = row["chunked"]["seconds"] / row["naive"]["seconds"]
        results["tp"][str(tp)] = row
    return results


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu x{os.cpu_count()}"


def _print(results) -> None:
    gib = 1024**3
    print(
        f"device: {results['device']}  tokens={results['config']['tokens']} "
        f"vocab={results['config']['vocab']}"
    )
    print(
        f"{'TP':>3} {'naive s':>8} {'chunk s':>8} {'time x':>7} {'naive GiB':>10} {'chunk GiB':>10} "
        f"{'mem/full':>9} {'naive/chunk':>12}"
    )
    for tp, row in results["tp"].items():
        print(
            f"{tp:>3} {row['naive']['seconds']:8.3f} {row['chunked']['seconds']:8.3f} "
            f"{row['time_ratio_vs_naive']:7.2f} {row['naive']['extra_bytes_per_rank'] / gib:10.3f} "
            f"{row['chunked']['extra_bytes_per_rank'] / gib:10.3f} "
            f"{row['memory_ratio_vs_full_fp32_copy']:9.3f} "
            f"{row['memory_reduction_vs_naive']:12.1f}"
        )
        for name, values in row.items():
            if name.startswith("chunked_"):
                print(
                    f"    {name}: time x {values['time_ratio_vs_naive']:.2f}, "
                    f"mem/full {values['memory_ratio_vs_full_fp32_copy']:.3f}"
                )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--chunk-mib",
        type=int,
        nargs="*",
        default=[],
        help="also time these chunk budgets (MiB per fp32 chunk)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/loss.json"))
    args = parser.parse_args(argv)
    results = run(args)
    _print(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results["config"]["out"] = str(args.out)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
