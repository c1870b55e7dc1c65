"""The regime's own figures, measured on a student's samples against the teacher.

For each student (the initial one and every method's final one) the probe samples one response per
prompt at temperature 1 (as the rollouts do), scores every response token with both models over the full
vocabulary, and reports token means:

- ``teacher_topk_mass``: sum of pi_T over the teacher's top k (how heavy the teacher's tail is);
- ``p_trust``: min(pi_T / pi_S, 1), the expected trust fraction of TrOPD's Bernoulli mask;
- ``outlier_share``: share of tokens with log(pi_T / pi_S) < tau = log(0.2 / 0.8) (the static outliers
  of Mask/Clip Outlier: pi_T well below pi_S);
- ``outlier_fkl``: the top-k forward KL averaged over the trust region's outliers, i.e. weighted by
  1 - P_trust (the tokens whose M = 0 in expectation);
- ``response_tokens`` and ``finished`` (share of responses that ended with EOS).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

OUTLIER_LAMBDA = 0.2
SUMS = (
    "tokens", "topk_mass", "p_trust", "outliers", "fkl_weighted", "outlier_weight", "responses", "finished"
)  # fmt: skip


def _read_prompts(path: str, count: int) -> list[str]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row["prompt"] for row in rows[:count]]


def _log_probs(module: torch.nn.Module, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = module(tokens, position_ids, None)
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)


@torch.no_grad()
def token_sums(
    teacher: torch.nn.Module, student: torch.nn.Module, rows: list[tuple[list[int], int]], vocab_size: int,
    topk: int,
) -> dict[str, float]:  # fmt: skip
    """The probe's sums over the response tokens of ``rows`` = ``(token ids, prompt length)``."""
    tau = math.log(OUTLIER_LAMBDA / (1.0 - OUTLIER_LAMBDA))
    sums = dict.fromkeys(SUMS, 0.0)
    for ids, prompt_length in rows:
        tokens = torch.tensor([ids])
        lp_teacher = _log_probs(teacher, tokens, vocab_size)[0, prompt_length - 1 : -1]
        lp_student = _log_probs(student, tokens, vocab_size)[0, prompt_length - 1 : -1]
        labels = tokens[0, prompt_length:].unsqueeze(-1)
        advantage = (lp_teacher.gather(-1, labels) - lp_student.gather(-1, labels)).squeeze(-1)
        p_trust = advantage.exp().clamp(max=1.0)
        top_lp, top_ids = lp_teacher.topk(topk, dim=-1)
        fkl = (top_lp.exp() * (top_lp - lp_student.gather(-1, top_ids))).sum(-1)
        sums["tokens"] += labels.numel()
        sums["topk_mass"] += top_lp.exp().sum().item()
        sums["p_trust"] += p_trust.sum().item()
        sums["outliers"] += (advantage < tau).sum().item()
        sums["fkl_weighted"] += ((1 - p_trust) * fkl).sum().item()
        sums["outlier_weight"] += (1 - p_trust).sum().item()
    return sums


def summarise(sums: dict[str, float]) -> dict[str, float]:
    tokens = max(sums["tokens"], 1.0)
    return {
        "teacher_topk_mass": sums["topk_mass"] / tokens,
        "p_trust": sums["p_trust"] / tokens,
        "outlier_share": sums["outliers"] / tokens,
        "outlier_fkl": sums["fkl_weighted"] / max(sums["outlier_weight"], 1e-12),
        "response_tokens": sums["tokens"] / max(sums["responses"], 1.0),
        "finished": sums["finished"] / max(sums["responses"], 1.0),
    }


def probe_worker(
    rank: int, world_size: int, teacher_config, student_config, teacher_path: str, students: dict[str, str],
    tokenizer_path: str, prompts_path: str, num_prompts: int, max_new_tokens: int, topk: int, seed: int,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Probe every student of ``students`` (name -> weights or run directory) against the teacher."""
    from megatron_tropd.demo.pretrain import quiet_worker

    quiet_worker()  # before Megatron is imported
    from megatron_tropd.data import Tokenizer
    from megatron_tropd.placed import one_model_groups, place_model
    from megatron_tropd.rollout.engine import GenerationRequest, SamplingParams
    from megatron_tropd.rollout.text import generate_data_parallel
    from megatron_tropd.runtime import set_seed

    set_seed(seed)
    groups = one_model_groups(1, 1, seed)
    tokenizer = Tokenizer(tokenizer_path)
    teacher = place_model(teacher_config, groups, weights=teacher_path, seed=seed)
    prompts = [tokenizer.encode(text) for text in _read_prompts(prompts_path, num_prompts)]
    requests = [GenerationRequest(tuple(ids), sample_id=i) for i, ids in enumerate(prompts)]
    sampling = SamplingParams(1.0, 1.0, 0, max_new_tokens, (tokenizer.eos_token_id,), seed)
    rows = teacher.rows(len(requests))
    max_length = student_config.max_position_embeddings
    results = {}
    for name, path in students.items():
        student = place_model(student_config, groups, weights=path, seed=seed)
        engine = student.engine(max_length, len(requests) // groups.data_parallel)
        outputs = generate_data_parallel(engine, requests, sampling)[rows]
        sums = token_sums(
            teacher.stage, student.stage, [(out.token_ids, out.prompt_length) for out in outputs],
            student_config.vocab_size, topk,
        )  # fmt: skip
        sums["responses"] = len(outputs)
        sums["finished"] = sum(out.finished_by_stop for out in outputs)
        reduced = torch.tensor([sums[key] for key in SUMS], dtype=torch.float64)
        dist.all_reduce(reduced)
        results[name] = summarise(dict(zip(SUMS, reduced.tolist(), strict=True)))
    return results
