"""Continuous vs static batching on a heavy-tailed rollout workload, measured in the same run.

Rollout lengths are heavy-tailed: most responses are short, a few run to the generation cap, and static
batching keeps every row of a batch computing until its longest row ends. This bench draws each
request's generation length from a lognormal (median ``--cap / 8``, log-std ``--sigma``, clipped to
``[1, --cap]``, so a few rows sit at the cap) and forces it with the request's own ``max_new_tokens``
budget and no stop token: both paths generate exactly the same tokens, and only how the rows share the
slots differs. Prompts have uniformly drawn lengths in ``[--min-prompt, --max-prompt]``.

The same model (a random-weight Qwen2, 4 layers, hidden 256, vocab 32,000 by default) runs greedy
decoding with the cached decoder and ``--slots`` rows, once with ``batching="static"`` and once with
``batching="continuous"``, alternating over ``--repeats`` after one warm-up of each; the headline is
best-of-repeats. Tokens/s counts generated tokens. ``slot_occupancy`` is the share of slot-steps that fed
a live request's tokens (``GenerationStats.occupancy``). Prints the ratios and writes JSON.

    python bench/rollout_lengths.py          # 128 requests, cap 256, 8 slots, best of 2 (1-2 min, 2 cores)
    python bench/rollout_lengths.py --quick  # 48 requests, cap 128: a smoke run (its tail lowers occupancy)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_tropd.spawn import run_on_ranks

BATCHINGS = ("static", "continuous")


def model_config(args):
    from megatron_tropd.models import tiny

    return tiny(
        "qwen2", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
        num_attention_heads=4, num_query_groups=2, vocab_size=args.vocab,
        max_position_embeddings=args.max_prompt + args.cap,
    )  # fmt: skip


def workload(args) -> list:
    """The requests: lognormal generation budgets (median cap / 8), uniform prompt lengths."""
    from megatron_tropd.rollout import GenerationRequest

    rng = random.Random(args.seed)
    median = math.log(args.cap / 8)
    requests = []
    for sample_id in range(args.requests):
        budget = min(args.cap, max(1, round(math.exp(rng.gauss(median, args.sigma)))))
        prompt = tuple(
            rng.randrange(1, args.vocab) for _ in range(rng.randint(args.min_prompt, args.max_prompt))
        )
        requests.append(GenerationRequest(prompt, sample_id, max_new_tokens=budget))
    return requests


def _engines(args) -> dict:
    """Build the model once; one engine per batching over it."""
    from megatron_tropd.placed import one_model_groups, place_model
    from megatron_tropd.rollout.megatron_engine import MegatronGenerationEngine

    groups = one_model_groups(args.tp, 1, seed=1234)
    placed = place_model(model_config(args), groups, seed=0)
    length = args.max_prompt + args.cap
    return {
        batching: MegatronGenerationEngine(
            placed, length, args.slots, decoder="cached", batching=batching, prefill_chunk=args.prefill_chunk
        )
        for batching in BATCHINGS
    }


def bench_worker(rank: int, world_size: int, args) -> dict:
    from megatron_tropd.rollout import SamplingParams

    engines = _engines(args)
    requests = workload(args)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.cap)
    warm_up = requests[: args.slots]
    seconds = {batching: [] for batching in BATCHINGS}
    tokens, stats = {}, {}
    for engine in engines.values():
        engine.generate(warm_up, sampling)
    for _ in range(args.repeats):
        for batching, engine in engines.items():
            dist.barrier()
            start = time.perf_counter()
            results = engine.generate(requests, sampling)
            seconds[batching].append(time.perf_counter() - start)
            tokens[batching] = [r.generated_token_ids for r in results]
            stats[batching] = vars(engine.stats) | {"occupancy": engine.stats.occupancy}
    return {"seconds": seconds, "stats": stats, "same_tokens": tokens["static"] == tokens["continuous"]}


def _workload_summary(args) -> dict:
    budgets = [r.max_new_tokens for r in workload(args)]
    prompts = [len(r.prompt_token_ids) for r in workload(args)]
    return {
        "generated_tokens": sum(budgets),
        "median_length": statistics.median(budgets),
        "mean_length": statistics.mean(budgets),
        "rows_at_cap": sum(b == args.cap for b in budgets),
        "prompt_lengths": [min(prompts), max(prompts)],
    }


def run(args) -> dict:
    measured = run_on_ranks(bench_worker, args.tp, args)[0]
    summary = _workload_summary(args)
    best = {name: summary["generated_tokens"] / min(values) for name, values in measured["seconds"].items()}
    occupancy = {name: measured["stats"][name]["occupancy"] for name in BATCHINGS}
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "host": platform.node(),
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "workload": summary,
        "tokens_per_s": best,
        "continuous_over_static": best["continuous"] / best["static"],
        "slot_occupancy": occupancy,
        "steps": {name: measured["stats"][name]["steps"] for name in BATCHINGS},
        "stats": measured["stats"],
        "greedy_tokens_equal": measured["same_tokens"],
        "seconds": measured["seconds"],
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="48 requests, cap 128 (a smoke run)")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--cap", type=int, default=256, help="generation cap (longest budget)")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-std of the lognormal lengths")
    parser.add_argument("--min-prompt", type=int, default=8)
    parser.add_argument("--max-prompt", type=int, default=96)
    parser.add_argument("--slots", type=int, default=8, help="max_batch_size of both paths")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/rollout_lengths.json"))
    return parser


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.quick:
        args.requests, args.cap = 48, 128
    results = run(args)
    work = results["workload"]
    lines = [
        f"{args.requests} requests, {work['generated_tokens']} generated tokens (median length "
        f"{work['median_length']}, {work['rows_at_cap']} at the cap {args.cap}), prompts "
        f"{work['prompt_lengths'][0]}-{work['prompt_lengths'][1]} tokens, {args.slots} slots, TP={args.tp} "
        f"(best of {args.repeats})"
    ]
    for name in BATCHINGS:
        lines.append(
            f"  {name:<10} {results['tokens_per_s'][name]:8.1f} tokens/s  {results['steps'][name]:6d} steps  "
            f"slot occupancy {results['slot_occupancy'][name]:.1%}"
        )
    lines.append(f"  continuous_over_static x{results['continuous_over_static']:.2f}")
    lines.append(f"  both paths gave the same greedy tokens: {results['greedy_tokens_equal']}")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
