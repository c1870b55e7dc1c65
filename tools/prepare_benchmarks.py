"""Download the paper's evaluation benchmarks from the Hugging Face hub into the eval JSONL schema.

    python tools/prepare_benchmarks.py --out data/benchmarks                 # all seven, from the hub
    python tools/prepare_benchmarks.py --out data/benchmarks --only AIME24 GPQA-D
    python tools/prepare_benchmarks.py --out data/benchmarks --local mirror/  # mirror/<name>.jsonl rows
    python tools/prepare_benchmarks.py --out data/benchmarks --domain GPQA-D=multiple_choice  # its family

Each benchmark is one row of :data:`SOURCES`: where it lives on the hub and which hub column feeds which
schema field; a converter per row shape does the rest (option shuffling, test decoding). Every converted
row is validated by :func:`megatron_tropd.eval.schema.parse_item` before it is written, and
``benchmarks.json`` lists what was written (in the paper's column order). Rows that cannot be represented
are skipped and counted (IFBench constraints without a registered checker; LiveCodeBench problems with no
usable tests); the counts are logged and stored in the manifest.

Each manifest entry names the benchmark's ``domain``, what per-domain averages group it under: the
family, except GPQA-D under ``science`` (graduate-level science questions), so that the math, code and
science scores line up with the domains of the multi-teacher recipes' teachers. ``--domain NAME=DOMAIN``
sets another.

Hub access needs the ``datasets`` package (and ``huggingface_hub`` for LiveCodeBench's JSONL files) and,
for the gated GPQA, a token (``huggingface-cli login``). ``--local`` reads hub-shaped rows from files
instead (the tests use it; so can an offline mirror).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import pickle
import random
import sys
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tropd.eval.ifbench import IFBENCH_CHECKERS  # noqa: E402
from megatron_tropd.eval.ifeval import IFEVAL_CHECKERS  # noqa: E402
from megatron_tropd.eval.schema import LETTERS, parse_item  # noqa: E402

logger = logging.getLogger("prepare_benchmarks")


@dataclass(frozen=True)
class HubSource:
    """Where one benchmark lives and how its columns map onto the schema (``fields``: ours -> hub)."""

    family: str
    repo: str
    fields: dict[str, str | tuple[str, ...]]
    converter: str
    split: str = "test"
    config: str | None = None
    """A dataset config; "*" means every config (MMLU-Redux has one per subject)."""
    files: tuple[str, ...] = ()
    """Raw JSONL files in the hub repo, read instead of ``datasets`` (LiveCodeBench)."""
    loose: bool = False
    """Scored with the loose instruction-following accuracy (the paper's IFBench number)."""
    keep: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Only rows whose hub column has one of these values."""
    date_window: tuple[str, str] | None = None
    """LiveCodeBench: [start, end) on contest_date (ISO); None keeps every problem of the release."""
    domain: str = ""
    """The domain written to the manifest; empty means the family."""


# Paper column order (Table 4): AIME24, AIME25, AMC23, GPQA-D, MMLU-Redux, IFBench, LCB v6.
SOURCES: dict[str, HubSource] = {
    "AIME24": HubSource(
        "math",
        "HuggingFaceH4/aime_2024",
        {"id": "id", "prompt": "problem", "answer": "answer"},
        "math",
        split="train",
    ),
    "AIME25": HubSource(
        "math", "math-ai/aime25", {"id": "id", "prompt": "problem", "answer": "answer"}, "math"
    ),
    "AMC23": HubSource(
        "math", "math-ai/amc23", {"id": "id", "prompt": "question", "answer": "answer"}, "math"
    ),
    "GPQA-D": HubSource(
        "multiple_choice",
        "Idavidrein/gpqa",
        {
            "id": "Record ID",
            "question": "Question",
            "correct": "Correct Answer",
            "incorrect": ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
        },
        "shuffled_options",
        split="train",
        config="gpqa_diamond",
        domain="science",
    ),
    "MMLU-Redux": HubSource(
        "multiple_choice",
        "edinburgh-dawg/mmlu-redux-2.0",
        {"question": "question", "options": "choices", "answer_index": "answer"},
        "indexed_options",
        config="*",
        keep={"error_type": ("ok",)},
    ),
    "IFBench": HubSource(
        "instruction",
        "allenai/IFBench_test",
        {"id": "key", "prompt": "prompt", "instruction_ids": "instruction_id_list", "kwargs": "kwargs"},
        "instruction_ids",
        split="train",
        loose=True,
    ),
    # release_v6 is the union of these six files; the paper does not state its date window.
    "LCB-v6": HubSource(
        "code",
        "livecodebench/code_generation_lite",
        {
            "id": "question_id",
            "prompt": "question_content",
            "starter": "starter_code",
            "public": "public_test_cases",
            "private": "private_test_cases",
            "metadata": "metadata",
            "date": "contest_date",
        },
        "livecodebench",
        files=tuple(f"test{n}.jsonl" for n in ("", "2", "3", "4", "5", "6")),
    ),
}

# IFEval ids (scored by lm-eval's IFEval checkers) and IFBench ids are checker names with their benchmark's
# keyword names: hub kwargs pass through unchanged (nulls dropped).
INSTRUCTION_IDS = frozenset(IFBENCH_CHECKERS) | frozenset(IFEVAL_CHECKERS)


class SkipRow(Exception):
    """A hub row the schema cannot represent; counted, not fatal."""


# ---------------------------------------------------------------------------------------- converters


def _convert_math(row: dict, spec: HubSource, index: int) -> dict:
    f = spec.fields
    return {"id": str(row.get(f["id"], index)), "prompt": row[f["prompt"]], "answer": str(row[f["answer"]])}


def _convert_shuffled_options(row: dict, spec: HubSource, index: int) -> dict:
    """GPQA lists the correct answer apart: shuffle it in, seeded by the row id (stable across runs)."""
    f = spec.fields
    item_id = str(row[f["id"]])
    correct = row[f["correct"]].strip()
    options = [correct] + [row[column].strip() for column in f["incorrect"]]
    random.Random(f"gpqa:{item_id}").shuffle(options)
    return {
        "id": item_id,
        "question": row[f["question"]].strip(),
        "options": options,
        "answer": LETTERS[options.index(correct)],
    }


def _convert_indexed_options(row: dict, spec: HubSource, index: int) -> dict:
    f = spec.fields
    subject = row.get("_config", "all")
    return {
        "id": f"{subject}-{row.get('_row', index)}",
        "question": row[f["question"]],
        "options": list(row[f["options"]]),
        "answer": LETTERS[int(row[f["answer_index"]])],
    }


def _convert_instruction_ids(row: dict, spec: HubSource, index: int) -> dict:
    f = spec.fields
    constraints = []
    for instruction_id, hub_kwargs in zip(row[f["instruction_ids"]], row[f["kwargs"]], strict=True):
        if instruction_id not in INSTRUCTION_IDS:
            raise SkipRow(f"no checker for {instruction_id}")
        clean = {k: v for k, v in (hub_kwargs or {}).items() if v is not None}  # hub rows pad with nulls
        constraints.append({"type": instruction_id, "kwargs": clean})
    return {"id": str(row[f["id"]]), "prompt": row[f["prompt"]], "constraints": constraints}


class _NoGlobalsUnpickler(pickle.Unpickler):
    """LiveCodeBench pickles plain strings; refusing every global makes loading hub data safe."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from benchmark data")


