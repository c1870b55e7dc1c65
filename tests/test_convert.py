"""HF <-> Megatron conversion on tiny random HF models of every architecture (CPU, no downloads).

One 2-rank gloo job (``conversion_worker``) converts each model at TP1, TP2 and PP2 and compares the Megatron
logits with transformers' (fp32) over 4 prompts of max_position_embeddings positions, exports each TP2
checkpoint back to HF (resharding to TP1 and un-padding the vocabulary on the way), and runs the
``--force``, failing-rank and dropped-RoPE-scaling scenarios. The parent process then checks the round trip
bit for bit, loads the export with transformers, and runs the bad-input cases, which fail before any
process group is needed.

Tolerance: HF and Megatron compute the same fp32 math in a different order (fused QKV, TP-split matmuls,
qk-norm), so logits agree to rounding: ``LOGITS_ATOL`` 2e-5 absolute on logits of std ~0.8 (measured
<= 2.9e-6; exactly 0 for qwen2 and llama at TP1 and PP2). The round trip moves bits only (reshape,
concat, pad, slice), so it is exact.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_tropd.spawn import run_on_ranks

ARCHITECTURES = ("qwen2", "qwen3", "llama")
LAYOUTS = ((1, 1), (2, 1), (1, 2))  # (TP, PP) in a 2-rank job: TP1 runs as two data-parallel replicas
LOGITS_ATOL = 2e-5
EXPORT_SHARD_BYTES = 40_000  # forces several safetensors shards out of a ~0.2 MB model

_COMMON = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
}
HF_CONFIGS = {
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": False, "rope_theta": 10000.0}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True, "head_dim": 32, "rope_theta": 1e6}),  # qk norm
    "llama": (
        "LlamaConfig",
        {
            "tie_word_embeddings": False,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    ),
}
LONG_WAVE_LLAMA = {"head_dim": 8, "rope_theta": 1e9, "max_position_embeddings": 512}
"""Overrides of the llama model: its only Llama-3-scaled RoPE frequency has a wavelength of ~2e5
positions, so (as for the low frequencies of a real Llama 3.1) a dropped scaling changes the logits by
~3e-4 over 16 positions and by ~2e-2 over 512."""
VERIFY_PROMPTS = 4


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _save_tiny_hf_model(arch: str, directory: Path, **overrides) -> None:
    """A random HF model (every weight, bias and norm gain random, so no mapping error can hide) saved as
    several safetensors shards with an index, plus a tokenizer side file. An override of None drops that
    field, leaving transformers' default."""
    import transformers

    class_name, extra = HF_CONFIGS[arch]
    # a copy: transformers 5 writes rope_theta into the rope_scaling dict it is given
    fields = copy.deepcopy({k: v for k, v in {**_COMMON, **extra, **overrides}.items() if v is not None})
    config = getattr(transformers, class_name)(**fields)
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(sum(map(ord, arch)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="60KB")
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')


def _all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(input_ids=tokens).logits


LAYER1_DOWN_PROJ = "model.layers.1.mlp.down_proj.weight"
NON_FINITE_PLANTED = 7  # NaN and inf entries planted in the layer-1 down_proj of the ``nan-layer1`` copy


def _with_layer1_down_proj(source: Path, target: Path, down_proj: torch.Tensor) -> None:
    """A copy of ``source`` (one ``model.safetensors``) whose layer-1 down_proj is ``down_proj``: only PP
    stage 1 reads it."""
    from safetensors.torch import save_file

    shutil.copytree(source, target)
    tensors = _all_tensors(target)
    for path in target.glob("model*.safetensors*"):
        path.unlink()
    tensors[LAYER1_DOWN_PROJ] = down_proj
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


def _with_bad_layer1_tensor(source: Path, target: Path) -> None:
    """A copy of ``source`` whose layer-1 down_proj has the wrong shape."""
    _with_layer1_down_proj(source, target, torch.zeros(64, 80))


def _with_non_finite_layer1_tensor(source: Path, target: Path) -> None:
    """A copy of ``source`` whose layer-1 down_proj holds 5 NaN and 2 inf among finite values."""
    down_proj = _all_tensors(source)[LAYER1_DOWN_PROJ].clone()
    down_proj.view(-1)[:5] = float("nan")
    down_proj.view(-1)[-2:] = torch.tensor([float("inf"), float("-inf")])
    _with_layer1_down_proj(source, target, down_proj)


def _error_of(fn, *args, **kwargs) -> str | None:
    try:
        fn(*args, **kwargs)
    except ValueError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------------------
# The 2-rank job
# ---------------------------------------------------------------------------------------------------------


def _force_scenarios(root: Path) -> dict:
    """--force replaces a complete output; a conversion failing on one rank leaves the old output alone."""
    import torch.distributed as dist

    from megatron_tropd.hf import convert

    replaced, kept = root / "replaced", root / "kept"
    if dist.get_rank() == 0:
        for directory in (replaced, kept):
            directory.mkdir()
            (directory / "old.txt").write_text("old\n")
    dist.barrier()
    convert.hf_to_megatron(root / "qwen2" / "hf", replaced, 1, 1, force=True)
    error = _error_of(convert.hf_to_megatron, root / "nan-layer1", kept, 1, 2, force=True)
    dist.barrier()
    return {"replaced": sorted(p.name for p in replaced.iterdir()), "failed_rank_error": error}


def _non_finite_scenarios(rank: int, world_size: int, root: Path) -> dict:
    """Import of HF weights holding NaN / inf at PP2 (only rank 1's stage reads them) and export of a
    Megatron checkpoint whose final norm is NaN: both refused, through the command line's wrapper."""
    from megatron_tropd.checkpoint import load_model_weights, save_model_weights
    from megatron_tropd.hf import convert

    imported = convert.refusing_bad_input(
        rank, world_size, convert.import_job, root / "nan-layer1", root / "nan-import", 1, 2, False, True
    )
    directory, config = convert.read_megatron_config(root / "qwen2" / "megatron-tp1pp1")
    model = convert._build_model(config, 1, 1).stage
    load_model_weights(directory, model, config)
    with torch.no_grad():
        dict(model.named_parameters())["decoder.final_layernorm.weight"][:3] = float("nan")
    save_model_weights(root / "nan-megatron", model, config)
    exported = convert.refusing_bad_input(
        rank, world_size, convert.export_job, root / "nan-megatron", root / "nan-export", False, None, True
    )
    return {"import": imported, "export": exported}


def _dropped_rope_scenario(rank: int, world_size: int, root: Path) -> dict:
    """The long-wave llama imported by a conversion that silently drops its RoPE scaling (patched here, in
    the ranks), checked by ``--verify`` and by the 2 prompts x 16 positions the verify used to run."""
    import dataclasses
    from unittest import mock

    from megatron_tropd.hf import convert
    from megatron_tropd.model_config import ModelConfig

    read = ModelConfig.from_hf_config.__func__

    def dropping_rope_scaling(cls, hf_config):
        return dataclasses.replace(read(cls, hf_config), rope_scaling=None)

    hf_dir, out = root / "long-wave", root / "long-wave-dropped-rope"
    with mock.patch.object(ModelConfig, "from_hf_config", classmethod(dropping_rope_scaling)):
        verified = convert.import_job(rank, world_size, hf_dir, out, 1, 1, False, True)
    short = convert.compare_logits(hf_dir, out, tokens=convert.prompt_tokens(300, seq_len=16, batch=2))
    return {"verify": verified, "short": short}


def conversion_worker(rank: int, world_size: int, root: Path) -> dict:
    from megatron_tropd.hf import convert

    results = {}
    for arch in ARCHITECTURES:
        hf_dir = root / arch / "hf"
        for tp, pp in LAYOUTS:
            out = root / arch / f"megatron-tp{tp}pp{pp}"  # what `convert.py import --verify` runs per rank:
            results[(arch, tp, pp)] = convert.import_job(rank, world_size, hf_dir, out, tp, pp, False, True)
        convert.megatron_to_hf(
            root / arch / "megatron-tp2pp1", root / arch / "export", max_shard_bytes=EXPORT_SHARD_BYTES
        )
    results["force"] = _force_scenarios(root)
    results["non_finite"] = _non_finite_scenarios(rank, world_size, root)
    results["dropped_rope"] = _dropped_rope_scenario(rank, world_size, root)
    return results


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("convert")
    for arch in ARCHITECTURES:
        _save_tiny_hf_model(arch, root / arch / "hf")
    _save_tiny_hf_model("llama", root / "long-wave", **LONG_WAVE_LLAMA)
    _with_bad_layer1_tensor(root / "qwen2" / "hf", root / "bad-layer1")
    _with_non_finite_layer1_tensor(root / "qwen2" / "hf", root / "nan-layer1")
    results = run_on_ranks(conversion_worker, 2, root)
    assert results[0].keys() == results[1].keys()
    return root, results[0]


# ---------------------------------------------------------------------------------------------------------
# Parity and round trip
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"tp{layout[0]}pp{layout[1]}")
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_megatron_logits_match_transformers(converted, arch, layout):
    _, results = converted
    comparison = results[(arch, *layout)]
    assert comparison.logits_std > 0.1, "degenerate logits would make the comparison vacuous"
    assert comparison.max_abs_diff < LOGITS_ATOL, comparison
    assert comparison.top1_agreement == 1.0, comparison
    # whole sequences up to the model's max_position_embeddings, where RoPE errors are largest
    assert comparison.seq_len == _COMMON["max_position_embeddings"], comparison
    assert comparison.num_positions == VERIFY_PROMPTS * comparison.seq_len, comparison
    print(f"{arch} TP{layout[0]}xPP{layout[1]}: {comparison}")


