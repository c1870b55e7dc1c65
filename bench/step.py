"""Time of teacher scoring and of one student training step, TP1 against TP2, measured in the same run.

Each layout runs in fresh processes on the same synthetic rollout batch: scoring (teacher forward with
top-k and log-probs, the student's old log-probs, the trust draw) and one optimizer step of TrOPD. Prints
tokens/s and the TP2/TP1 ratios, and on a GPU the model FLOPs utilisation of the student step
(``model_flops_per_token`` against the device's dense bf16 peak). Writes JSON.

    python bench/step.py                                  # tiny model, CPU, world size 2
    python bench/step.py --student qwen3_1_7b --teacher qwen3_1_7b --world-size 1 --tp 1 \\
        --sequences 8 --seq-len 2048                      # one GPU: tokens/s and MFU of a 1.7B student

``--length-mix`` measures sequence packing instead: a heavy-tailed batch (lognormal response lengths,
median 1/8 of the cap, a few at the cap; prompts of varied lengths) scored and trained padded and then
packed (``packing.py``) in the same run, on the same models. It prints ``packed_over_padded`` (tokens/s
of scoring + training, counting real tokens only) and each path's ``padding_share`` (padding over
processed tokens), and projects the tokens a step of the paper's recipe processes (512 rollouts, a cap
of 8,096; ``--projection-sigma`` sets the spread of its length distribution) with and without packing
and continuous batching. Writes ``bench/results/step_packing.json``:

    python bench/step.py --length-mix --sequences 32 --seq-len 512
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


def _build(args, tensor_parallel, packing_budget: int = 0):
    from megatron_tropd.placed import place_model
    from megatron_tropd.runtime import start
    from megatron_tropd.topology import ParallelLayout
    from megatron_tropd.training import build_student

    topology = start(ParallelLayout(tensor_parallel, 1), seed=1234)
    student_config, teacher_config = getattr(shapes, args.student)(), getattr(shapes, args.teacher)()
    optim = OptimConfig(micro_batch_size=args.micro_batch_size)
    if packing_budget:
        optim = OptimConfig(micro_batch_size=1, max_tokens_per_microbatch=packing_budget)
    student = build_student(student_config, optim, topology.student, total_steps=args.steps + 1, seed=1)
    teacher = place_model(teacher_config, topology.teacher, seed=2)
    return topology, student, teacher, student_config


def heavy_tailed_lengths(count: int, cap: int, sigma: float, seed: int) -> list[int]:
    """Response lengths: lognormal with median ``cap / 8`` and log-spread ``sigma``, clipped to
    ``[1, cap]``; the longest eighth of a draw of 8 or more is set to the cap (rollouts that hit it)."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.exp(torch.randn(count, generator=generator, dtype=torch.float64) * sigma) * (cap / 8)
    lengths = draws.round().clamp(1, cap).long()
    if count >= 8:
        lengths[lengths.argsort(descending=True)[: count // 8]] = cap
    return lengths.tolist()


def length_mix_batch(args, vocab_size: int, step: int) -> RolloutBatch:
    """Right-padded rows: a prompt of 1/16 to 1/8 of the cap, then a heavy-tailed response."""
    generator = torch.Generator().manual_seed(7 + step)
    responses = heavy_tailed_lengths(args.sequences, args.seq_len, args.sigma, seed=11 + step)
    prompt_cap = max(args.seq_len // 8, 2)
    prompts = torch.randint(max(prompt_cap // 2, 1), prompt_cap + 1, (args.sequences,), generator=generator)
    lengths = [int(p) + r for p, r in zip(prompts.tolist(), responses, strict=True)]
    width = max(lengths)
    tokens = torch.randint(1, vocab_size, (args.sequences, width), generator=generator)
    loss_mask = torch.zeros(args.sequences, width, dtype=torch.bool)
    for row, (prompt, length) in enumerate(zip(prompts.tolist(), lengths, strict=True)):
        tokens[row, length:] = 0
        loss_mask[row, prompt - 1 : length - 1] = True
    sample_ids = torch.arange(args.sequences) + step * args.sequences
    return RolloutBatch(tokens, loss_mask, torch.zeros_like(loss_mask), sample_ids)


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def _score_and_train(topology, student, teacher, spec, method, batch, step: int, steps: int):
    """Seconds of scoring ``batch`` and of one training step on it (step ``step`` of ``steps``)."""
    from megatron_tropd.scoring import score_batch
    from megatron_tropd.training import batch_context, train_step

    scored, score_seconds = _timed(lambda: score_batch(batch, student.placed, teacher, spec, step))
    context = batch_context(method, scored, step, steps, topology.student)
    _, train_seconds = _timed(lambda: train_step(student, scored, method, context))
    return score_seconds, train_seconds


def bench_worker(rank, world_size, args, tensor_parallel):
    from megatron_tropd.runtime import default_device
    from megatron_tropd.scoring import ScoringSpec

    topology, student, teacher, student_config = _build(args, tensor_parallel)
    method = MethodConfig(name="tropd", topk=args.topk)
    spec = ScoringSpec(student_config.vocab_size, args.topk, False, args.micro_batch_size, method.trust_seed)
    score_times, train_times = [], []
    for step in range(args.steps + 1):  # step 0 warms up
        batch = synthetic_batch(args.sequences, args.seq_len, student_config.vocab_size, step)
        batch = batch.to(default_device())
        score_seconds, train_seconds = _score_and_train(
            topology, student, teacher, spec, method, batch, step, args.steps + 1
        )
        if step:
            score_times.append(score_seconds)
            train_times.append(train_seconds)
    return {"score_seconds": statistics.median(score_times), "train_seconds": statistics.median(train_times)}


def packing_worker(rank, world_size, args, packed: bool):
    """Median scoring and training seconds of the length mix, padded or packed, and the tokens each
    path processed (the padded path runs every row at the batch's longest length)."""
    from megatron_tropd.packing import packed_microbatches, sequence_lengths
    from megatron_tropd.runtime import default_device
    from megatron_tropd.scoring import ScoringSpec

    budget = args.seq_len + max(args.seq_len // 8, 2) if packed else 0
    topology, student, teacher, student_config = _build(args, 1, budget)
    method = MethodConfig(name="tropd", topk=args.topk)
    spec = ScoringSpec(
        student_config.vocab_size, args.topk, False, args.micro_batch_size, method.trust_seed, budget
    )
    score_times, train_times, real, processed = [], [], 0, 0
    for step in range(args.steps + 1):  # step 0 warms up
        batch = length_mix_batch(args, student_config.vocab_size, step).to(default_device())
        score_seconds, train_seconds = _score_and_train(
            topology, student, teacher, spec, method, batch, step, args.steps + 1
        )
        if step:
            score_times.append(score_seconds)
            train_times.append(train_seconds)
            lengths = sequence_lengths(batch)
            real += sum(lengths)
            if packed:
                packs = packed_microbatches({"tokens": batch.tokens}, lengths, budget, equal_shapes=False)
                processed += sum(p.num_tokens for p in packs)
            else:
                processed += batch.tokens.numel()
    return {
        "score_seconds": statistics.median(score_times), "train_seconds": statistics.median(train_times),
        "real_tokens_per_step": real / args.steps, "processed_tokens_per_step": processed / args.steps,
    }  # fmt: skip


def _slot_steps(lengths: list[int], slots: int, continuous: bool) -> int:
    """Decode steps x slots that generation occupies: static batching holds each chunk of ``slots`` rows
    until its longest ends; continuous batching refills a slot as soon as its row ends."""
    if not continuous:
        chunks = [lengths[i : i + slots] for i in range(0, len(lengths), slots)]
        return sum(max(chunk) * slots for chunk in chunks)
    finish = [0] * slots  # the step at which each slot frees up
    for length in lengths:
        slot = min(range(slots), key=finish.__getitem__)
        finish[slot] += length
    return max(finish) * slots


def paper_projection(sigma: float, rollouts: int = 512, cap: int = 8096, prompt: int = 512) -> dict:
    """Tokens one step of the paper's recipe processes, with and without packing (scoring + training:
    one teacher forward, one student forward, one student forward + backward over every token) and with
    static or continuous batching (generation slot-steps, 64 slots a replica)."""
    from megatron_tropd.packing import plan_packs

    responses = heavy_tailed_lengths(rollouts, cap, sigma, seed=3)
    lengths = [prompt + r for r in responses]
    budget = prompt + cap
    padded = rollouts * max(lengths)
    packs = plan_packs(lengths, budget)
    packed = sum(sum(lengths[row] for row in pack) for pack in packs)
    static, continuous = _slot_steps(responses, 64, False), _slot_steps(responses, 64, True)
    return {
        "rollouts": rollouts, "cap": cap, "prompt_tokens": prompt, "sigma": sigma,
        "real_tokens": sum(lengths), "padded_tokens_processed": padded, "packed_tokens_processed": packed,
        "packed_microbatches": len(packs), "padded_over_packed_tokens": padded / packed,
        "generation_slot_steps_static": static, "generation_slot_steps_continuous": continuous,
        "static_over_continuous_slot_steps": static / continuous,
    }  # fmt: skip


def run_length_mix(args) -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    results = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "device": device}
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    for name, packed in (("padded", False), ("packed", True)):
        per_rank = run_on_ranks(packing_worker, args.world_size, args, packed, backend=backend)
        seconds = max(r["score_seconds"] for r in per_rank) + max(r["train_seconds"] for r in per_rank)
        real = sum(r["real_tokens_per_step"] for r in per_rank[:1])
        processed = per_rank[0]["processed_tokens_per_step"]
        results[name] = {
            "score_seconds": max(r["score_seconds"] for r in per_rank),
            "train_seconds": max(r["train_seconds"] for r in per_rank),
            "tokens_per_s": real / seconds, "padding_share": 1.0 - real / processed,
        }  # fmt: skip
    results["packed_over_padded"] = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    results["paper_projection"] = paper_projection(args.projection_sigma)
    return results


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
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--length-mix", action="store_true", help="packed against padded, heavy-tailed")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-spread of the length mix")
    parser.add_argument("--projection-sigma", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.length_mix:
        return _main_length_mix(args)
    args.out = args.out or Path("bench/results/step.json")
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


def _main_length_mix(args) -> None:
    args.out = args.out or Path("bench/results/step_packing.json")
    results = run_length_mix(args)
    for name in ("padded", "packed"):
        row = results[name]
        scoring, train = row["score_seconds"] * 1e3, row["train_seconds"] * 1e3
        print(f"{name:>6}: scoring {scoring:8.1f} ms  train {train:8.1f} ms  ", end="")
        print(f"{row['tokens_per_s']:8.0f} real tok/s  padding_share {row['padding_share']:.1%}")
    print(f"packed_over_padded: {results['packed_over_padded']:.2f}")
    p = results["paper_projection"]
    print(f"paper recipe ({p['rollouts']} rollouts, cap {p['cap']}): {p['padded_tokens_processed']:,} tokens")
    print(f"  padded vs {p['packed_tokens_processed']:,} packed ({p['padded_over_packed_tokens']:.2f}x)")
    print(f"  generation slot-steps static / continuous: {p['static_over_continuous_slot_steps']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