def decode_lcb_tests(raw: str) -> list[dict]:
    """LiveCodeBench test lists: JSON, or base64(zlib(pickle(JSON string))) for the private ones."""
    try:
        return json.loads(raw)
    except ValueError:
        unpacked = _NoGlobalsUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(raw)))).load()
        return json.loads(unpacked)


def _convert_livecodebench(row: dict, spec: HubSource, index: int) -> dict:
    f = spec.fields
    if spec.date_window and not spec.date_window[0] <= row[f["date"]][:10] < spec.date_window[1]:
        raise SkipRow("outside the date window")
    tests = decode_lcb_tests(row[f["public"]]) + decode_lcb_tests(row[f["private"]] or "[]")
    if not tests:
        raise SkipRow("no tests")
    functional = tests[0].get("testtype") == "functional"
    prompt = row[f["prompt"]]
    out = {"id": str(row[f["id"]]), "tests": [{"input": t["input"], "output": t["output"]} for t in tests]}
    if functional:  # LeetCode style: call metadata's func_name with JSON arguments
        out["entry"] = json.loads(row[f["metadata"]] or "{}").get("func_name")
        if not out["entry"]:
            raise SkipRow("functional problem without func_name")
        prompt += "\n\nStarter code:\n```python\n" + row[f["starter"]] + "\n```"
    return {**out, "prompt": prompt}