def test_verify_sees_a_dropped_rope_scaling(converted, capsys):
    _, results = converted
    cli = _load_cli()
    short, verified = results["dropped_rope"]["short"], results["dropped_rope"]["verify"]
    assert short.max_abs_diff < cli.DEFAULT_VERIFY_ATOL, short  # what 16 positions could see
    assert verified.seq_len == LONG_WAVE_LLAMA["max_position_embeddings"], verified
    assert verified.max_abs_diff > 5 * cli.DEFAULT_VERIFY_ATOL, verified
    assert verified.worst_position > verified.seq_len // 2, verified  # the error grows with the position
    assert cli._report(verified, cli.DEFAULT_VERIFY_ATOL) == 1
    out, err = capsys.readouterr()
    positions = f"over {verified.num_positions} positions ({VERIFY_PROMPTS} prompts x {verified.seq_len})"
    assert positions in out, out
    assert "top-1 agreement" in out and "exceeds --verify-atol" in err, err


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip_is_bit_identical_and_loads_in_transformers(converted, arch):
    root, _ = converted
    source, exported = root / arch / "hf", root / arch / "export"
    original, round_tripped = _all_tensors(source), _all_tensors(exported)
    assert original.keys() == round_tripped.keys()
    for name, tensor in original.items():
        assert round_tripped[name].dtype == tensor.dtype, name
        assert torch.equal(round_tripped[name], tensor), name
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1 and shard_files[0].endswith(f"-of-{len(shard_files):05d}.safetensors")
    assert sorted(p.name for p in exported.glob("*.safetensors")) == shard_files
    assert (exported / "tokenizer_config.json").read_text() == (source / "tokenizer_config.json").read_text()
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_hf_logits(exported, tokens), _hf_logits(source, tokens))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exported_config_matches_the_source(converted, arch):
    from transformers import AutoConfig

    root, _ = converted
    source = AutoConfig.from_pretrained(root / arch / "hf")
    exported = AutoConfig.from_pretrained(root / arch / "export")
    for key in (*_COMMON, "architectures", "tie_word_embeddings", "rope_parameters", "dtype"):
        assert exported.to_dict().get(key) == source.to_dict().get(key), key
    assert _hf_head_dim(exported) == _hf_head_dim(source)


