"""models.py: HF config mapping and validation, vocabulary padding, parameter and FLOP counts, and
layout-independent initialisation.

The distributed part is one 4-rank gloo job (``layout_results``, shared by the tests below it): for the tiny
Qwen2 (qkv bias, untied head), Qwen3 (qk RMSNorm, tied head, head_dim != hidden/heads) and Llama (Llama-3
RoPE scaling) models, ``build_gpt_model(seed=...)`` must give the same logits at TP2, PP2 and TP2xPP2 as a
TP1 reference. The reference is built on single-rank process groups while Megatron's global
``parallel_state`` holds the TP2 layout, so it also proves that a model follows its ``pg_collection`` and
not the global groups (the teacher/student situation).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_tropd import models
from megatron_tropd.models import Llama3RopeScaling, ModelConfig
from megatron_tropd.spawn import run_on_ranks

SEED = 1234
BATCH, SEQ = 2, 16
ARCHITECTURES = ("qwen2", "qwen3", "llama")
LAYOUTS = ((2, 1), (1, 2), (2, 2))  # (TP, PP) on 4 ranks; the rest is data parallel
# fp32: TP splits the matmul reductions (row-parallel all-reduce) and so changes the summation order:
# measured <= 3e-7 on logits of std ~0.16. PP alone only moves activations between stages, so TP1xPP2 must
# be bitwise equal. A misplaced shard (fc1 laid out as local [gate; up] blocks, seeds by local layer name,
# an untied last-stage head) moves the logits by ~1e-1.
LOGITS_ATOL, LOGITS_RTOL = 2e-5, 1e-5


# ---------------------------------------------------------------------------------------------------------
# Representative HF config.json dicts (as released)
# ---------------------------------------------------------------------------------------------------------

HF_R1_DISTILL_QWEN_1_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "attention_dropout": 0.0,
    "bos_token_id": 151646,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 131072,
    "max_window_layers": 21,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

HF_QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

HF_LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}

HF_CASES = {
    "r1_distill_qwen_1_5b": (HF_R1_DISTILL_QWEN_1_5B, models.qwen2_5_1_5b),
    "qwen3_4b": (HF_QWEN3_4B, models.qwen3_4b),
    "llama_3_1_8b": (HF_LLAMA_3_1_8B, models.llama3_8b),
}


# ---------------------------------------------------------------------------------------------------------
# Config mapping and validation (single process, no megatron)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HF_CASES)
def test_from_hf_config_maps_every_field_and_round_trips(name):
    hf, preset = HF_CASES[name]
    config = ModelConfig.from_hf_config(hf)
    assert config.num_layers == hf["num_hidden_layers"]
    assert config.hidden_size == hf["hidden_size"]
    assert config.ffn_hidden_size == hf["intermediate_size"]
    assert config.num_attention_heads == hf["num_attention_heads"]
    assert config.num_query_groups == hf["num_key_value_heads"]
    assert config.head_dim == hf.get("head_dim")
    assert config.vocab_size == hf["vocab_size"]
    assert config.max_position_embeddings == hf["max_position_embeddings"]
    assert config.rotary_base == hf["rope_theta"]
    assert config.norm_epsilon == hf["rms_norm_eps"]
    assert config.tie_word_embeddings == hf["tie_word_embeddings"]
    assert config.add_qkv_bias == (hf["model_type"] == "qwen2")
    assert config.qk_layernorm == (hf["model_type"] == "qwen3")
    hf_scaling = hf.get("rope_scaling")
    expected_scaling = (
        None if hf_scaling is None else {k: v for k, v in hf_scaling.items() if k != "rope_type"}
    )
    actual_scaling = None if config.rope_scaling is None else dataclasses.asdict(config.rope_scaling)
    assert actual_scaling == expected_scaling
    assert config == preset(), "the preset must match the released config.json"

    exported = config.to_hf_config()
    assert {k: v for k, v in exported.items() if k in hf} == {k: hf[k] for k in exported if k in hf}
    assert {"architectures", "num_hidden_layers", "rope_theta", "tie_word_embeddings"} <= exported.keys()
    assert ModelConfig.from_hf_config(exported) == config


def test_from_hf_config_reads_transformers_5_rope_parameters():
    hf = {k: v for k, v in HF_LLAMA_3_1_8B.items() if k not in ("rope_theta", "rope_scaling")}
    hf["rope_parameters"] = {**HF_LLAMA_3_1_8B["rope_scaling"], "rope_theta": 500000.0}
    assert ModelConfig.from_hf_config(hf) == models.llama3_8b()
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    assert ModelConfig.from_hf_config(hf).rope_scaling is None


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["MistralForCausalLM"]}, "Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaForCausalLM"),
        ({"architectures": None, "model_type": "gemma"}, "supported: Qwen2ForCausalLM"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"hidden_act": "gelu"}, "only 'silu'"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"attention_bias": True}, "o_proj bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"num_hidden_layers": None}, "num_layers must be an integer"),
    ],
)
def test_from_hf_config_rejects_what_it_cannot_build(change, match):
    hf = {**HF_LLAMA_3_1_8B, **change}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf)


def test_from_hf_config_names_a_missing_key():
    hf = {k: v for k, v in HF_QWEN3_4B.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match="'intermediate_size'"):
        ModelConfig.from_hf_config(hf)


def test_validate_parallel_names_the_field_and_the_valid_sizes():
    student = models.qwen2_5_1_5b()  # 12 heads, 2 KV groups, 28 layers
    message = "num_query_groups=2 is not divisible by tensor_parallel=4; use TP in {1, 2}"
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        student.validate_parallel(4, 1)
    with pytest.raises(ValueError, match="num_query_groups=2 is not divisible by tensor_parallel=3"):
        student.validate_parallel(3, 1)  # 12 heads would split 3 ways; the 2 KV groups cannot
    with pytest.raises(
        ValueError, match=r"num_layers=28 .* pipeline_parallel=3; use PP in \{1, 2, 4, 7, 14, 28\}"
    ):
        student.validate_parallel(1, 3)
    with pytest.raises(ValueError, match="tensor_parallel must be an integer >= 1"):
        student.validate_parallel(0, 1)
    student.validate_parallel(2, 4)
    models.qwen2_5_7b().validate_parallel(4, 2)
    models.qwen3_4b().validate_parallel(8, 4)
    models.llama3_8b().validate_parallel(8, 8)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: models.tiny(num_query_groups=3), "multiple of model.num_query_groups=3"),
        (lambda: models.tiny(hidden_size=66), "set model.head_dim"),
        (lambda: models.tiny(vocab_size=0), "model.vocab_size must be an integer >= 1"),
        (lambda: models.tiny(norm_epsilon=0.0), "model.norm_epsilon"),
        (lambda: models.tiny(activation="gelu"), "only 'swiglu'"),
        (
            lambda: models.tiny("qwen3", qk_layernorm=False),
            "'qwen3' needs add_qkv_bias=False and qk_layernorm=True",
        ),
        (lambda: models.tiny("llama", add_qkv_bias=True), "'llama' needs add_qkv_bias=False"),
        (lambda: models.tiny(architecture="mistral"), "choose one of: qwen2, qwen3, llama"),
        (lambda: models.tiny("llama", rope_scaling=Llama3RopeScaling(8.0, 4.0, 1.0)), "must exceed"),
    ],
)
def test_validate_rejects_inconsistent_configs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_presets_and_tiny_variants_validate():
    for preset in (
        models.qwen2_5_1_5b,
        models.qwen2_5_7b,
        models.qwen3_1_7b,
        models.qwen3_4b,
        models.llama3_8b,
    ):
        preset().validate()
    assert models.qwen3_4b().kv_channels == 128 != 2560 // 32  # head_dim is not hidden / heads
    for architecture in ARCHITECTURES:
        config = models.tiny(architecture)
        assert config.architecture == architecture and config.vocab_size % 128 != 0  # padded rows exist
    assert models.tiny(num_layers=2).num_layers == 2


def test_build_refuses_unbuildable_configs_before_touching_process_groups():
    odd_rope = models.tiny(
        "llama", rope_scaling=Llama3RopeScaling(8.0, low_freq_factor=2.0, high_freq_factor=4.0)
    )
    kwargs = {"pre_process": True, "post_process": True, "pipeline_parallel_size": 1}
    with pytest.raises(ValueError, match="fixes low_freq_factor=1.0"):
        models.build_gpt_model(odd_rope, None, tensor_parallel_size=1, **kwargs)
    with pytest.raises(ValueError, match="num_query_groups=2 is not divisible by tensor_parallel=4"):
        models.build_gpt_model(models.tiny(), None, tensor_parallel_size=4, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Sizes and FLOPs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vocab, divisible_by, tp", [(300, 128, 1), (300, 128, 2), (151936, 128, 2), (128, 128, 4)]
)
def test_padded_vocab_size(vocab, divisible_by, tp):
    padded = models.padded_vocab_size(vocab, divisible_by, tp)
    assert padded % (divisible_by * tp) == 0 and vocab <= padded < vocab + divisible_by * tp


def test_padded_vocab_size_examples():
    assert models.padded_vocab_size(300, 128, 1) == 384  # 3 x 128
    assert models.padded_vocab_size(300, 128, 2) == 512  # 2 x 256
    assert models.padded_vocab_size(151936, 128, 1) == 151936  # 1187 x 128: Qwen needs no padding at TP1
    assert models.padded_vocab_size(151936, 128, 2) == 152064  # 594 x 256
    assert models.padded_vocab_size(256, 128, 2) == 256


def test_count_parameters_matches_published_totals():
    # Totals of the released safetensors (Llama-3.1-8B: 8.03B, Qwen2.5-7B shape: 7.62B, Qwen3-4B: 4.02B).
    assert models.count_parameters(models.llama3_8b()) == 8_030_261_248
    assert models.count_parameters(models.qwen2_5_7b()) == 7_615_616_512
    assert models.count_parameters(models.qwen3_4b()) == 4_022_468_096


def test_model_flops_per_token_structure():
    config = models.qwen3_4b()
    forward = models.model_flops_per_token(config, 4096, forward_only=True)
    assert models.model_flops_per_token(config, 4096) == 3 * forward
    attention_per_token = 4 * config.num_layers * config.num_attention_heads * config.kv_channels
    assert models.model_flops_per_token(config, 4097, forward_only=True) - forward == attention_per_token
    # Without attention, the forward pass is 2 FLOPs per matmul weight: all but embeddings, norms, biases
    # (the tied head is a matmul too, so the vocab matrix counts once whether tied or not).
    non_matmul = 2 * config.num_layers * config.hidden_size + config.hidden_size
    non_matmul += 2 * config.num_layers * config.kv_channels  # qk norms
    matmul_weights = models.count_parameters(config) - non_matmul
    assert forward - 4096 * attention_per_token == 2 * matmul_weights


# ---------------------------------------------------------------------------------------------------------
# One 4-rank job: the same logits at every layout
# ---------------------------------------------------------------------------------------------------------


def _single_rank_collection(rank: int, world_size: int):
    """Process groups of a TP1/PP1 model living on this rank alone (every rank creates every group)."""
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection

    singles = [dist.new_group([r]) for r in range(world_size)]
    collection = ProcessGroupCollection()
    for name in (
        "tp",
        "pp",
        "mp",
        "embd",
        "pos_embd",
        "cp",
        "tp_cp",
        "dp",
        "dp_cp",
        "tp_dp_cp",
        "ep",
        "expt_tp",
        "tp_ep",
        "tp_ep_pp",
        "expt_dp",
    ):
        setattr(collection, name, singles[rank])
    return collection


def _tokens(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ), generator=generator)
    return tokens, torch.arange(SEQ).expand(BATCH, SEQ)


def _gather_vocab(logits: torch.Tensor, tp_group) -> torch.Tensor:
    import torch.distributed as dist

    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(shards, logits.contiguous(), group=tp_group)
    return torch.cat(shards, dim=-1)  # [B, S, padded_vocab]


def _pipelined_logits(model, tokens, positions):
    """Forward through every PP stage with Megatron's schedule; the logits on the last stage, else None."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), positions, None)
        return output, lambda out: (torch.zeros(()), {"logits": out.detach().clone()})

    stored = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tokens]),
        model=[model],
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=True,
    )
    return stored[0]["logits"] if parallel_state.is_pipeline_last_stage() else None


