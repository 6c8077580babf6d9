"""Train a policy over the CMRBench experiences in order, writing a checkpoint after each.

    cmr train [--policy auto] --data DIR --out CKPT_ROOT [--ray] [--set key=value ...]

In-process by default; ``--ray`` runs the same loop inside a Ray Train ``TorchTrainer`` (one
CPU worker, local Ray) and reports each checkpoint through ``ray.train.report``. Either way
the checkpoints are versioned folders under ``--out`` that any router can load
(:func:`cmr.checkpoint.load_policy`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from cmr import constants
from cmr.errors import CMRError


class TrainError(CMRError):
    """Bad arguments to ``cmr train``."""


def parse_sets(items: list[str] | None, config_cls=None) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; values parsed as JSON (numbers, true/false) else kept as text.
    With ``config_cls``, unknown keys are an error naming the key."""
    out: dict[str, Any] = {}
    for part in items or []:
        if "=" not in part:
            raise TrainError(f"--set {part!r}: expected key=value")
        k, v = part.split("=", 1)
        k = k.strip()
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    if config_cls is not None:
        names = {f.name for f in fields(config_cls)}
        bad = sorted(set(out) - names)
        if bad:
            raise TrainError(f"--set: unknown option(s) {', '.join(bad)} for {config_cls.__name__}; known: {', '.join(sorted(names))}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="auto", help="registered policy name (default: auto, what the router serves and trains at its first start)")
    p.add_argument("--data", type=Path, default=None, help="CMRBench folder (default: $CMR_DATA/cmrbench)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint root (versions v000001, ... are written under it)")
    p.add_argument("--publish", metavar="STORE", nargs="?", const="", default=None,
                   help="then publish the newest version to a served app's routers: its store's postgresql://… DSN, or its "
                        "state folder's published.sqlite; no value: CMR_STORE (without --publish the routers keep serving "
                        "what is published)")
    p.add_argument("--ray", action="store_true", help="run inside a Ray Train TorchTrainer (1 CPU worker, local Ray)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="policy config options")
    p.add_argument("--config", default=None, metavar="FILE.json", help="policy config as a JSON object, e.g. `cmr tune cmr`'s chosen_config.json (--set wins)")
    from cmr.encoders.cache import ENCODER_BACKENDS

    p.add_argument("--experiences", type=int, default=None, help="train only the first N experiences")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training requests of each experience (smoke runs)")
    p.add_argument("--encoder", choices=ENCODER_BACKENDS, default="torch",
                   help="MiniLM backend that embeds prompts and cards (default torch, exact); a checkpoint a router will serve "
                        "should use the router's (AppArgs.encoder, onnx-int8 by default), whose query vectors it is compared with")
    from cmr.encoders.lexical import EMBEDDINGS

    p.add_argument("--embedding", choices=EMBEDDINGS, default="auto",
                   help="minilm: MiniLM alone; minilm+tfidf: fused with TF-IDF fitted on the trained experiences' prompts and the "
                        "hub's cards, saved in every checkpoint (a router serves it as AppArgs.embedding); auto (default, as the "
                        "router): fused where those texts are enough to fit it, else minilm")


def _train_loop(opts: dict[str, Any], report: Callable[[dict[str, Any], Path], None] | None = None) -> list[dict[str, Any]]:
    """Run the experiences in order through a :class:`Learner`; returns one summary per experience."""
    from cmr.checkpoint import fingerprint_files
    from cmr.continual.hooks import LearnerHooks
    from cmr.continual.learner import Learner
    from cmr.data import load_cmrbench
    from cmr.encoders import default_encoder
    from cmr.policies.registry import make_policy

    data = Path(opts["data"])
    bench = load_cmrbench(data)
    exps = bench.experiences[: opts["experiences"]] if opts.get("experiences") else bench.experiences
    from cmr.encoders.lexical import fit_encoder

    # the lexical part (if any) is fitted once, before the first experience, on every prompt this
    # run trains on and the hub's cards (labels unused), as `cmr bench cmr` and the router do
    fit_texts = [t for e in exps for t in (e.train.texts[: opts["limit"]] if opts.get("limit") else e.train.texts)]
    encoder = fit_encoder(opts.get("embedding") or "auto", default_encoder(backend=opts.get("encoder") or "torch"),
                          fit_texts + [c.text() for c in bench.cards])
    policy = make_policy(opts["policy"], encoder=encoder, config=opts["config"])

    class Progress(LearnerHooks):
        def after_experience(self, exp, metrics):
            print(f"e{exp.k}: trained on {len(exp.train)} requests in {metrics.get('train_seconds', 0):.1f}s", file=sys.stderr, flush=True)

    summaries = []
    learner = Learner(policy, hooks=[Progress()], store=opts["out"])
    for exp in exps:
        if opts.get("limit"):
            exp = type(exp)(exp.k, exp.train.subset(list(range(min(opts["limit"], len(exp.train))))), exp.test)
        exp.train.emb = encoder.encode(exp.train.texts)
        files = [data / "hub.jsonl"] + [data / f"e{e.k}" / "train.jsonl" for e in exps if e.k <= exp.k]
        learner.fingerprint = {**fingerprint_files(files), "limit": opts.get("limit"), "policy": opts["policy"], "encoder": encoder.name}
        policy.add_models(bench.cards_of(exp.k))
        t0 = time.perf_counter()
        ck = learner.train_experience(exp, bench.cards_upto(exp.k))
        s = {"experience": exp.k, "version": ck.version, "path": str(ck.path), "seconds": round(time.perf_counter() - t0, 2)}
        summaries.append(s)
        if report is not None:
            report(s, ck.path)
    return summaries


def _ray_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop: the same loop, each checkpoint reported to Ray Train."""
    import ray.train

    def report(metrics: dict[str, Any], path: Path) -> None:
        ray.train.report({k: v for k, v in metrics.items() if k != "path"}, checkpoint=ray.train.Checkpoint.from_directory(str(path)))

    _train_loop(config, report)


def run_ray(opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Run :func:`_train_loop` in a ``TorchTrainer`` with one CPU worker on a local Ray."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cmr import raycluster

    with raycluster.running(log_to_driver=True):
        storage = Path(opts["out"]).resolve() / "_ray"
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config=opts,
            scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"cmr-train-{opts['policy']}", storage_path=str(storage)),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        return [dict(result.metrics or {}, ray_checkpoint=str(result.checkpoint.path) if result.checkpoint else None)]


def run(args: argparse.Namespace) -> int:
    from cmr.data.cmrbench import is_cmrbench_dir
    from cmr.policies.registry import policy_class

    data = args.data or constants.data_root() / "cmrbench"
    if not is_cmrbench_dir(data):
        raise TrainError(f"--data {data}: not a CMRBench folder (no hub.jsonl)")
    cls = policy_class(args.policy)
    from cmr.bench.common import load_config_file

    config = {**load_config_file(getattr(args, "config", None)), **parse_sets(args.set, cls.Config)}
    try:
        cls.Config.from_dict(config)
    except (TypeError, ValueError) as e:
        raise TrainError(f"--set: {e}") from None
    opts = {
        "policy": args.policy,
        "data": str(Path(data).resolve()),
        "out": str(Path(args.out).resolve()),
        "config": config,
        "experiences": args.experiences,
        "limit": args.limit,
        "encoder": getattr(args, "encoder", "torch"),
        "embedding": getattr(args, "embedding", "auto"),
    }
    summaries = run_ray(opts) if args.ray else _train_loop(opts)
    for s in summaries:
        print(json.dumps(s))
    if getattr(args, "publish", None) is not None:
        from cmr.published import publish_latest

        store = args.publish or constants.store_dsn()
        if not store:
            raise TrainError("--publish: give the app's store (a postgresql://… DSN or its published.sqlite); CMR_STORE is unset")
        pub = publish_latest(opts["out"], store)
        print(json.dumps({"published": pub.version, "uri": pub.uri}))
    return 0
