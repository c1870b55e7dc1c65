"""megatron_tropd: Trust-Region On-Policy Distillation (TrOPD) and its baselines on Megatron-Core."""

__version__ = "0.1.0"
