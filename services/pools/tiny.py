"""Two tiny local chat models, created offline at first start, so the chat path runs anywhere.

Each is a randomly initialised GPT-2 (a few hundred thousand parameters) with a byte-level BPE
tokenizer trained with ``tokenizers`` on a small local text (the CMRBench model descriptions,
else a built-in paragraph). They are saved with ``save_pretrained`` and served from their folder
exactly like any real local model; their text is noise, but every step of generation is real.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cmr.data.io import read_jsonl

_FALLBACK_TEXT = (
    "A router sends each request to the model most likely to answer it well at a fair cost. "
    "Models join and leave the hub; the router keeps learning from feedback. "
    "Translate, summarise, classify, detect objects, transcribe speech, answer questions, write code."
)

#: (model id, seed, hidden size, layers): two different models, so routing between them matters
TINY_SPECS = (("tiny-gpt2-a", 0, 64, 2), ("tiny-gpt2-b", 1, 96, 3))
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _corpus(hub_jsonl: Path | None) -> list[str]:
    lines = []
    if hub_jsonl is not None and hub_jsonl.is_file():
        for _, obj in read_jsonl(hub_jsonl):
            if obj.get("description"):
                lines.append(str(obj["description"]))
            if len(lines) >= 2000:
                break
    return lines or [_FALLBACK_TEXT] * 20


def _build(dest: Path, seed: int, hidden: int, layers: int, corpus: list[str]) -> None:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=512, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=hidden, n_layer=layers, n_head=4,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def ensure_tiny_models(root: Path, hub_jsonl: Path | None = None) -> dict[str, Path]:
    """Create the tiny models under ``root`` if missing; returns ``{model id: folder}``.

    Each model is built in a temp folder and moved into place with ``os.replace``, so a crash
    never leaves a half-written model that a later start would load.
    """
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    corpus = None
    for mid, seed, hidden, layers in TINY_SPECS:
        dest = root / mid
        if not (dest / "config.json").is_file():
            corpus = corpus or _corpus(hub_jsonl)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{mid}."))
            try:
                _build(tmp, seed, hidden, layers, corpus)
                (tmp / "cmr_tiny.json").write_text(json.dumps({"id": mid, "seed": seed, "hidden": hidden, "layers": layers}))
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(tmp, dest)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        out[mid] = dest
    return out
