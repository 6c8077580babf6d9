"""Bytes the served learner writes per feedback event: a checkpoint after every step (as before
issue 14 item 7) vs its schedule (``LearnerArgs.checkpoint_every_events`` / ``checkpoint_every_s``).

    python -m bench.learner_checkpoints [--events 300] [--rate 20] [--train-limit 0] [--out FILE.json]

Each mode starts from a fresh served state as ``cmr serve`` first starts it (the default policy,
first-start training on CMRBench, all of it unless ``--train-limit``), then feedback arrives at
``--rate`` events/s and the learner's loop runs as served (``LearnerActor.step(save=False)``
whenever events are waiting, as the ingress nudges it), ending with one last checkpoint of what
is unsaved (all events durable in both modes). Reported per mode: checkpoints written, bytes
written, bytes per event, the size of one checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def run(mode: str, learner_args: dict, events: int, rate: float, train_limit: int, encoder) -> dict:
    from cmr.types import Decision
    from services.config import AppArgs
    from services.learner import LearnerActor
    from services.routing import bootstrap
    from services.store import open_decisions, open_hub

    home = tempfile.mkdtemp(prefix="cmr-ckbench-")
    args = AppArgs(home=home, tiny_models=False, profile_size=0, train_limit=train_limit or None,
                   learner={"enabled": False, "poll_s": 0, **learner_args})
    bootstrap(args, encoder)
    models = [c.id for c, _, _ in open_hub(args).load()]
    store = open_decisions(args)
    learner = LearnerActor(args.to_dict(), encoder=encoder)
    base = learner.checkpoint_bytes
    t0, sent = time.monotonic(), 0
    try:
        while sent < events:
            due = min(events, int((time.monotonic() - t0) * rate) + 1)
            if due > sent:
                qs = [f"Feedback query number {i}: translate this sentence." for i in range(sent, due)]
                ds = [Decision(model=models[i % len(models)], score=0.5, utility=0.5, request_id=f"b{i}") for i in range(sent, due)]
                store.record(ds, qs, encoder.encode(qs), [0.0] * len(ds))
                for i, d in enumerate(ds):
                    store.add_feedback(d.request_id, (sent + i) % 2)
                sent = due
            learner.step(save=False)
            time.sleep(0.01)
        learner.step(save=True)  # the rest made durable: every event in a checkpoint in both modes
        s = learner.status()
    finally:
        learner.stop()
        store.close()
        shutil.rmtree(home, ignore_errors=True)
    written = s["checkpoint_bytes"] - base
    one = written / max(1, s["checkpoints_written"])
    return {"mode": mode, "learner": learner_args, "events": events, "rate_per_s": rate, "seconds": round(time.monotonic() - t0, 1),
            "checkpoints_written": s["checkpoints_written"], "bytes_written": written, "bytes_per_event": round(written / events),
            "checkpoint_bytes": round(one), "offset": s["offset"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300)
    ap.add_argument("--rate", type=float, default=20.0, help="feedback events per second")
    ap.add_argument("--train-limit", type=int, default=0, help="first-start training examples per experience (0: all, as cmr serve)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from cmr.encoders import default_encoder
    from services.config import AppArgs, LearnerArgs

    encoder = default_encoder(backend=AppArgs().encoder)
    d = LearnerArgs()
    rows = [run("per step (before)", {"checkpoint_every_events": 1}, a.events, a.rate, a.train_limit, encoder),
            run("scheduled (defaults)", {"checkpoint_every_events": d.checkpoint_every_events, "checkpoint_every_s": d.checkpoint_every_s},
                a.events, a.rate, a.train_limit, encoder)]
    for r in rows:
        print(f"{r['mode']:>22}: {r['checkpoints_written']:4d} checkpoints of {r['checkpoint_bytes'] / 1e6:.1f} MB, "
              f"{r['bytes_written'] / 1e6:8.1f} MB written, {r['bytes_per_event'] / 1e3:9.1f} kB per event")
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
