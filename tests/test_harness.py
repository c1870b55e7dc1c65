"""Checkpoint evaluation: the CLI on TP2 and DP2 reproduces one rank's responses and scores; bad input is
refused before any rank starts; --compare puts runs side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_tropd.eval.command import main
from megatron_tropd.eval.instructions import CHECKERS
from megatron_tropd.eval.schema import load_benchmarks
from megatron_tropd.eval.scoring import evaluate
from megatron_tropd.spawn import run_on_ranks
from tests.eval_setup import build_tiny_model, train_tokenizer

PROMPTS = ["tell me a story about a cat.", "what is 3 plus 4?", "write a poem about the sea."]
K, TEMPERATURE, MAX_NEW = 2, 1.0, 8


def _reference_worker(rank, world_size, base):
    """Save the tiny model's weights and sample its responses on this one rank (the reference)."""
    from megatron_tropd.checkpoint import save_model_weights
    from megatron_tropd.data import Tokenizer
    from megatron_tropd.placed import PlacedModel
    from megatron_tropd.rollout.megatron_engine import MegatronGenerationEngine
    from megatron_tropd.rollout.text import TextGenerator

    base = Path(base)
    model, groups, config = build_tiny_model()
    save_model_weights(base / "weights", model, config)
    engine = MegatronGenerationEngine(PlacedModel(model, groups, config), config.max_position_embeddings, 8)
    tokenizer = Tokenizer(str(base / "sp.model"))
    generate = TextGenerator(engine, tokenizer, max_new_tokens=MAX_NEW, chat_template="none")
    return generate(PROMPTS, K, TEMPERATURE)


def _word_count(text: str) -> int:
    """Words as the ``word_count`` checker counts them."""
    return max(n for n in range(MAX_NEW * 8) if CHECKERS["word_count"](text, min_words=n))


def _write_benchmarks(directory: Path, responses: list[list[str]]) -> None:
    """One instruction benchmark whose word-count bar sits at each prompt's longest response, so its
    score depends on the exact responses (only the longest samples pass)."""
    directory.mkdir()
    rows = []
    for index, (prompt, samples) in enumerate(zip(PROMPTS, responses, strict=True)):
        longest = max(_word_count(sample) for sample in samples)
        constraint = {"type": "word_count", "kwargs": {"min_words": longest}}
        rows.append({"id": f"p{index}", "prompt": prompt, "constraints": [constraint]})
    (directory / "talk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "benchmarks.json").write_text(
        json.dumps({"talk": {"file": "talk.jsonl", "family": "instruction"}})
    )


def _cli_args(base: Path, out: str, run_name: str, *extra: str) -> list[str]:
    return [
        "--checkpoint", str(base / "weights"), "--tokenizer", str(base / "sp.model"),
        "--benchmarks", str(base / "bench"), "--k", str(K), "--temperature", str(TEMPERATURE),
        "--max-new-tokens", str(MAX_NEW), "--chat-template", "none", "--out", str(base / out),
        "--run-name", run_name, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tokenizer, the weights, the benchmarks and one rank's responses: no CLI run yet."""
    base = tmp_path_factory.mktemp("harness")
    train_tokenizer(base / "sp.model")
    reference = run_on_ranks(_reference_worker, 1, str(base))[0]
    _write_benchmarks(base / "bench", reference)
    return base, reference


@pytest.fixture(scope="module")
def runs(saved):
    base, reference = saved
    assert main(_cli_args(base, "tp2", "tp2", "--tp", "2", "--cpu-ranks", "2")) == 0
    assert main(_cli_args(base, "dp2", "dp2", "--cpu-ranks", "2")) == 0
    assert main(_cli_args(base, "pp2", "pp2", "--pp", "2", "--cpu-ranks", "2")) == 0
    return base, reference


def _samples(path: Path) -> dict[str, list[str]]:
    by_item: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        by_item.setdefault(sample["item_id"], []).append(sample["response"])
    return by_item


@pytest.mark.parametrize("run", ["tp2", "dp2", "pp2"])
def test_cli_reproduces_one_rank_responses_and_scores(runs, run):
    base, reference = runs
    out = base / run
    assert all((out / name).is_file() for name in ("results.md", "results.json", "results.png"))
    assert _samples(out / f"samples-{run}.jsonl") == {f"p{i}": r for i, r in enumerate(reference)}
    by_prompt = dict(zip(PROMPTS, reference, strict=True))

    def replay(prompts, k, temperature):
        return [by_prompt[p] for p in prompts]

    expected = evaluate(load_benchmarks(base / "bench"), replay, K, TEMPERATURE, run=run)
    assert 0.0 < expected.average < 1.0, "the benchmark should tell the samples apart"
    expected_json = json.loads(json.dumps(expected.summary()))
    assert json.loads((out / "results.json").read_text())["runs"] == [expected_json]


def test_compare_writes_one_table_with_both_runs(runs, capsys):
    base, _ = runs
    assert main(["--compare", str(base / "tp2"), str(base / "dp2"), "--out", str(base / "compare")]) == 0
    table = (base / "compare" / "results.md").read_text()
    assert "| tp2 |" in table and "| dp2 |" in table and "talk" in table
    assert (base / "compare" / "results.png").is_file()
    runs_json = json.loads((base / "compare" / "results.json").read_text())["runs"]
    assert [r["run"] for r in runs_json] == ["tp2", "dp2"]


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_or_corrupt_checkpoint_is_refused_before_any_rank_starts(runs, tmp_path, capsys):
    base, _ = runs
    args = _cli_args(base, "never", "x")
    missing = tmp_path / "no-such-checkpoint"
    args[1] = str(missing)
    message = _error(args, capsys)
    assert str(missing) in message and "save_model_weights" in message
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "metadata.json").write_text("{}")
    (corrupt / "tropd_checkpoint.json").write_text("{truncated")
    args[1] = str(corrupt)
    message = _error(args, capsys)
    assert str(corrupt) in message and "is damaged" in message and "truncated" in message
    assert not (base / "never").exists()


def test_prompt_longer_than_the_context_is_refused(saved, capsys):
    base, _ = saved
    args = _cli_args(base, "never", "x")
    args[args.index("--max-new-tokens") + 1] = "250"  # tiny(): 256 positions
    message = _error(args, capsys)
    assert "max_position_embeddings" in message and "item 'p0'" in message


def test_missing_benchmarks_are_refused_naming_the_path_and_the_flag(saved, tmp_path, capsys):
    """A missing directory, manifest or listed file is bad input (exit 2), not a FileNotFoundError."""
    base, _ = saved
    args = _cli_args(base, "never", "x")
    where = args.index("--benchmarks") + 1
    missing_dir = tmp_path / "no-such-benchmarks"
    args[where] = str(missing_dir)
    message = _error(args, capsys)
    assert str(missing_dir) in message and "--benchmarks" in message and "eval.benchmarks" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    args[where] = str(empty)
    message = _error(args, capsys)
    assert str(empty / "benchmarks.json") in message and "prepare_benchmarks.py" in message
    partial = tmp_path / "partial"
    shutil.copytree(base / "bench", partial)
    (partial / "talk.jsonl").unlink()
    args[where] = str(partial)
    message = _error(args, capsys)
    assert str(partial / "talk.jsonl") in message and "listed in" in message and "--benchmarks" in message
    assert not (base / "never").exists()


def test_compare_of_a_missing_directory_is_a_clear_error(tmp_path, capsys):
    message = _error(["--compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")], capsys)
    assert "results.json" in message
