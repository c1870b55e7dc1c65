"""Evaluate a Megatron checkpoint on the benchmarks, or compare earlier results (``tropd eval`` as a script).

    python tools/evaluate.py --checkpoint CKPT --tokenizer TOK --benchmarks DIR --k 4 --temperature 0.6 \\
        --max-new-tokens 1024 [--tp 2] [--pp 1] [--cpu-ranks 2] --out results/step200
    python tools/evaluate.py --compare results/base results/step200 --out results/compare

Options: ``--help``, or ``megatron_tropd/eval/command.py``. Needs the package importable (``pip install -e
.`` or ``PYTHONPATH=.``).
"""

from __future__ import annotations

import sys

from megatron_tropd.eval.command import main

if __name__ == "__main__":
    sys.exit(main())
