"""Time of teacher scoring and of one student training step, TP1 against TP2, measured in the same run.

Each layout runs in fresh processes on the same synthetic rollout batch: scoring (teacher forward with
top-k and log-probs, the student's old log-probs, the trust draw) and one optimizer step of TrOPD. Prints
tokens/s and the TP2/TP1 ratios, and on a GPU the model FLOPs utilisation of the student step
(``model_flops_per_token`` against the device's dense bf16 peak). Writes JSON.

    python bench/step.py                                  # tiny model, CPU, world size 2
    python bench/step.py --student qwen3_1_7b --teacher qwen3_1_7b --world-size 1 --tp 1 \\
        --sequences 8 --seq-len 2048                      # one GPU: tokens/s and MFU of a 1.7B student
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from megatron_tropd import model_config as shapes
from megatron_tropd.batch import RolloutBatch
from megatron_tropd.config import MethodConfig, OptimConfig
from megatron_tropd.spawn import run_on_ranks

# Dense bf16 tensor-core peak (FLOP/s) used for MFU; CPU runs report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def synthetic_batch(num_sequences: int, seq_len: int, vocab_size: int, step: int) -> RolloutBatch:
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(1, vocab_size, (num_sequences, seq_len), generator=generator)
    loss_mask = torch.zeros(num_sequences, seq_len, dtype=torch.bool)
    loss_mask[:, seq_len // 8 : -1] = True  # a short prompt, the rest is response
    prefix = torch.zeros_like(loss_mask)
    return RolloutBatch(tokens, loss_mask, prefix, torch.arange(num_sequences) + step * num_sequences)


def _build(args, tensor_parallel):
    from megatron_tropd.placed import place_model
    from megatron_tropd.runtime import start
    from megatron_tropd.topology import ParallelLayout
    from megatron_tropd.training import build_student

    topology = start(ParallelLayout(tensor_parallel, 1), seed=1234)
    student_config, teacher_config = getattr(shapes, args.student)(), getattr(shapes, args.teacher)()
    optim = OptimConfig(micro_batch_size=args.micro_batch_size)
    student = build_student(student_config, optim, topology.student, total_steps=args.steps + 1, seed=1)
    teacher = place_model(teacher_config, topology.teacher, seed=2)
    return topology, student, teacher, student_config


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def bench_worker(rank, world_size, args, tensor_parallel):
    from megatron_tropd.runtime import default_device
    from megatron_tropd.scoring import ScoringSpec, score_batch
    from megatron_tropd.training import batch_context, train_step

    topology, student, teacher, student_config = _build(args, tensor_parallel)
    method = MethodConfig(name="tropd", topk=args.topk)
    spec = ScoringSpec(student_config.vocab_size, args.topk, False, args.micro_batch_size, method.trust_seed)
    score_times, train_times = [], []
    for step in range(args.steps + 1):  # step 0 warms up
        batch = synthetic_batch(args.sequences, args.seq_len, student_config.vocab_size, step)
        batch = batch.to(default_device())
        scored, score_seconds = _timed(
            lambda b=batch, s=step: score_batch(b, student.placed, teacher, spec, s)
        )
        context = batch_context(method, scored, step, args.steps + 1, topology.student)
        _, train_seconds = _timed(lambda s=scored, c=context: train_step(student, s, method, c))
        if step:
            score_times.append(score_seconds)
            train_times.append(train_seconds)
    return {"score_seconds": statistics.median(score_times), "train_seconds": statistics.median(train_times)}


def _mfu(args, train_seconds: float) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
    if peak is None:
        return None
    flops = shapes.model_flops_per_token(getattr(shapes, args.student)(), args.seq_len) * args.tokens_per_step
    return flops / train_seconds / (peak * args.world_size)


def run(args) -> dict:
    args.tokens_per_step = args.sequences * args.seq_len
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    results = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "device": device, "tp": {}}
    for tensor_parallel in args.tp:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        per_rank = run_on_ranks(bench_worker, args.world_size, args, tensor_parallel, backend=backend)
        score = max(r["score_seconds"] for r in per_rank)
        train = max(r["train_seconds"] for r in per_rank)
        results["tp"][str(tensor_parallel)] = {
            "score_seconds": score,
            "train_seconds": train,
            "score_tokens_per_s": args.tokens_per_step / score,
            "train_tokens_per_s": args.tokens_per_step / train,
            "train_mfu": _mfu(args, train),
        }
    if "1" in results["tp"] and "2" in results["tp"]:
        one, two = results["tp"]["1"], results["tp"]["2"]
        results["tp2_over_tp1_score_time"] = two["score_seconds"] / one["score_seconds"]
        results["tp2_over_tp1_train_time"] = two["train_seconds"] / one["train_seconds"]
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="tiny")
    parser.add_argument("--teacher", default="tiny")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/step.json"))
    args = parser.parse_args(argv)
    results = run(args)
    for tp, row in results["tp"].items():
        mfu = f"  MFU {row['train_mfu']:.1%}" if row["train_mfu"] is not None else ""
        print(
            f"TP{tp}: scoring {row['score_seconds'] * 1e3:8.1f} ms ({row['score_tokens_per_s']:9.0f} tok/s)  "
            f"train step {row['train_seconds'] * 1e3:8.1f} ms ({row['train_tokens_per_s']:9.0f} tok/s){mfu}"
        )
    for key in ("tp2_over_tp1_score_time", "tp2_over_tp1_train_time"):
        if key in results:
            print(f"{key}: {results[key]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
