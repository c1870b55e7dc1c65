"""Unified benchmark evaluation, independent of the model code (pure Python; no torch import).

Pieces, each its own module:

- ``schema``        benchmarks as JSONL data (math / code / instruction / multiple_choice), validated on load.
- ``instructions``  registry of verifiable instruction constraints: the project's own, IFBench's
                    (``ifbench``) and IFEval's (``ifeval``: lm-eval's IFEval checkers, imported on use).
- ``verifiers``     one verdict per (item, response): math (math-verify or sympy), option letters,
                    constraints, code run in the sandbox; a verifier crash is a failed verdict, not a raise.
- ``livecodebench`` LiveCodeBench's grading rules for code: preloaded imports, recursion limit, program
                    wrapping and its stdout comparison.
- ``sandbox``       run an untrusted Python program with rlimits, an unprivileged uid, no network, and
                    writes confined to its own directory.
- ``scoring``       ``evaluate(benchmarks, generate, k, temperature)`` -> ``EvalReport``; avg@k, pass@k;
                    markdown / JSON / PNG reports in the paper's layout.

Modules that import torch and Megatron (not imported here; import them by name):

- ``harness``         ``evaluate_checkpoint(checkpoint, tokenizer, benchmarks_dir, ...)``: a checkpoint
                      on any TP x PP layout (collective over the job's ranks) -> ``EvalReport``.
- ``command``         ``tools/evaluate.py`` / ``tropd eval``: evaluate a checkpoint, or ``--compare`` earlier
                      results.json files side by side.
- ``lm_eval_adapter`` the checkpoint as an lm-evaluation-harness model named ``megatron_tropd`` (the
                      ``lmeval`` extra).

Typical use (``tools/prepare_benchmarks.py --out data/benchmarks`` first)::

    from megatron_tropd.eval.schema import load_benchmarks
    from megatron_tropd.eval.scoring import evaluate, write_report

    benchmarks = load_benchmarks("data/benchmarks")
    report = evaluate(benchmarks, generate, k=32, temperature=0.6, run="tropd-step200")
    write_report([baseline_report, report], "results/")

``generate(prompts, k, temperature) -> list[list[str]]`` is supplied by the caller (the rollout engine).
"""
