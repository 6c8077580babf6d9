"""Encoders: the protocol, all-MiniLM-L6-v2 (torch or ONNX Runtime), and a persistent embedding cache."""

from cmr.encoders.base import Encoder
from cmr.encoders.cache import ENCODER_BACKENDS, CachedEncoder, EmbeddingCache, MemoryCachedEncoder, default_encoder, make_encoder

__all__ = ["Encoder", "CachedEncoder", "EmbeddingCache", "MemoryCachedEncoder", "ENCODER_BACKENDS", "default_encoder", "make_encoder"]
