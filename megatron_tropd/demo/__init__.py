"""The built-in CPU demo: ``tropd demo`` (``megatron_tropd.demo.run``) distils a student on a synthetic
multi-step arithmetic task and writes a report."""
