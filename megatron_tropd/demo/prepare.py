"""The demo's files: a sentencepiece tokenizer trained on the task, training prompts, a held-out benchmark.

Everything is generated from seeds, so two runs of the demo see the same data. The held-out problems are
drawn first and excluded from every training set (SFT and distillation prompts alike).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from megatron_tropd.demo.task import MAX_VALUE, Problem, noisy_response, problems, teacher_response

HELDOUT_NAME = "arithmetic"
# Model vocabulary: the numbers 0..MAX_VALUE, the task's characters and a few merges.
VOCAB_SIZE = 64


def _corpus(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for problem in problems(seed, count):
        lines.append(problem.prompt + teacher_response(problem))
        lines.append(problem.prompt + noisy_response(problem, rng, skip_rate=0.5, slip_rate=0.3))
    return lines


def train_tokenizer(out_dir: Path, seed: int) -> Path:
    """A BPE sentencepiece model over the task's text in which every number the task can produce is one
    piece, so each arithmetic step is one prediction (as a word-level fact) rather than a digit algorithm.

    Identity normalisation keeps the text exactly as written, so decoding gives back what was encoded.
    """
    import sentencepiece

    prefix = out_dir / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed, 2000)), model_prefix=str(prefix), vocab_size=VOCAB_SIZE,
        model_type="bpe", user_defined_symbols=[str(n) for n in range(MAX_VALUE + 1)],
        normalization_rule_name="identity", character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=1,
        pad_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    return prefix.with_suffix(".model")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def write_prompts(path: Path, items: list[Problem]) -> Path:
    """Distillation prompts in the ``data.py`` schema (prompt text, reference answer)."""
    _write_jsonl(path, [{"id": i, "prompt": p.prompt, "answer": str(p.answer)} for i, p in enumerate(items)])
    return path


def write_heldout(directory: Path, items: list[Problem]) -> Path:
    """The held-out problems as a math benchmark (``eval/schema.py``) with its ``benchmarks.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"heldout-{i}", "prompt": p.prompt, "answer": str(p.answer)} for i, p in enumerate(items)]
    _write_jsonl(directory / f"{HELDOUT_NAME}.jsonl", rows)
    manifest = {HELDOUT_NAME: {"file": f"{HELDOUT_NAME}.jsonl", "family": "math"}}
    (directory / "benchmarks.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return directory
