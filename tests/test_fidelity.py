"""The fidelity study (``bench/fidelity.py``): its task, tokenizer and probe; a ``--quick`` run end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

from megatron_tropd.data import Tokenizer
from megatron_tropd.demo.report import read_metrics
from megatron_tropd.fidelity import task
from megatron_tropd.fidelity.probe import summarise, token_sums
from megatron_tropd.fidelity.study import GUIDED, METHODS, TOPK, VOCAB_SIZE, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer(str(write_tokenizer(tmp_path_factory.mktemp("fidelity") / "tokenizer")))


def test_tokenizer_is_word_level_over_the_whole_vocabulary(tokenizer):
    rng = random.Random(3)
    problem = task.make_problem(rng)
    for writer in (task.TEACHER_WRITER, task.STUDENT_WRITER):
        text = problem.prompt + writer(problem, rng)
        ids = tokenizer.encode(text)
        assert len(ids) == len(text.split())  # one token per word, no unknowns
        assert 0 not in ids and max(ids) < VOCAB_SIZE
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode(f"w{task.WORDS - 1}")[0] == VOCAB_SIZE - 1
    assert tokenizer.eos_token_id == 1


def test_writers_differ_only_by_the_students_habits():
    rng = random.Random(0)
    teacher_words, student_words, teacher_right, merged = [], [], 0, 0
    for _ in range(300):
        problem = task.make_problem(rng)
        teacher = task.TEACHER_WRITER(problem, rng).split()
        student = task.STUDENT_WRITER(problem, rng).split()
        teacher_words += teacher
        student_words += student
        teacher_right += teacher[-1] == str(problem.answer)
        pairs = zip(student, student[1:], strict=False)
        merged += any(a.startswith(("+", "-")) and b.startswith(("+", "-")) for a, b in pairs)
    assert teacher_right == 300
    assert task.FAVOURITE not in teacher_words
    student_thinking = [w for w in student_words if w.startswith("w") or w == task.FAVOURITE]
    # the writer replaces 15% of its thinking words by the favourite
    assert 0.1 < student_thinking.count(task.FAVOURITE) / len(student_thinking) < 0.2
    assert merged > 30  # skipped step lines: two operations in one line
    thinking = [w for w in teacher_words if w.startswith("w")]
    top = {f"w{rank}" for rank in range(TOPK)}
    empirical = sum(w in top for w in thinking) / len(thinking)
    assert abs(empirical - task.zipf_topk_mass(TOPK)) < 0.03  # the writer follows the documented Zipf law
    assert 0.4 < task.zipf_topk_mass(TOPK) < 0.7  # heavy tail: the top 64 of 4,000 words hold about half


class _FixedLogits(torch.nn.Module):
    """A "model" whose logits at every position are one fixed row per position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, tokens, position_ids, attention_mask):
        return self.logits[: tokens.shape[1]].unsqueeze(0)