def _reference_facts(config: ModelConfig, collection, tokens, positions) -> dict:
    """TP1 logits plus what the parent checks about the initialisation, the size and the FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    kwargs = {
        "pre_process": True,
        "post_process": True,
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
    }
    model = models.build_gpt_model(config, collection, seed=SEED, **kwargs)
    with FlopCounterMode(display=False) as counter:
        logits = model(tokens, positions, None)
    other_seed = models.build_gpt_model(config, collection, seed=SEED + 1, **kwargs)
    params = dict(model.named_parameters())
    return {
        "logits": logits,
        "other_seed_logits": other_seed(tokens, positions, None),
        "flops": counter.get_total_flops(),
        "padded_vocab": model.vocab_size,
        "numel": sum(p.numel() for p in params.values()),
        "params": {name: p.detach().clone() for name, p in params.items()},
        "inv_freq": model.rotary_pos_emb.inv_freq.clone(),
    }


def _layout_logits(config: ModelConfig, tp: int, pp: int, tokens, positions):
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    collection = ProcessGroupCollection.use_mpu_process_groups()
    model = models.build_gpt_model(
        config,
        collection,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        seed=SEED,
    )
    logits = model(tokens, positions, None) if pp == 1 else _pipelined_logits(model, tokens, positions)
    return None if logits is None else _gather_vocab(logits, collection.tp)


def layouts_worker(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_tropd.runtime import enable_cpu_mode

    enable_cpu_mode()
    single = _single_rank_collection(rank, world_size)
    results: dict = {arch: {} for arch in ARCHITECTURES}
    with torch.no_grad():
        for tp, pp in LAYOUTS:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
            )
            model_parallel_cuda_manual_seed(SEED)  # attention forks this RNG tracker even with dropout 0
            for arch in ARCHITECTURES:
                config = models.tiny(arch)
                tokens, positions = _tokens(config.vocab_size)
                if (tp, pp) == LAYOUTS[0]:  # the TP1 reference, built while the global state says TP2
                    results[arch]["reference"] = _reference_facts(config, single, tokens, positions)
                results[arch][(tp, pp)] = _layout_logits(config, tp, pp, tokens, positions)
            parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def layout_results() -> list[dict]:
    return run_on_ranks(layouts_worker, 4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_are_layout_independent(layout_results, arch):
    reference = layout_results[0][arch]["reference"]["logits"]  # [B, S, padded at TP1]
    vocab = models.tiny(arch).vocab_size
    assert reference[..., vocab:].eq(0).all(), "padded vocabulary rows must be zero"
    assert reference[..., :vocab].std() > 1e-2, "degenerate logits would make the comparison vacuous"
    for rank, result in enumerate(layout_results):
        assert torch.equal(result[arch]["reference"]["logits"], reference), f"rank {rank}: TP1 differs"
        for tp, pp in LAYOUTS:
            logits = result[arch][(tp, pp)]
            is_last_stage = rank // (4 // pp) == pp - 1  # rank = tp_rank + TP * (dp_rank + DP * pp_rank)
            assert (logits is not None) == is_last_stage, f"rank {rank} TP{tp}xPP{pp}"
            if logits is None:
                continue
            padded = models.padded_vocab_size(vocab, 128, tp)
            assert logits.shape == (BATCH, SEQ, padded)
            assert logits[..., vocab:].eq(0).all()
            if tp == 1:
                assert torch.equal(logits, reference), f"{arch} TP1xPP{pp} rank {rank} is not bitwise equal"
            torch.testing.assert_close(
                logits[..., :vocab],
                reference[..., :vocab],
                atol=LOGITS_ATOL,
                rtol=LOGITS_RTOL,
                msg=lambda m, tp=tp, pp=pp, rank=rank: f"{arch} TP{tp}xPP{pp} rank {rank}: {m}",
            )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_seed_changes_the_model(layout_results, arch):
    facts = layout_results[0][arch]["reference"]
    assert (facts["logits"] - facts["other_seed_logits"]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_initialisation_follows_megatrons_rules(layout_results, arch):
    config = models.tiny(arch)
    params = layout_results[0][arch]["reference"]["params"]
    std, num_layers = config.init_method_std, config.num_layers
    for name, value in params.items():
        if name.endswith("bias"):
            assert value.eq(0).all(), name
        elif "layernorm" in name:
            assert value.eq(1).all(), name
    embedding = params["embedding.word_embeddings.weight"]
    assert embedding[config.vocab_size :].eq(0).all()
    assert embedding[: config.vocab_size].std().item() == pytest.approx(std, rel=0.05)
    projections = [v for n, v in params.items() if n.endswith(("linear_proj.weight", "linear_fc2.weight"))]
    assert len(projections) == 2 * num_layers
    assert torch.cat([p.flatten() for p in projections]).std().item() == pytest.approx(
        std / math.sqrt(2 * num_layers), rel=0.05
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_built_model_has_the_architectures_features(layout_results, arch):
    config = models.tiny(arch)
    facts = layout_results[0][arch]["reference"]
    names = facts["params"].keys()
    assert any(n.endswith("linear_qkv.bias") for n in names) == config.add_qkv_bias
    assert any(n.endswith("q_layernorm.weight") for n in names) == config.qk_layernorm
    assert ("output_layer.weight" in names) == (not config.tie_word_embeddings)
    qkv = facts["params"]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((config.num_attention_heads + 2 * config.num_query_groups) * config.kv_channels, 64)
    padding = (facts["padded_vocab"] - config.vocab_size) * config.hidden_size
    tied = config.tie_word_embeddings
    assert facts["numel"] == models.count_parameters(config) + padding * (1 if tied else 2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_flops_match_a_flop_counter(layout_results, arch):
    """The forward FLOPs counted by torch on the TP1 model (its LM head spans the padded vocabulary)."""
    facts = layout_results[0][arch]["reference"]
    padded = dataclasses.replace(models.tiny(arch), vocab_size=facts["padded_vocab"])
    assert facts["flops"] == models.model_flops_per_token(padded, SEQ, forward_only=True) * BATCH * SEQ


def _hf_llama3_inv_freq(config: ModelConfig) -> torch.Tensor:
    """transformers' ``_compute_llama3_parameters``, written out independently of Megatron."""
    dim, scaling = config.kv_channels, config.rope_scaling
    inv_freq = 1.0 / config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = (
        old_context / scaling.low_freq_factor,
        old_context / scaling.high_freq_factor,
    )
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def test_llama3_rope_scaling_reaches_the_model(layout_results):
    config = models.tiny("llama")
    inv_freq = layout_results[0]["llama"]["reference"]["inv_freq"]
    expected = _hf_llama3_inv_freq(config)
    torch.testing.assert_close(inv_freq, expected, atol=0, rtol=1e-6)
    unscaled = _hf_llama3_inv_freq(dataclasses.replace(config, rope_scaling=Llama3RopeScaling(factor=1.0)))
    assert not torch.allclose(expected, unscaled), "the tiny Llama must exercise the scaled frequency bands"