def _hf_head_dim(config) -> int:
    """The per-head width transformers' attention uses (Qwen2's config has no head_dim field)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exported_config_is_spelled_as_the_installed_transformers_writes_it(converted, arch):
    """One spelling per field (transformers 5: rope_parameters and dtype, no rope_theta / rope_scaling /
    torch_dtype), so re-saving the export with transformers changes nothing; head_dim always."""
    from transformers import AutoConfig

    root, _ = converted
    exported = json.loads((root / arch / "export" / "config.json").read_text())
    rewritten = json.loads(AutoConfig.from_pretrained(root / arch / "export").to_json_string())
    assert exported == rewritten
    assert exported["head_dim"] == _hf_head_dim(AutoConfig.from_pretrained(root / arch / "hf"))


def test_import_writes_config_and_tokenizer_files(converted):
    root, _ = converted
    out = root / "qwen3" / "megatron-tp2pp1"
    model_config = json.loads((out / "model_config.json").read_text())
    assert model_config["architecture"] == "qwen3" and model_config["tie_word_embeddings"] is True
    assert json.loads((out / "hf_config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert (out / "tokenizer_config.json").is_file()
    assert not [p.name for p in root.glob(".*converting*")], "a staging directory was left behind"


def test_force_replaces_and_a_failing_rank_keeps_the_old_output(converted):
    root, results = converted
    assert "old.txt" not in results["force"]["replaced"]
    assert "model_config.json" in results["force"]["replaced"]
    error = results["force"]["failed_rank_error"]
    # rank 0 (stage 0) loaded fine; it raises rank 1's error
    assert error is not None and error.startswith("on rank 1:") and "down_proj" in error, error
    assert (root / "kept" / "old.txt").read_text() == "old\n"
    assert sorted(p.name for p in (root / "kept").iterdir()) == ["old.txt"]


# ---------------------------------------------------------------------------------------------------------
# Non-finite weights and logits
# ---------------------------------------------------------------------------------------------------------


def test_import_refuses_non_finite_hf_weights_naming_the_tensor(converted):
    root, results = converted
    refusal = results["non_finite"]["import"]
    assert type(refusal).__name__ == "Refusal", refusal
    # rank 0 (stage 0) read finite tensors; it reports what rank 1 found, once
    assert refusal.message.startswith("on rank 1: "), refusal.message
    assert f"{LAYER1_DOWN_PROJ!r}" in refusal.message, refusal.message
    assert f"has {NON_FINITE_PLANTED} non-finite value(s)" in refusal.message, refusal.message
    assert not (root / "nan-import").exists()


def test_export_refuses_non_finite_weights_naming_the_tensor(converted):
    root, results = converted
    refusal = results["non_finite"]["export"]
    assert type(refusal).__name__ == "Refusal", refusal
    assert "'model.norm.weight'" in refusal.message and "has 3 non-finite value(s)" in refusal.message
    assert not (root / "nan-export").exists()
    assert not [p.name for p in root.glob(".nan-export*")], "a staging directory was left behind"


def test_verify_fails_on_non_finite_logits_naming_the_side(converted, capsys):
    """The check of ``--verify`` on real HF logits: clean ones pass; NaN / inf on either side fails and
    names that side, even where the NaN makes every difference compare as small."""
    from megatron_tropd.hf.convert import LogitsComparison, _compare_with_hf, prompt_tokens

    root, _ = converted
    cli = _load_cli()
    tokens = prompt_tokens(300, seq_len=16)
    clean = _hf_logits(root / "qwen2" / "hf", tokens)
    assert cli._report(_compare_with_hf(root / "qwen2" / "hf", tokens, clean), 1e-6) == 0
    poisoned = clean.clone()
    poisoned[0, 3, :2] = float("nan")
    poisoned[1, 5, 7] = float("inf")
    comparison = _compare_with_hf(root / "qwen2" / "hf", tokens, poisoned)
    assert (comparison.hf_non_finite, comparison.megatron_non_finite) == (0, 3), comparison
    assert cli._report(comparison, cli.DEFAULT_VERIFY_ATOL) == 1
    assert "FAILED: the Megatron model produced 3 non-finite logit(s)" in capsys.readouterr().err
    comparison = _compare_with_hf(root / "nan-layer1", tokens, clean)  # NaN weights: HF logits NaN
    assert comparison.hf_non_finite > 0 and comparison.megatron_non_finite == 0, comparison
    assert cli._report(comparison, cli.DEFAULT_VERIFY_ATOL) == 1
    err = capsys.readouterr().err
    assert (
        f"FAILED: the HF model produced {comparison.hf_non_finite} non-finite" in err
        and "Megatron" not in err
    )
    nan_diff = LogitsComparison(
        max_abs_diff=float("nan"), top1_agreement=1.0, logits_std=1.0, num_positions=32
    )
    assert cli._report(nan_diff, cli.DEFAULT_VERIFY_ATOL) == 1


def test_cli_import_of_non_finite_weights_exits_2_naming_the_tensor(converted, tmp_path, capsys):
    root, _ = converted
    cli = _load_cli()
    out = tmp_path / "out"
    assert cli.main(["import", "--hf-dir", str(root / "nan-layer1"), "--out", str(out), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "error: HF tensor" in err and LAYER1_DOWN_PROJ in err, err
    assert f"{NON_FINITE_PLANTED} non-finite" in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# Bad input (refused before any process group is touched)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture()
def hf_copy(converted, tmp_path) -> Path:
    root, _ = converted
    copy = tmp_path / "hf"
    shutil.copytree(root / "llama" / "hf", copy)
    return copy


def test_unsupported_architecture_lists_the_supported_ones(hf_copy, tmp_path):
    from megatron_tropd.hf.convert import hf_to_megatron

    config = json.loads((hf_copy / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (hf_copy / "config.json").write_text(json.dumps(config))
    error = _error_of(hf_to_megatron, hf_copy, tmp_path / "out")
    assert "MistralForCausalLM" in error and "Qwen2ForCausalLM" in error and "LlamaForCausalLM" in error


def test_missing_shard_is_named(hf_copy, tmp_path):
    from megatron_tropd.hf.convert import hf_to_megatron

    shard = sorted(hf_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    error = _error_of(hf_to_megatron, hf_copy, tmp_path / "out")
    assert str(shard) in error and "missing" in error


def test_truncated_shard_is_named(hf_copy, tmp_path):
    from megatron_tropd.hf.convert import hf_to_megatron

    shard = sorted(hf_copy.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    error = _error_of(hf_to_megatron, hf_copy, tmp_path / "out")
    assert str(shard) in error and "truncated" in error


def test_tensor_parallel_must_divide_heads_and_groups(hf_copy, tmp_path):
    from megatron_tropd.hf.convert import hf_to_megatron

    error = _error_of(hf_to_megatron, hf_copy, tmp_path / "out", 3, 1)
    assert "not divisible by tensor_parallel=3" in error and "{1, 2}" in error


def test_existing_output_needs_force(converted, hf_copy):
    from megatron_tropd.hf.convert import hf_to_megatron, megatron_to_hf

    root, _ = converted
    existing = root / "llama" / "megatron-tp1pp1"
    assert "--force" in _error_of(hf_to_megatron, hf_copy, existing)
    assert "--force" in _error_of(megatron_to_hf, existing, root / "llama" / "export")
    assert "is the input directory" in _error_of(hf_to_megatron, hf_copy, hf_copy, force=True)


def test_missing_tensor_and_export_of_a_non_checkpoint_are_named(hf_copy, tmp_path):
    from megatron_tropd.hf.convert import hf_to_megatron, megatron_to_hf

    config = json.loads((hf_copy / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights hold 2 layers
    (hf_copy / "config.json").write_text(json.dumps(config))
    error = _error_of(hf_to_megatron, hf_copy, tmp_path / "out")
    assert "model.layers.2." in error and "config" in error
    assert "tropd_checkpoint.json" in _error_of(megatron_to_hf, hf_copy, tmp_path / "out")


def _load_cli():
    import importlib.util

    cli_path = Path(__file__).parents[1] / "tools" / "convert.py"
    spec = importlib.util.spec_from_file_location("convert_cli", cli_path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_cli_reports_bad_input_without_starting_ranks(converted, capsys):
    root, _ = converted
    cli = _load_cli()
    hf_dir, existing = root / "qwen2" / "hf", root / "qwen2" / "megatron-tp1pp1"
    assert cli.main(["import", "--hf-dir", str(hf_dir), "--out", str(existing)]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["import", "--hf-dir", str(hf_dir), "--out", str(root / "x"), "--tp", "4"]) == 2
    assert "tensor_parallel=4" in capsys.readouterr().err


def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def _cli_refusal_without_ranks(cli, monkeypatch, capsys, argv: list[str]) -> str:
    """The CLI's stderr for ``argv``, which must be refused (exit 2) before any rank is started."""

    def no_ranks(*args, **kwargs):
        raise AssertionError("the refusal came from the ranks, not from the check before them")

    monkeypatch.setattr(cli, "_run", no_ranks)
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_cli_refuses_rope_scaling_megatron_cannot_build_before_starting_ranks(
    hf_copy, tmp_path, monkeypatch, capsys
):
    _edit_config(hf_copy, lambda config: config["rope_parameters"].update(low_freq_factor=2.0))
    argv = ["import", "--hf-dir", str(hf_copy), "--out", str(tmp_path / "out"), "--verify"]
    err = _cli_refusal_without_ranks(_load_cli(), monkeypatch, capsys, argv)
    assert "rope_scaling.low_freq_factor=2.0 cannot be built" in err and "fixes low_freq_factor=1.0" in err
    assert "Llama-3.1 defaults" in err and err.count("error:") == 1, err