def test_probe_sums_match_their_definitions():
    torch.manual_seed(0)
    vocab, length, prompt_length, k = 12, 7, 3, 4
    teacher_logits, student_logits = torch.randn(length, vocab) * 2, torch.randn(length, vocab) * 2
    ids = torch.randint(0, vocab, (length,)).tolist()
    teacher, student = _FixedLogits(teacher_logits), _FixedLogits(student_logits)
    sums = token_sums(teacher, student, [(ids, prompt_length)], vocab, k)
    lp_t, lp_s = teacher_logits.log_softmax(-1).double(), student_logits.log_softmax(-1).double()
    tau, expected = math.log(0.2 / 0.8), dict.fromkeys(sums, 0.0)
    for t in range(prompt_length, length):
        a = (lp_t[t - 1, ids[t]] - lp_s[t - 1, ids[t]]).item()
        p_trust = min(math.exp(a), 1.0)
        top = lp_t[t - 1].topk(k)
        top_pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        fkl = sum(math.exp(v) * (v - lp_s[t - 1, i].item()) for v, i in top_pairs)
        expected["tokens"] += 1
        expected["topk_mass"] += top.values.exp().sum().item()
        expected["p_trust"] += p_trust
        expected["outliers"] += a < tau
        expected["fkl_weighted"] += (1 - p_trust) * fkl
        expected["outlier_weight"] += 1 - p_trust
    for key, value in expected.items():
        assert sums[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    same = token_sums(teacher, teacher, [(ids, prompt_length)], vocab, k)
    assert summarise(same | {"responses": 1})["p_trust"] == pytest.approx(1.0) and same["outliers"] == 0


def test_quick_study_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_fidelity", ROOT / "bench" / "fidelity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "report"
    methods = ["opd", "tropd"]  # one on-policy baseline, one guided row
    argv = ["--quick", "--seeds", "0", "--methods", ",".join(methods), "--work", str(tmp_path / "work")]
    assert bench.main([*argv, "--out", str(out)]) == 0
    results = json.loads((out / "fidelity.json").read_text())
    assert results["vocab_size"] == 4096 and results["topk"] == 64 and results["methods"] == methods
    (seed,) = results["seeds"]
    for method in methods:
        config = json.loads((tmp_path / "work" / "seed0" / "runs" / method / "config.json").read_text())
        assert config["rollout"]["guidance"] is (method in GUIDED)  # set explicitly, never a default
        assert seed["runs"][method]["guidance"] is (method in GUIDED)
        assert 0.0 <= seed["probes"][method]["p_trust"] <= 1.0
        # eval.at_start=false: the loop evaluates after its step only; the starting point is the initial
        # student's own score, measured once after its SFT
        _, evals = read_metrics(tmp_path / "work" / "seed0" / "runs" / method / "metrics.jsonl")
        assert [e["step"] for e in evals] == [1]
        student_accuracy = next(m["accuracy"] for m in seed["models"] if m["name"] == "student")
        assert seed["runs"][method]["accuracy_curve"][0] == [0, student_accuracy]
    assert 0.0 < seed["probes"]["initial"]["teacher_topk_mass"] <= 1.0
    assert seed["teacher_trace_tokens"] > 200  # the reflection's thinking words: the paper's long traces
    table = (out / "fidelity.md").read_text()
    assert "| OPD | opd (off) |" in table and "| TrOPD | tropd (on) |" in table
    assert (out / "fidelity.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="earlier study"):
        bench.main([*argv, "--out", str(out)])


def test_sft_starts_on_short_reflections_and_ends_on_the_long_writer():
    from megatron_tropd.demo.pretrain import PretrainSpec, _step_pairs
    from megatron_tropd.fidelity.study import FULL, pretrain_specs

    teacher, student = pretrain_specs(FULL, seed=0)
    assert (teacher.curriculum_steps, student.curriculum_steps) == (
        FULL.teacher_curriculum_steps,
        FULL.student_curriculum_steps,
    )
    assert 0 < teacher.curriculum_steps < teacher.steps and 0 < student.curriculum_steps < student.steps
    assert isinstance(teacher, PretrainSpec) and teacher.writer == task.TEACHER_WRITER

    def thinking_words(step: int) -> float:
        pairs = _step_pairs(teacher, step)
        return sum(sum(w.startswith("w") for w in response.split()) for _, response in pairs) / len(pairs)

    short, long = thinking_words(0), thinking_words(teacher.curriculum_steps)
    assert task.SHORT_REFLECTION[0] <= short <= task.SHORT_REFLECTION[1]
    assert task.REFLECTION[0] <= long <= task.REFLECTION[1]
    assert thinking_words(teacher.curriculum_steps - 1) == pytest.approx(short, abs=3)


def test_methods_are_the_papers_table_5_rows():
    assert set(METHODS) == {
        "opd", "mask_outlier", "clip_outlier", "fkl", "fkl_outlier", "tropd_mask", "tropd_clip", "tropd"
    }  # fmt: skip
    assert {"tropd_mask", "tropd_clip", "tropd"} == GUIDED
