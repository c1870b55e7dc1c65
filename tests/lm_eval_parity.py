"""The set-up of the adapter's parity test with lm-eval's own ``hf`` backend: two tiny HF tokenizers
(Qwen2.5's, which adds no BOS, and Llama 3's, which does; both with their real chat template in
``chat_template.jinja``), one tiny random HF Qwen2 model over both vocabularies, and the requests both
backends answer."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.test_chat_template import CORPUS, build_tokenizer_dir

FAMILIES = ("qwen2_5", "llama3")  # without and with BOS
MAX_LENGTH = 24  # short, so the long requests below are left-truncated
HF_MODEL = {
    "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 336, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "rope_theta": 10000.0,
    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,  # each tokenizer brings its own
}  # fmt: skip
LONG_TEXT = " ".join(CORPUS)  # ~60 tokens: more than MAX_LENGTH
QUESTION = "What is 2 plus 3?"
GREEDY = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}


def build_parity_files(base: Path) -> None:
    """The tokenizers under ``base/<family>`` and the HF model under ``base/hf``."""
    import transformers

    for family in FAMILIES:
        build_tokenizer_dir(base / family, family, template_file=True)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**HF_MODEL))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    model.save_pretrained(base / "hf", safe_serialization=True)


def _instance(request_type: str, arguments: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=arguments, idx=0)


def chat_prompt(lm) -> str:
    """One user turn rendered by ``lm``'s chat template (it starts with the template's BOS, if any)."""
    return lm.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    )


def loglikelihood_requests(chat: str) -> list[tuple[str, str]]:
    return [
        *((f"{QUESTION} The answer is", choice) for choice in (" 5.", " 7.", " 25.")),  # multiple choice
        ("", "The quick brown fox jumps."),  # empty context: conditioned on BOS (else EOS)
        ("Let me think step by step ", "about the problem."),  # the trailing space moves
        (LONG_TEXT, " The answer is 5."),  # truncated
        (chat, "The answer is 5."),  # starts with the template's BOS: none added
    ]


def rolling_requests() -> list[str]:
    return ["The quick brown fox jumps over the lazy dog.", LONG_TEXT]  # one window, then several


def generation_requests(chat: str) -> list[tuple[str, dict]]:
    return [
        (QUESTION, GREEDY),
        (LONG_TEXT, GREEDY),  # truncated to MAX_LENGTH - max_gen_toks tokens
        (chat, {"until": ["."], "max_gen_toks": 8}),
        ("The capital of", {"until": [], "max_gen_toks": 5}),
    ]


def answers(lm, chat: str) -> dict:
    """``lm``'s answers to every parity request (the adapter's and lm-eval's ``hf`` backend's alike)."""
    return {
        "loglikelihood": lm.loglikelihood(
            [_instance("loglikelihood", request) for request in loglikelihood_requests(chat)]
        ),
        "rolling": lm.loglikelihood_rolling(
            [_instance("loglikelihood_rolling", (text,)) for text in rolling_requests()]
        ),
        "generated": lm.generate_until(
            [_instance("generate_until", request) for request in generation_requests(chat)]
        ),
    }


def hf_backend(base: Path, family: str):
    """lm-eval's ``hf`` backend on the HF model and ``family``'s tokenizer, in fp32 on the CPU."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=str(base / "hf"), tokenizer=str(base / family), device="cpu", dtype="float32",
        batch_size=1, max_length=MAX_LENGTH,
    )  # fmt: skip


def chat_task_samples(lm, tasks: Path) -> dict[str, list]:
    """``(arguments, filtered responses)`` of each sample of the local tasks in ``tasks``, run by lm-eval's
    evaluator with ``apply_chat_template``."""
    import os

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(tasks)  # the task files name their data relative to their folder
    try:
        results = simple_evaluate(
            model=lm, tasks=["tropd_tiny_mc", "tropd_tiny_gen"], bootstrap_iters=0, log_samples=True,
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            apply_chat_template=True,
        )  # fmt: skip
    finally:
        os.chdir(cwd)
    return {
        task: [(sample["arguments"], sample["filtered_resps"]) for sample in samples]
        for task, samples in results["samples"].items()
    }