CONVERTERS = {
    "math": _convert_math,
    "shuffled_options": _convert_shuffled_options,
    "indexed_options": _convert_indexed_options,
    "instruction_ids": _convert_instruction_ids,
    "livecodebench": _convert_livecodebench,
}


def convert_rows(name: str, spec: HubSource, rows: Iterable[dict]) -> tuple[list[dict], dict[str, int]]:
    """Hub rows -> validated schema rows, plus skip counts by reason."""
    converted, skipped = [], {}
    for index, row in enumerate(rows):
        if any(row.get(column) not in values for column, values in spec.keep.items()):
            skipped["filtered"] = skipped.get("filtered", 0) + 1
            continue
        try:
            out = CONVERTERS[spec.converter](row, spec, index)
        except SkipRow as reason:
            skipped[str(reason)] = skipped.get(str(reason), 0) + 1
            continue
        parse_item(out, spec.family)  # raises with the field name if a mapping is wrong
        converted.append(out)
    logger.info("%s: %d items, skipped %s", name, len(converted), skipped or "none")
    return converted, skipped


# --------------------------------------------------------------------------------------------- input


def _hub_rows(spec: HubSource) -> Iterable[dict]:
    """Rows from the hub: raw JSONL files via huggingface_hub, otherwise the datasets library."""
    if spec.files:
        from huggingface_hub import hf_hub_download

        for filename in spec.files:
            path = hf_hub_download(spec.repo, filename, repo_type="dataset")
            with open(path, encoding="utf-8") as handle:
                yield from (json.loads(line) for line in handle if line.strip())
        return
    try:
        import datasets
    except ImportError as error:
        raise SystemExit(
            "the `datasets` package is needed for hub downloads: pip install datasets"
        ) from error
    configs = datasets.get_dataset_config_names(spec.repo) if spec.config == "*" else [spec.config]
    for config in configs:  # _config / _row name an item when the hub row has no id (MMLU-Redux)
        for row_index, row in enumerate(datasets.load_dataset(spec.repo, config, split=spec.split)):
            yield {**row, "_config": config, "_row": row_index}


def _local_rows(directory: Path, name: str) -> Iterable[dict]:
    path = directory / f"{name}.jsonl"
    with open(path, encoding="utf-8") as handle:
        yield from (json.loads(line) for line in handle if line.strip())


def prepare(
    out_dir: Path, names: list[str], local_dir: Path | None = None, domains: dict[str, str] | None = None
) -> dict:
    """Convert and write the benchmarks; returns the manifest written to ``benchmarks.json``.
    ``domains`` overrides the domain of the benchmarks it names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    domains = domains or {}
    for name in names:
        spec = SOURCES[name]
        rows = _local_rows(local_dir, name) if local_dir else _hub_rows(spec)
        converted, skipped = convert_rows(name, spec, rows)
        filename = name.lower().replace("-", "_") + ".jsonl"
        temporary = out_dir / (filename + ".tmp")
        temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in converted), "utf-8")
        temporary.replace(out_dir / filename)  # never leave a half-written benchmark behind
        manifest[name] = {
            "family": spec.family,
            "domain": domains.get(name) or spec.domain or spec.family,
            "file": filename,
            "source": spec.repo,
            "skipped": skipped,
        }
        if spec.loose:
            manifest[name]["loose"] = True
    (out_dir / "benchmarks.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSONL files")
    parser.add_argument("--only", nargs="+", choices=list(SOURCES), default=list(SOURCES))
    parser.add_argument("--local", type=Path, help="read hub-shaped rows from DIR/<name>.jsonl (offline)")
    parser.add_argument(
        "--domain", type=_domain_override, action="append", default=[], metavar="NAME=DOMAIN",
        help="report benchmark NAME under DOMAIN (repeatable; default: the family, GPQA-D under science)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare(args.out, args.only, args.local, dict(args.domain))
    return 0


def _domain_override(text: str) -> tuple[str, str]:
    """``NAME=DOMAIN`` for ``--domain``: a known benchmark and a non-empty domain."""
    name, _, domain = text.partition("=")
    if name not in SOURCES or not domain.strip() or domain != domain.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DOMAIN, NAME one of {list(SOURCES)}; got {text!r}")
    return name, domain


if __name__ == "__main__":
    raise SystemExit(main())
