"""Built-in demos that run on a CPU box: ``python -m megatron_tropd.demo.smoke`` (distillation losses)."""
