"""The encoder protocol: texts in, unit-norm float32 embeddings out."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Encoder(Protocol):
    """Turns texts into unit-norm embeddings ``[n, dim]`` (float32); batches internally."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...
