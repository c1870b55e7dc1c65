"""Every method of the paper's Table 5 on a miniature of its regime, several seeds, the same budget.

The task and models (``megatron_tropd/fidelity``): a 4,096-token vocabulary with the teacher's top-k
k = 64, a heavy-tailed teacher (an arithmetic chain followed by a reflection of 170-210 Zipf-distributed
"thinking" words: traces of about 209 tokens), and a smaller student SFT'd on a writer whose habits (a
favourite word, skipped steps, slips, guesses) the teacher finds very unlikely. Per seed the teacher and
the student are trained, the regime's figures are measured, each method distils the same student with
the same prompts and budget, and every final student is probed. Writes ``fidelity.json``,
``fidelity.md`` and ``fidelity.png``.

    python bench/fidelity.py                     # 3 seeds x 8 methods on 2 CPU processes
    python bench/fidelity.py --quick --out /tmp/fidelity_quick   # toy sizes (the test)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from megatron_tropd.fidelity.report import write_report
from megatron_tropd.fidelity.study import METHODS, run_study


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes for a fast end-to-end check")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated Table 5 methods")
    parser.add_argument("--work", default="runs/fidelity", help="models and runs (default: runs/fidelity)")
    parser.add_argument("--out", default="bench/results", help="report directory (default: bench/results)")
    parser.add_argument("--fresh", action="store_true", help="delete the work directory first")
    return parser.parse_args(argv)


def _names(text: str, allowed: tuple[str, ...] | None, flag: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise SystemExit(f"{flag}: name at least one")
    if allowed is not None and (unknown := [x for x in names if x not in allowed]):
        raise SystemExit(f"{flag}: unknown {unknown}; choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    methods = _names(args.methods, METHODS, "--methods")
    try:
        seeds = [int(x) for x in _names(args.seeds, None, "--seeds")]
    except ValueError as error:
        raise SystemExit(f"--seeds: integers separated by commas ({error})") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    results = run_study(
        Path(args.work), seeds, methods, quick=args.quick, fresh=args.fresh,
        on_seed=lambda partial: write_report(partial, out),
    )  # fmt: skip
    paths = write_report(results, out)
    print(paths["md"].read_text(encoding="utf-8"))
    logging.getLogger(__name__).info("report: %s", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
