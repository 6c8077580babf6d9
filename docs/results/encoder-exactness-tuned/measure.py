"""One-off measurement (issue 15), kept as the record of how result-seed*.json were made: the checkpoint
`cmr train --out CKPT` wrote (default auto, its carve tuning MiniLM), scored on CMRBench test through
each query encoder VARIANTS names (BACKEND:QUERY_TOKENS), as the router runs it: cards and the
lexical part at full length, queries cut. VARIANTS="onnx:256 onnx-int8:64" python measure.py CKPT OUT.json"""
import json
import os
import sys
import time

import numpy as np
from cmr import checkpoint
from cmr.bench import common, metrics
from cmr.bench.cmr_protocol import _route
from cmr.data.cmrbench import load_cmrbench
from cmr.encoders.cache import make_encoder
from cmr.encoders.lexical import dense_part

ck = sys.argv[1]
bench = load_cmrbench(common.resolve_cmrbench_dir(None))
cards = bench.cards_upto(bench.experiences[-1].k)
costs = np.array([c.cost for c in cards])
out = {}
V = [v.split(":") for v in os.environ["VARIANTS"].split()]
for name, backend, qtok in [(f"{b}:{t}", b, int(t)) for b, t in V]:
    t0 = time.time()
    policy = checkpoint.load_policy(ck, encoder=make_encoder(backend))
    enc = policy.encoder
    print(name, enc.name, flush=True)
    policy.add_models(cards)
    qenc = enc
    if qtok:
        d = dense_part(enc)
        qenc = enc.with_dense(d.with_max_tokens(qtok)) if d is not enc else d.with_max_tokens(qtok)
    row = {m: [] for m in "mfd"}
    for e in bench.experiences:
        q = qenc.encode(e.test.texts)
        for m, v in metrics.accuracies(_route(policy, q, cards, costs, 1024), cards, e.test).items():
            row[m].append(v)
    out[name] = {m: float(np.mean(v)) for m, v in row.items()} | {"per_experience": row, "s": time.time() - t0}
    print(name, {m: round(out[name][m], 4) for m in "mfd"}, round(time.time() - t0), "s", flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
