"""Tiny data folders in both shared formats, written to a temp dir by the bench and loader tests."""

from __future__ import annotations

import json
from pathlib import Path

# CMRBench: 4 models over 2 experiences; every prompt text is distinct (the oracle keys on it)
HUB = [
    {"model": "acme/text-sum-small", "family": "acme", "domain": "Natural Language Processing", "description": "Summarises English news articles.", "experience": 1},
    {"model": "vis/image-cls-base", "family": "vis", "domain": "Computer Vision", "description": "Classifies photos into 1000 categories.", "experience": 1},
    {"model": "acme/text-translate", "family": "acme", "domain": "Natural Language Processing", "description": "Translates English to German.", "experience": 2},
    {"model": "snd/speech-asr", "family": "snd", "domain": "Audio", "description": "Transcribes spoken English audio to text.", "experience": 2},
]

_REQ = {
    1: {
        "train": [
            ("Summarise this news story about the election in two lines.", 0),
            ("Give me a short summary of the article on climate policy.", 0),
            ("What object is in this photo of my kitchen?", 1),
            ("Label the animal shown in the picture.", 1),
        ],
        "test": [
            ("Condense this long report into a paragraph.", 0),
            ("Tell me which category this image belongs to.", 1),
        ],
    },
    2: {
        "train": [
            ("Translate 'good morning' into German.", 2),
            ("Transcribe the recording of the meeting.", 3),
            ("Write a brief summary of the sports news.", 0),
        ],
        "test": [
            ("How do I say 'thank you very much' in German?", 2),
            ("Turn this voice memo into text.", 3),
            ("Summarise the quarterly earnings article.", 0),
        ],
    },
}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_cmrbench(root: Path) -> Path:
    """A 2-experience CMRBench folder under ``root``."""
    _jsonl(root / "hub.jsonl", HUB)
    for k, splits in _REQ.items():
        for split, reqs in splits.items():
            rows = [{"prompt": p, "model": HUB[j]["model"], "family": HUB[j]["family"], "domain": HUB[j]["domain"]} for p, j in reqs]
            _jsonl(root / f"e{k}" / f"{split}.jsonl", rows)
    return root


# outcome matrix: 4 models, 8 train and 4 test prompts
MODELS = ["cheap-small", "mid-coder", "mid-chat", "big-expensive"]
MODEL_COST = [0.001, 0.004, 0.005, 0.02]
PROMPTS = [
    ("tr0", "What is 17 times 23?", "math", "train"),
    ("tr1", "Write a python function that reverses a list.", "code", "train"),
    ("tr2", "Who wrote the play Hamlet?", "qa", "train"),
    ("tr3", "Solve for x: 3x + 5 = 20.", "math", "train"),
    ("tr4", "Implement binary search in Python.", "code", "train"),
    ("tr5", "What is the capital of Australia?", "qa", "train"),
    ("tr6", "Compute the derivative of x^3.", "math", "train"),
    ("tr7", "Write a SQL query that counts rows per user.", "code", "train"),
    ("te0", "What is 144 divided by 12?", "math", "test"),
    ("te1", "Write a function to check if a string is a palindrome.", "code", "test"),
    ("te2", "Which planet is closest to the sun?", "qa", "test"),
    ("te3", "Integrate 2x with respect to x.", "math", "test"),
]
# score per task for each model: big is always right; the coder is right on code; the small
# model only on qa; mid-chat on qa and math
_RIGHT = {
    "cheap-small": {"qa"},
    "mid-coder": {"code"},
    "mid-chat": {"qa", "math"},
    "big-expensive": {"qa", "math", "code"},
}


def write_outcomes(root: Path, with_cost: bool = True, drop: tuple[str, str] | None = ("te2", "mid-chat")) -> Path:
    """An outcome-matrix folder under ``root``; ``drop`` leaves one (prompt, model) pair missing."""
    models = [{"model": m} for m in MODELS]
    _jsonl(root / "models.jsonl", models)
    _jsonl(root / "prompts.jsonl", [{"id": i, "prompt": p, "task": t, "split": s} for i, p, t, s in PROMPTS])
    lines = ["prompt_id,model,score,cost"]
    for pid, _, task, _ in PROMPTS:
        for m, c in zip(MODELS, MODEL_COST):
            if drop is not None and (pid, m) == drop:
                continue
            score = 1.0 if task in _RIGHT[m] else 0.0
            lines.append(f"{pid},{m},{score},{c if with_cost else ''}")
    (root / "outcomes.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_mini_cmrbench(src: Path, out: Path, n_train: int, n_test: int, n_other: int = 20) -> int:
    """A real CMRBench slice in the shared format: experiences 1-2, the first ``n_train`` /
    ``n_test`` requests of each split, the hub cut to the models they name plus ``n_other`` more.
    Returns the number of hub cards written."""
    from cmr.data.io import read_jsonl

    keep: set[str] = set()
    for k in (1, 2):
        (out / f"e{k}").mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            rows = [o for _, o in read_jsonl(src / f"e{k}" / f"{split}.jsonl")][:n]
            keep |= {r["model"] for r in rows}
            (out / f"e{k}" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cards = [o for _, o in read_jsonl(src / "hub.jsonl") if o.get("experience", 1) <= 2]
    chosen = [c for c in cards if c["model"] in keep] + [c for c in cards if c["model"] not in keep][:n_other]
    (out / "hub.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chosen))
    return len(chosen)