def test_cli_refuses_a_shape_disagreement_before_starting_ranks(converted, tmp_path, monkeypatch, capsys):
    root, _ = converted
    argv = ["import", "--hf-dir", str(root / "bad-layer1"), "--out", str(tmp_path / "out"), "--pp", "2"]
    err = _cli_refusal_without_ranks(_load_cli(), monkeypatch, capsys, argv)
    expected = f"'{LAYER1_DOWN_PROJ}' is (64, 80), config.json implies (64, 96)"
    assert expected in err and "intermediate_size=96" in err and "1 tensor shape(s)" in err, err
    assert not (tmp_path / "out").exists()


def test_missing_rope_theta_is_read_as_transformers_reads_it(converted, tmp_path):
    from transformers import AutoConfig

    from megatron_tropd.hf.convert import read_hf_checkpoint

    root, _ = converted
    shutil.copytree(root / "qwen2" / "hf", tmp_path / "hf")  # its rope_theta is the default, 10000

    def drop_rope_theta(config: dict) -> None:
        for key in ("rope_parameters", "rope_theta", "rope_scaling"):
            config.pop(key, None)

    _edit_config(tmp_path / "hf", drop_rope_theta)
    expected = AutoConfig.from_pretrained(tmp_path / "hf").rope_parameters["rope_theta"]
    assert read_hf_checkpoint(tmp_path / "hf").model_config.rotary_base == expected == 10000.0


