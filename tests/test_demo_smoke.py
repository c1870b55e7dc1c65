"""The CPU smoke demo runs end to end on 2 gloo ranks and its sharded losses match the reference."""

from __future__ import annotations

import pytest

from megatron_tropd.config import METHOD_NAMES
from megatron_tropd.demo import smoke

SMALL = ["--num-samples", "2", "--tokens-per-sample", "24", "--vocab-size", "37"]
SMALL += ["--padded-vocab-size", "40", "--topk", "20"]  # top-k ids straddle the two shards


@pytest.mark.slow
def test_smoke_demo_passes_and_prints_every_method(capsys):
    assert smoke.main(SMALL) == 0
    table = capsys.readouterr().out
    for name in METHOD_NAMES:
        assert f"\n{name} " in table


def test_smoke_demo_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        smoke.main(["--padded-vocab-size", "999"])  # odd: cannot shard over TP = 2
    with pytest.raises(SystemExit):
        smoke.main(["--topk", "0"])


def test_smoke_batch_is_deterministic_and_uses_every_token_kind():
    problem = smoke.SmokeProblem(num_samples=4, tokens_per_sample=16, vocab_size=50, padded_vocab_size=52)
    first, second = smoke.build_batch(problem), smoke.build_batch(problem)
    assert (first.token_ids == second.token_ids).all()
    assert (first.teacher_logits == second.teacher_logits).all()
    assert first.is_teacher_prefix.any() and (~first.is_teacher_prefix & first.loss_mask).any()
    assert (first.teacher_logits[:, 50:] == smoke.PADDING_LOGIT).all()
    assert int(first.token_ids.max()) < 50
