"""The ``transformers`` engine: real generation from a local model folder, CPU or GPU.

``model.generate`` runs in a worker thread and streams through ``AsyncTextIteratorStreamer``,
so the replica's event loop keeps serving other requests while tokens are produced.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from services.pools.base import EngineError, GenChunk, GenRequest, TransformersConfig


class TransformersEngine:
    """A causal LM loaded with ``AutoModelForCausalLM.from_pretrained(config.path)``."""

    def __init__(self, model_id: str, config: TransformersConfig):
        path = config.path
        if not Path(path).is_dir():
            raise EngineError(f"field 'backend.path': model {model_id!r} needs a local model folder, got {path!r}")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = model_id
        self.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_new_tokens = config.max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).to(self.device).eval()
        self._torch = torch

    def _prompt(self, req: GenRequest) -> str:
        if req.messages is not None:
            if self.tokenizer.chat_template:
                return self.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            return "".join(f"{m['role']}: {m['content']}\n" for m in req.messages) + "assistant:"
        return req.prompt or ""

    async def generate(self, request: GenRequest) -> AsyncIterator[GenChunk]:
        from transformers import AsyncTextIteratorStreamer, StoppingCriteria, StoppingCriteriaList

        cancelled = threading.Event()

        class _Cancel(StoppingCriteria):
            # the client went away: stop generating at the next token instead of running to the end
            def __call__(self, input_ids, scores, **kw):
                return cancelled.is_set()

        prompt = self._prompt(request)
        max_new = min(request.max_tokens, self.max_new_tokens)
        enc = self.tokenizer(prompt, return_tensors="pt")
        window = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", None)
        if window and enc["input_ids"].shape[1] + max_new > window:
            # keep the end of an over-long prompt (the latest turn) so prompt + answer fit the
            # model's context window; running past it fails inside the position embeddings
            keep = max(1, window - max_new)
            enc = {k: v[:, -keep:] for k, v in enc.items()}
        enc = {k: v.to(self.device) for k, v in enc.items()}
        n_prompt = int(enc["input_ids"].shape[1])
        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sample = request.temperature > 0
        kwargs = dict(**enc, max_new_tokens=max_new, streamer=streamer, do_sample=sample, pad_token_id=self.tokenizer.pad_token_id,
                      stopping_criteria=StoppingCriteriaList([_Cancel()]))
        if sample:
            kwargs.update(temperature=request.temperature, top_p=request.top_p)
        out: dict[str, Any] = {}
        error: list[BaseException] = []

        def run() -> None:
            try:
                with self._torch.no_grad():
                    if request.seed is not None:
                        self._torch.manual_seed(request.seed)
                    out["ids"] = self.model.generate(**kwargs)
            except BaseException as e:  # surfaced to the caller below
                error.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text = ""
        stopped = False
        try:
            async for piece in streamer:
                if stopped or not piece:
                    continue
                text += piece
                cut = min((i for s in request.stop if (i := text.find(s)) >= 0), default=-1)
                if cut >= 0:
                    piece = piece[: len(piece) - (len(text) - cut)]
                    stopped = True
                    cancelled.set()  # a stop string ends generation now
                if piece:
                    yield GenChunk(text=piece)
        finally:
            # also reached when the consumer stops early (client disconnect closes this generator)
            cancelled.set()
        await asyncio.to_thread(thread.join)
        if error:
            raise error[0]
        n_new = int(out["ids"].shape[1]) - n_prompt
        reason = "stop" if stopped or n_new < max_new else "length"
        yield GenChunk(text="", finish_reason=reason, prompt_tokens=n_prompt, completion_tokens=n_new)

    async def check_health(self) -> None:
        if self.model is None:
            raise EngineError(f"model {self.model_id!r} is not loaded")