def test_qwen3_without_head_dim_is_read_as_transformers_reads_it(converted, tmp_path):
    """Qwen3Config's head_dim defaults to 128, not hidden / heads (16 here): a config.json without it
    converts as transformers builds it, and one whose weights have another head_dim is refused early."""
    from transformers import AutoConfig

    from megatron_tropd.hf.convert import check_import_inputs, read_hf_checkpoint

    root, _ = converted
    default_head = tmp_path / "default-head-dim"
    _save_tiny_hf_model("qwen3", default_head, head_dim=None)
    _edit_config(default_head, lambda config: config.pop("head_dim"))
    assert AutoConfig.from_pretrained(default_head).head_dim == 128
    assert read_hf_checkpoint(default_head).model_config.kv_channels == 128
    shutil.copytree(root / "qwen3" / "hf", tmp_path / "head-dim-32")
    _edit_config(tmp_path / "head-dim-32", lambda config: config.pop("head_dim"))
    error = _error_of(check_import_inputs, tmp_path / "head-dim-32", tmp_path / "out", 1, 1, False)
    assert "head_dim=128" in error and "q_proj.weight' is (128, 64), config.json implies (512, 64)" in error


def test_cli_export_with_verify_and_its_failure_exit(converted, tmp_path, capsys):
    """End to end through the CLI (it spawns its own rank); the import side runs the same ``import_job``
    in ``conversion_worker``. An impossible --verify-atol must fail with exit status 1."""
    from megatron_tropd.hf.convert import LogitsComparison

    root, _ = converted
    cli = _load_cli()
    hf_dir = tmp_path / "hf"
    argv = ["export", "--ckpt-dir", str(root / "qwen3" / "megatron-tp1pp2"), "--out", str(hf_dir), "--verify"]
    assert cli.main([*argv, "--verify-seq-len", "100"]) == 0
    out = capsys.readouterr().out
    assert (
        f"top-1 agreement 100.00% over {VERIFY_PROMPTS * 100} positions ({VERIFY_PROMPTS} prompts x 100)"
        in out
    )
    original, exported = _all_tensors(root / "qwen3" / "hf"), _all_tensors(hf_dir)
    assert original.keys() == exported.keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in original.items())
    worse = LogitsComparison(max_abs_diff=2e-3, top1_agreement=1.0, logits_std=1.0, num_positions=32)
    assert cli._report(worse, cli.DEFAULT_VERIFY_ATOL) == 1
    assert "FAILED" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The trainer loads a converted teacher
