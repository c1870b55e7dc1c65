"""Hugging Face <-> Megatron checkpoint conversion: declarative mapping tables (``mapping``) and the
converters with their logits parity check (``convert``, which imports Megatron lazily inside functions)."""

from megatron_tropd.hf.mapping import MAPPINGS, TRANSFORMS, TensorMapping, Transform, mappings_for

__all__ = ["MAPPINGS", "TRANSFORMS", "TensorMapping", "Transform", "mappings_for"]
