"""Convert checkpoints between Hugging Face (safetensors) and Megatron (dist-checkpoint), any TP/PP.

    python tools/convert.py import --hf-dir HF_DIR --out CKPT_DIR [--tp 2] [--pp 2] [--force] [--verify]
    python tools/convert.py export --ckpt-dir CKPT_DIR --out HF_DIR [--dtype bfloat16] [--force] [--verify]

Run as is, it spawns TP x PP local gloo/NCCL ranks itself (export uses one); under ``torchrun`` it uses the
launcher's ranks (a multiple of TP x PP). ``--verify`` runs the HF model (transformers, fp32) and the
Megatron model on the same fixed whole sequences (4 prompts of ``--verify-seq-len`` positions, by default
max_position_embeddings up to 1024: RoPE errors grow with the position), reports the max |logit
difference| and the top-1 agreement, and fails (exit 1) when either side produces a non-finite logit or the
difference exceeds ``--verify-atol``. Bad input is reported before any rank starts (exit 2): paths, the
config (including RoPE scaling Megatron cannot build) and every tensor's name and shape, read from the
safetensors headers. What only the ranks can see (a NaN / inf weight, in the HF tensors as import reads
them or in the Megatron weights as export writes them) is reported once, by rank 0, also with exit 2.
Needs the package importable (``pip install -e .`` or ``PYTHONPATH=.``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger("convert")

DEFAULT_VERIFY_ATOL = 1e-3
"""fp32 on both sides differs by ~1e-6 on the tiny test models; 1e-3 leaves room for deep, wide models."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser("import", help="HF checkpoint -> Megatron weights on a TP x PP layout")
    to_megatron.add_argument("--hf-dir", required=True, help="HF directory: config.json + *.safetensors")
    to_megatron.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert for")
    to_megatron.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert for")
    to_hf = commands.add_parser("export", help="Megatron weights (any layout) -> HF safetensors checkpoint")
    to_hf.add_argument("--ckpt-dir", required=True, help="Megatron weights, a step directory or a run root")
    to_hf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the source's")
    for sub in (to_megatron, to_hf):
        sub.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
        sub.add_argument("--force", action="store_true", help="replace an existing output directory")
        sub.add_argument("--verify", action="store_true", help="compare HF and Megatron logits afterwards")
        sub.add_argument("--verify-atol", type=float, default=DEFAULT_VERIFY_ATOL, help="max |logit diff|")
        sub.add_argument(
            "--verify-seq-len",
            type=int,
            help="positions per verify prompt (default: max_position_embeddings, at most 1024); use the "
            "longest sequence you train or generate at",
        )
    return parser


def _check_inputs(args: argparse.Namespace) -> int:
    """World size of the job; raises ValueError on bad input before any process starts."""
    from megatron_tropd.hf import convert

    if args.verify_seq_len is not None and args.verify_seq_len < 1:
        raise ValueError(f"--verify-seq-len must be >= 1; got {args.verify_seq_len}")
    if args.command == "import":
        convert.check_import_inputs(args.hf_dir, args.out, args.tp, args.pp, args.force)
        return args.tp * args.pp
    convert.check_export_inputs(args.ckpt_dir, args.out, args.force, args.dtype)
    return 1


def _job(args: argparse.Namespace):
    """(per-rank function, its arguments after (rank, world_size))."""
    from megatron_tropd.hf import convert

    verify = (args.verify, args.verify_seq_len)
    if args.command == "import":
        return convert.import_job, (args.hf_dir, args.out, args.tp, args.pp, args.force, *verify)
    return convert.export_job, (args.ckpt_dir, args.out, args.force, args.dtype, *verify)


def _run(args: argparse.Namespace, world_size: int):
    """The job's result (a ``Refusal`` for bad input only the ranks can see): on the torchrun ranks when
    launched so, else on ``world_size`` spawned ranks."""
    from megatron_tropd.hf.convert import refusing_bad_input

    job, job_args = _job(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun / srun
        from megatron_tropd.runtime import init_distributed, shutdown_distributed

        info = init_distributed()
        try:
            return refusing_bad_input(info.rank, info.world_size, job, *job_args)
        finally:
            shutdown_distributed()
    from megatron_tropd.spawn import run_on_ranks

    return run_on_ranks(refusing_bad_input, world_size, job, *job_args)[0]


def _verify_failures(comparison, atol: float) -> list[str]:
    """Why the logits check fails; empty when it passes."""
    failures = [
        f"the {side} model produced {count} non-finite logit(s) (NaN or inf) over "
        f"{comparison.num_positions} positions"
        for side, count in (("HF", comparison.hf_non_finite), ("Megatron", comparison.megatron_non_finite))
        if count
    ]
    if not comparison.max_abs_diff <= atol:  # written so that a NaN difference fails too
        failures.append(f"max |logit diff| {comparison.max_abs_diff:.3g} exceeds --verify-atol {atol:g}")
    return failures


def _report(comparison, atol: float) -> int:
    shape = ""
    if comparison.seq_len:
        shape = f" ({comparison.num_positions // comparison.seq_len} prompts x {comparison.seq_len})"
    print(
        f"max |logit diff| = {comparison.max_abs_diff:.3g} at position {comparison.worst_position} "
        f"(HF logits std {comparison.logits_std:.3g}); top-1 agreement {comparison.top1_agreement:.2%} "
        f"over {comparison.num_positions} positions{shape}"
    )
    failures = _verify_failures(comparison, atol)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0 done (and verified), 1 verification failed, 2 bad input."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        world_size = _check_inputs(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from megatron_tropd.hf.convert import Refusal

    comparison = _run(args, world_size)
    rank = int(os.environ.get("RANK", "0"))
    if isinstance(comparison, Refusal):  # every rank refused the same input: rank 0 reports it
        if rank == 0:
            print(f"error: {comparison.message}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0  # under torchrun every rank returns the same result: rank 0 reports it
    print(f"wrote {args.out}")
    return _report(comparison, args.verify_atol) if comparison is not None else 0


if __name__ == "__main__":
    sys.exit(main())
