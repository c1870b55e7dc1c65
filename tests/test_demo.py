"""The built-in demo: the task and its writers, the SFT batches, and the quick mode end to end (2 ranks)."""

from __future__ import annotations

import json
import random

import pytest

from megatron_tropd.demo import task
from megatron_tropd.eval.verifiers import verify_math


def test_problems_stay_in_range_and_the_teacher_chain_verifies():
    for problem in task.problems(seed=3, count=200):
        assert 2 <= len(problem.steps) <= 4
        assert all(0 <= value <= task.MAX_VALUE for value in problem.values)
        response = task.teacher_response(problem)
        assert verify_math(response, str(problem.answer)).correct, response
        assert not verify_math(response, str(problem.answer + 1)).correct


def test_teacher_chain_is_the_left_to_right_computation():
    problem = task.Problem(7, (("+", 5), ("-", 4), ("*", 2)))
    assert problem.prompt == "Q: 7 +5 -4 *2 A:"
    assert task.teacher_response(problem) == " 7+5=12; 12-4=8; 8*2=16; Final answer: 16"


def test_noisy_writer_skips_and_slips_at_its_rates():
    rng, items = random.Random(0), task.problems(seed=4, count=400)
    responses = [task.noisy_response(p, rng, skip_rate=0.4, slip_rate=0.15) for p in items]
    skipped = sum(r.startswith(" Final answer") for r in responses) / len(responses)
    wrong = sum(not verify_math(r, str(p.answer)).correct for r, p in zip(responses, items, strict=True))
    assert 0.3 < skipped < 0.5
    assert 0.2 < wrong / len(items) < 0.7  # slips and guesses make a real share of answers wrong
    clean = [task.noisy_response(p, rng, 0.0, 0.0) for p in items[:20]]
    assert clean == [task.teacher_response(p) for p in items[:20]]


def test_held_out_prompts_are_excluded_from_training_problems():
    heldout = task.problems(seed=0, count=50)
    train = task.problems(seed=1, count=500, exclude={p.prompt for p in heldout})
    assert not {p.prompt for p in heldout} & {p.prompt for p in train}
    assert len({p.prompt for p in train}) == 500


def test_sft_batch_puts_loss_on_the_response_and_eos_only(tmp_path):
    from megatron_tropd.data import Tokenizer
    from megatron_tropd.demo.prepare import train_tokenizer
    from megatron_tropd.demo.pretrain import sft_batch

    tokenizer = Tokenizer(str(train_tokenizer(tmp_path, seed=0)))
    pairs = [(p.prompt, task.teacher_response(p)) for p in task.problems(seed=5, count=3)]
    batch = sft_batch(tokenizer, pairs)
    for row, (prompt, response) in enumerate(pairs):
        labels = batch.labels[row][batch.loss_mask[row]].tolist()
        assert labels[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labels[:-1]) == response.lstrip()  # the decoder drops a leading space
        assert tokenizer.decode(batch.tokens[row, : len(tokenizer.encode(prompt))].tolist()) == prompt


@pytest.mark.slow
def test_quick_demo_runs_every_phase_and_writes_its_report(tmp_path, capsys):
    from megatron_tropd.demo.run import QUICK, main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["teacher", "student"]
    assert set(report["methods"]) == {"opd", "fkl", "tropd"}
    expected_eval_steps = list(range(0, QUICK.distill_steps + 1, QUICK.eval_interval))
    for summary in report["methods"].values():
        assert [step for step, _ in summary["accuracy_curve"]] == expected_eval_steps
        assert all(0.0 <= accuracy <= 1.0 for _, accuracy in summary["accuracy_curve"])
        assert len(summary["trust_curve"]) == QUICK.distill_steps
        assert 0.0 <= summary["mean_trust_fraction"] <= 1.0
    # Same student, same held-out protocol and seed: every method starts from the same accuracy.
    starts = {summary["accuracy_curve"][0][1] for summary in report["methods"].values()}
    assert starts == {report["models"][1]["accuracy"]}
    assert (tmp_path / "report.png").stat().st_size > 0
    assert "| tropd |" in (tmp_path / "report.md").read_text()
    assert "| tropd |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--fresh"):
        main(["--quick", "--out", str(tmp_path)])  # an earlier demo is never overwritten silently
    _check_final_checkpoint_scores_as_logged(tmp_path, report["methods"]["tropd"], QUICK)


def _check_final_checkpoint_scores_as_logged(root, summary, size):
    """``tropd eval`` on the run's last checkpoint gives the score the loop logged after its last step."""
    from megatron_tropd.demo.run import RESPONSE_TOKENS, WORLD_SIZE
    from megatron_tropd.eval import command

    rows_per_rank = size.prompts_per_step * size.samples_per_prompt // WORLD_SIZE
    checkpoint = root / "runs" / "tropd" / "checkpoints"
    status = command.main([
        "--checkpoint", str(checkpoint), "--tokenizer", str(root / "tokenizer.model"),
        "--benchmarks", str(root / "heldout"), "--k", str(size.k), "--temperature", "0.6",
        "--max-new-tokens", str(RESPONSE_TOKENS), "--chat-template", "none", "--raw-prompts",
        "--max-batch-size", str(rows_per_rank), "--cpu-ranks", str(WORLD_SIZE), "--out", str(root / "eval"),
    ])  # fmt: skip
    assert status == 0
    results = json.loads((root / "eval" / "results.json").read_text())
    assert results["runs"][0]["average"] == summary["accuracy_curve"][-1][1]
