"""Encoders: the protocol, all-MiniLM-L6-v2, and a persistent embedding cache."""

from cmr.encoders.base import Encoder
from cmr.encoders.cache import CachedEncoder, EmbeddingCache, default_encoder

__all__ = ["Encoder", "CachedEncoder", "EmbeddingCache", "default_encoder"]
