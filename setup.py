"""Packaging for megatron_tropd. Tool settings live in pyproject.toml; CPU pins in constraints-cpu.txt."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# Read the version without importing the package (that would import torch).
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "megatron_tropd" / "__init__.py").read_text(encoding="utf-8"), re.M
).group(1)

setup(
    name="megatron-tropd",
    version=VERSION,
    description="Trust-Region On-Policy Distillation (TrOPD) and its baselines on Megatron-Core",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_tropd", "megatron_tropd.*", "recipes"]),
    package_data={"megatron_tropd.demo": ["*.jsonl"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # 0.16.1 is the newest release for Python 3.11; the code also runs on the 0.17-0.19 of GPU containers.
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "psutil",  # dist-checkpointing's writer processes need it (megatron-core does not declare it)
        "tqdm",  # the loop's progress bar; megatron's inference engines need it too (undeclared)
        "sentencepiece",
        "math-verify",  # eval: symbolic equivalence of math answers (a sympy fallback exists without it)
        "matplotlib",  # eval: the comparison bar chart of write_report
        "nltk",  # eval: IFBench's word tokenizer (and its punkt / POS tagger when their data is installed)
        "syllapy",  # eval: IFBench's syllable counts
        "emoji",  # eval: IFBench's emoji test
        "jinja2",  # data: chat templates
        "tokenizers",  # data: Hugging Face tokenizer.json files
        "safetensors",  # hf: streaming HF checkpoints tensor by tensor
        "xxhash",  # checkpoint: the file manifest's fast content hash (XXH3-128)
        "omegaconf>=2.3",  # config: --config YAML files and flow-style override values
        "pyyaml",  # omegaconf's YAML loader
        "tensorboard",  # logging.tensorboard is on by default; torch.utils.tensorboard needs this package
    ],
    extras_require={
        # nemo-run is in dev too so CI tests the launcher (recipes/launch.py) and its sbatch golden file.
        # transformers: the HF side of the conversion tests and of `tools/convert.py --verify`.
        # lm-eval: so CI runs the lm-eval adapter's tests (tests/test_lm_eval.py); accelerate: lm-eval's
        # own `hf` backend, which the adapter's parity test runs beside it.
        "dev": [
            "pytest",
            "pytest-timeout",
            "ruff",
            "nemo-run==0.11.1",
            "leptonai<0.47",
            "transformers",
            "lm-eval[ifeval]==0.4.13",  # [ifeval]: the IFEval parity tests (tests/test_ifeval.py)
            "accelerate",
        ],
        "convert": ["transformers"],
        # megatron_tropd.eval.lm_eval_adapter: a checkpoint as an lm-evaluation-harness model.
        # [ifeval]: lm-eval's IFEval checkers, which score IFEval ids in the built-in evaluator too.
        "lmeval": ["lm-eval[ifeval]==0.4.13"],
        # Weights & Biases logging (logging.wandb_project); without it a configured project fails at start.
        "wandb": ["wandb"],
        # nemo-run 0.11.1 does not import with leptonai>=0.47 (no leptonai.api.v1).
        "launch": ["nemo-run==0.11.1", "leptonai<0.47"],
        # transformer-engine and NVIDIA apex are not pip-installable here (apex is not on PyPI; the TE
        # metapackage breaks `import megatron.core` without a CUDA build): take both from the NVIDIA
        # PyTorch / NeMo container. The extra exists so `.[gpu]` keeps working as GPU-only pins appear.
        "gpu": [],
    },
    entry_points={"console_scripts": ["tropd = megatron_tropd.cli:main"]},
)