# ---------------------------------------------------------------------------------------------------------


def trainer_teacher_worker(rank: int, world_size: int, teacher_dir: Path, tokens: torch.Tensor) -> dict:
    """Set up the tiny recipe's job with the converted model as its teacher and score ``tokens``."""
    import dataclasses

    from megatron_tropd.batch import RolloutBatch
    from megatron_tropd.hf.convert import read_megatron_config
    from megatron_tropd.scoring import ScoringSpec, score_batch
    from megatron_tropd.trainer import setup
    from recipes import get_recipe

    _, teacher_config = read_megatron_config(teacher_dir)
    config = get_recipe("tiny_cpu")
    checkpoint = dataclasses.replace(config.checkpoint, teacher=str(teacher_dir), resume="never")
    config = dataclasses.replace(config, teacher=teacher_config, checkpoint=checkpoint)
    job, _ = setup(config)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    batch = RolloutBatch(tokens, mask, torch.zeros_like(mask), torch.arange(tokens.shape[0]))
    spec = ScoringSpec(300, 4, False, 1, 0)
    scored = score_batch(batch, job.student.placed, job.teacher, spec, 0)
    return {"rows": job.topology.student.position.dp_rank, "lp_teacher": scored.lp_teacher}


def test_trainer_scores_with_a_converted_teacher(converted):
    root, _ = converted
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    results = run_on_ranks(trainer_teacher_worker, 2, root / "qwen2" / "megatron-tp1pp1", tokens)
    lp_teacher = torch.cat([r["lp_teacher"] for r in sorted(results, key=lambda r: r["rows"])])
    expected = torch.log_softmax(_hf_logits(root / "qwen2" / "hf", tokens), -1)[:, :-1]
    expected = expected.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp_teacher[:, :-1], expected, atol=LOGITS_ATOL, rtol=0)
