"""CARvE-style contrastive continual router over frozen MiniLM features.

After "Continual Model Routing in Evolving Model Hubs" (Bell et al., 2026). The query goes
through a trainable projection (identity-initialised linear map plus an optional residual MLP
adapter) over frozen MiniLM features; every model id has one embedding, initialised from its
card text, so a model that joins is routable before any example. Scores are cosines over a
temperature.

A model's embedding is ``normalize(proj(prototype_m) + offset_m)``: the prototype is the running
(reward-weighted) sum of its card embedding and the queries it was right for, so with an
identity projection the router starts as the card+queries centroid classifier, the strongest
frozen-feature baseline on CMRBench; training learns the projection (and optional offsets)
on top. Positives are scored *leave-one-out*: a training query is taken out of its own
model's prototype, or a model with one or two queries is matched trivially by its own query.

Optionally two levels (``hierarchical=True``), because CMRBench labels carry a domain: a
domain head scores the query against one embedding per domain and the score of model m is
``log p(domain(m) | q) + log p(m | q, domain(m))``. Off by default: on a validation split
carved from the train splits it lost 8 points of D-Acc against the flat softmax. A soft version
(``domain_bonus`` β: each model's logit gains β × the query's cosine to its domain's centroid) is
off by default too: on the same validation split β = 0.3 gave D +0.7 / M −0.6 points and more
forgetting, β = 1 D +0.4 / M −1.3 (``docs/results/limits/``).

``domain_vote`` v (softmax head, off by default) scores a candidate as ``(1 − v)·p(m) + v·P(domain(m))``,
the second term the summed probability of its domain's candidates: the router first settles on the
most probable domain, which a flat argmax often misses when the mass is spread over many sibling
models. On two validation splits carved from CMRBench's train splits, v = 0.3 over the fused
embedding raised D-Acc by 2.0 and 4.5 points with M-Acc −0.5 / +0.3; popularity priors (``prior``,
``domain_prior``: log(1 + positive training rows) added to the logits) and ``card_text="full"``
(family, framework, performance too) did not help (``docs/results/carve-variants/``).

``domain_loss`` / ``family_loss`` (softmax head, training, off by default) add to a labelled row's
loss ``−w · log Σ_{m' ∈ group(m)} p(m')`` for its domain / family (a card without a family is one of
its own): training then asks for the mass the vote scores, not only for the row's single model,
which has one to three training rows on most hubs of many sibling models. Chosen on three
validation splits of CMRBench's train splits (``docs/results/carve-domain-loss/``).

Scoring (no gradients) reuses every model's projected embedding until a training step, an absorbed
query or a new model changes it: a routed request does not re-project the whole hub.

Training is InfoNCE over the positive
model against negatives: the full live hub when it is small enough (every hard negative, at
its true weight), otherwise mined hard negatives (nearest wrong models, re-mined every few
epochs), same-domain negatives and random far negatives. Optionally (``card_examples``) the
card text of every live model (id words, domain, description, api_call) is also a training
example for its own model; off by default (it lowered validation D-Acc by 3 points).

Carve is trained by :class:`cmr.continual.learner.Learner` (it implements ``Trainable``); its
config names the learner's parts: a domain-stratified coreset replay buffer (``replay`` =
fraction of the data seen) and anchoring to the parameters after the previous experience
(``anchor`` = strength). ``joint=True`` is the upper reference: keep everything seen and
retrain from the cards.

On outcome matrices (``Examples.labels is None``: several models can be right) the head
becomes per-model sigmoids ``σ(s·cos + b_m)`` trained by binary cross-entropy on the known
scores, so ``score`` is a predicted quality that ``decide`` can trade against cost.

``online_step`` is the online path: a fixed number of gradient steps on the events plus a
fixed-size replay sample, with anchoring — bounded cost per event. A reward-1 event pulls the
query towards the chosen model (InfoNCE); a reward-0 event pushes it away (−log(1 − p)).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Literal, Sequence

import numpy as np

from cmr.continual.anchoring import Anchor, AnchorConfig
from cmr.continual.replay import CoresetBuffer, Interactions, Replay, ReservoirBuffer
from cmr.data.examples import Examples
from cmr.errors import CMRError
from cmr.policies.base import Count, Fraction, NonNegative, PolicyConfig, Positive, RoutingPolicy, Size, config_dataclass
from cmr.types import FeedbackEvent, ModelCard

_ID_SPLIT = re.compile(r"[/_\-.:]+")
_NO_DOMAIN = ""
_LEARNER_ONLY = "policy 'carve' is trained through cmr.continual.learner.Learner(policy): .fit(data, cards) / .consume(events)"


@config_dataclass
class CarveConfig(PolicyConfig):
    """Options of the contrastive continual router (``--set key=value``)."""

    # model
    adapter_hidden: Size = 0  # 0 = linear projection only; >0 = residual MLP adapter width
    temperature: Positive = 0.05
    hierarchical: bool = False  # domain head + model-within-domain head (worse on validation)
    domain_weight: NonNegative = 1.0  # weight of the domain loss (training) and of log p(domain) (scoring)
    # soft domain smoothing (flat head): each model's logit gains domain_bonus × the query's cosine
    # to its domain's centroid (mean of the candidates' embeddings in that domain), in training
    # and scoring alike; 0 = off
    domain_bonus: NonNegative = 0.0
    sigmoid_lr: Positive = 3e-3  # learning rate of the sigmoid (outcome-matrix) head
    head: Literal["auto", "softmax", "sigmoid"] = "auto"  # "softmax" (one right model), "sigmoid" (outcome matrices), "auto": from the data
    # training
    epochs: Size = 5
    batch_size: Count = 256
    lr: Positive = 3e-4
    weight_decay: NonNegative = 0.0
    full_softmax_max: Count = 20_000  # more live models than this -> sampled negatives
    negatives: Literal["auto", "full", "sampled"] = "auto"  # "full", "sampled", "auto" (full up to full_softmax_max)
    n_hard: Size = 16
    n_domain: Size = 8
    n_random: Size = 16
    remine_every: Count = 5  # epochs between hard-negative re-mining
    offsets: bool = False  # learn a per-model offset on top of the projected prototype (worse on validation)
    offset_decay: NonNegative = 0.0  # L2 pull of the offsets towards 0 (the prototype)
    leave_one_out: bool = True  # a training row is left out of its model's prototype
    proto_card_weight: NonNegative = 1.0  # weight of the card in a model's prototype (queries weigh 1)
    card_examples: bool = False  # card text of every live model is a training example for it
    card_weight: NonNegative = 0.5
    card_text: Literal["rich", "plain", "full"] = "rich"  # "rich": + api_call; "plain": ModelCard.text(); "full": rich + family, framework, performance
    # popularity priors at scoring: each model's logit gains prior × log(1 + its positive training
    # rows) and domain_prior × log(1 + its domain's); 0 = off
    prior: NonNegative = 0.0
    domain_prior: NonNegative = 0.0
    # softmax head: a candidate's score is (1 - domain_vote) × its probability + domain_vote × the
    # summed probability of the candidates of its domain (the top model of the most probable
    # domain wins as domain_vote → 1); 0 = off
    domain_vote: Fraction = 0.0
    # softmax head, training: each labelled row's loss also asks for its domain's summed
    # probability, −domain_loss · log Σ_{m ∈ domain} p(m) (what the vote scores); 0 = off
    domain_loss: NonNegative = 0.0
    # the same for the row's family (a card without one is a family of its own); 0 = off
    family_loss: NonNegative = 0.0
    # encoder: epochs of contrastive fine-tuning of the dense encoder on (request, target card)
    # pairs at each labelled experience (its rows and the replayed ones), before the head trains;
    # 0 = frozen features (``cmr.encoders.tuned``)
    encoder_epochs: Size = 0
    encoder_lr: Positive = 2e-5
    # continual
    replay: Fraction = 0.2  # coreset budget as a fraction of the data seen (0 = no replay)
    replay_cap: Count = 4  # coreset rows per model at most
    # anchoring strength on the per-model tables: offsets, domain rows, biases (0 = none); offline
    # the softmax head trains them only with ``offsets`` or ``hierarchical``, so by default it acts
    # on the online path and the sigmoid head
    anchor: NonNegative = 1.0
    anchor_dense: NonNegative = 0.1  # anchoring strength on the projection (validated: 1 and 10 cost plasticity)
    joint: bool = False  # upper reference: keep all data, retrain from the cards each experience
    # online
    online_steps: Size = 1
    online_replay: Size = 32  # replay rows mixed into each online step
    online_lr: Positive = 5e-4
    # the online path also moves per-model offsets: a reward-0 event must be able to push one
    # model away from a query without moving the shared projection for every other model
    online_offsets: bool = True
    online_capacity: Count = 5_000  # reservoir of past events
    # small matrices: one intra-op thread is many times faster than several on a shared CPU
    # (thread spinning); 0 = leave torch's setting alone
    torch_threads: Size = 1


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run a block with ``n`` torch intra-op threads, restoring the previous setting after."""
    import torch

    if n <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class CarvePolicy(RoutingPolicy):
    """CARvE-style contrastive continual router (projection + per-model embeddings, replay, anchoring)."""

    name = "carve"
    needs_encoder = True
    Config = CarveConfig

    def __init__(self, encoder=None, config=None):
        super().__init__(encoder, config)
        c: CarveConfig = self.config
        self._mode: str | None = None if c.head == "auto" else c.head
        self._models: list[str] = []
        self._row: dict[str, int] = {}
        self._model_domain: list[str] = []
        self._model_family: list[str] = []
        self._domains: list[str] = []
        self._drow: dict[str, int] = {}
        self._doc_emb: dict[str, np.ndarray] = {}
        # with encoder tuning: the texts behind the embeddings, to embed them again when the
        # encoder changes (card docs by model; absorbed queries as (row, text, weight))
        self._doc_text: dict[str, str] = {}
        self._absorbed: list[tuple[int, str, float]] = []
        self._proto = np.zeros((0, 0), np.float32)  # per-model prototype sums (raw feature space)
        self._count = np.zeros(0, np.float64)  # per-model positive training weight absorbed (the priors)
        self._bias_done: set[str] = set()  # sigmoid head: models whose bias was initialised
        self._params: dict[str, Any] | None = None  # torch tensors, built lazily
        self._live: list[str] = []
        self._hard: np.ndarray | None = None
        self._epoch_items: Interactions | None = None
        # every model's embedding, for scoring without gradients: a routed query would otherwise
        # re-project every prototype; dropped whenever the parameters or prototypes change
        self._emb_cache = None

    # ---------------------------------------------------------------- structure
    def continual_parts(self) -> tuple[Replay, Anchor | None]:
        """The learner's replay (coreset of the experiences, reservoir of the events) and anchor."""
        c: CarveConfig = self.config
        if c.joint:  # keeps everything, nothing anchored
            kept = ReservoirBuffer(capacity=10_000_000, seed=c.seed)
        else:
            kept = CoresetBuffer(fraction=c.replay, per_model_cap=c.replay_cap, seed=c.seed)
        replay = Replay(kept, ReservoirBuffer(capacity=c.online_capacity, seed=c.seed), c.online_replay)
        anchored = not c.joint and (c.anchor > 0 or c.anchor_dense > 0)
        return replay, Anchor(AnchorConfig(c.anchor, c.anchor_dense)) if anchored else None

    def _card_doc(self, card: ModelCard) -> str:
        if self.config.card_text == "plain":
            return card.text()
        words = " ".join(w for w in _ID_SPLIT.split(card.id) if w)
        api = str(card.metadata.get("api_call") or "")
        parts = [words, card.domain or "", card.description or "", api]
        if self.config.card_text == "full":
            parts += [card.family or "", str(card.metadata.get("framework") or ""), str(card.metadata.get("performance") or "")]
        return ". ".join(p.strip() for p in parts if p and p.strip())

    def _doc_embeddings(self, cards: Sequence[ModelCard]) -> np.ndarray:
        new = [c for c in cards if c.id not in self._doc_emb]
        if new:
            if self.encoder is None:
                raise RuntimeError("policy 'carve' needs an encoder to embed model cards")
            docs = [self._card_doc(c) for c in new]
            for c, d, v in zip(new, docs, self.encoder.encode(docs)):
                self._doc_emb[c.id] = np.asarray(v, np.float32)
                if self.config.encoder_epochs:
                    self._doc_text[c.id] = d
        return np.stack([self._doc_emb[c.id] for c in cards]) if cards else np.zeros((0, 0), np.float32)

    def _dim(self) -> int:
        if self._params is not None:
            return int(self._params["E"].shape[1])
        if self.encoder is not None:
            return int(self.encoder.dim)
        raise RuntimeError("policy 'carve' needs an encoder (or a loaded state) to know its dimension")

    def _init_params(self, dim: int) -> None:
        import torch

        g = torch.Generator().manual_seed(self.config.seed)
        p: dict[str, Any] = {
            "W": torch.eye(dim),
            "b": torch.zeros(dim),
            "E": torch.zeros((0, dim)),
            "D": torch.zeros((0, dim)),
            "bias": torch.zeros(0),
            "scale": torch.tensor(1.0 / self.config.temperature),
            # sigmoid head: quality logit = sig_a·cos + bias_m; sig_a starts at 0, so before any
            # query-dependent signal is learnt the head predicts each model's mean quality
            "sig_a": torch.tensor(0.0),
        }
        h = self.config.adapter_hidden
        if h > 0:
            # residual adapter starts as zero (second layer zero): routing starts from the cards
            p["A1"] = torch.randn((h, dim), generator=g) * (1.0 / dim) ** 0.5
            p["a1"] = torch.zeros(h)
            p["A2"] = torch.zeros((dim, h))
        for v in p.values():
            v.requires_grad_(True)
        self._params = p

    def add_models(self, cards: Sequence[ModelCard]) -> None:
        """New models get an embedding row initialised from their card (routable at once); new
        domains a row initialised from the mean of their cards."""
        import torch

        super().add_models(cards)
        new = [c for c in cards if c.id not in self._row]
        if not new:
            return
        if self._params is None:
            self._init_params(self._dim())
        emb = self._doc_embeddings(new)
        self._emb_cache = None
        new_doms: dict[str, list[int]] = {}
        for i, c in enumerate(new):
            d = c.domain or _NO_DOMAIN
            if d not in self._drow:
                new_doms.setdefault(d, []).append(i)
            self._row[c.id] = len(self._models)
            self._models.append(c.id)
            self._model_domain.append(d)
            self._model_family.append(c.family or "")
        p = self._params
        with torch.no_grad():
            # embeddings live in projected space: map the card through the current projection
            # so a late joiner lands where current queries of its kind land
            e = self._project(torch.from_numpy(emb), p).detach()
            rows = [e.mean(0) if not ix else torch.nn.functional.normalize(e[ix].mean(0), dim=0) for ix in new_doms.values()]
            for d in new_doms:
                self._drow[d] = len(self._domains)
                self._domains.append(d)
            # the model's embedding is proj(prototype) + a learnt offset (zero at first): the
            # prototype is the running mean of its card and its positive queries, so a model
            # with data starts at the centroid classifier and one without at its card
            p["E"] = torch.cat([p["E"].detach(), torch.zeros_like(e)]).requires_grad_(True)
            self._proto = np.concatenate([self._proto, self.config.proto_card_weight * emb]) if len(self._proto) else self.config.proto_card_weight * emb
            p["bias"] = torch.cat([p["bias"].detach(), torch.zeros(len(new))]).requires_grad_(True)
            self._count = np.concatenate([self._count, np.zeros(len(new))])
            if rows:
                p["D"] = torch.cat([p["D"].detach(), torch.stack(rows)]).requires_grad_(True)

    # ---------------------------------------------------------------- forward
    @staticmethod
    def _project(x, p):
        import torch

        z = x @ p["W"].T + p["b"]
        if "A1" in p:
            z = z + torch.relu(x @ p["A1"].T + p["a1"]) @ p["A2"].T
        return torch.nn.functional.normalize(z, dim=-1)

    def _logits(self, z, rows, p):
        """Cosine logits of projected queries ``z`` against model rows ``rows`` (``[n_c]`` or ``[B, K]``)."""
        import torch

        e = self._model_emb(rows, p)
        if e.dim() == 2:
            return p["scale"] * (z @ e.T)
        return p["scale"] * torch.einsum("bd,bkd->bk", z, e)

    def _model_emb(self, rows, p):
        """Unit model embeddings in projected space: ``normalize(proj(prototype) + offset)``."""
        import torch

        flat = rows.reshape(-1)
        if not torch.is_grad_enabled():
            if self._emb_cache is None or len(self._emb_cache) != len(self._models):
                self._emb_cache = self._model_emb_of(torch.arange(len(self._models)), p)
            # the router scores every query against the same candidate rows: gather them once per
            # cache (the gather of the whole hub's embeddings was most of a query's scoring time)
            memo = self.__dict__.get("_gather_memo")
            if memo is not None and memo[0] is rows and memo[1] is self._emb_cache:
                return memo[2]
            out = self._emb_cache[flat].reshape(*rows.shape, -1)
            self._gather_memo = (rows, self._emb_cache, out)
            return out
        return self._model_emb_of(flat, p).reshape(*rows.shape, -1)

    def _model_emb_of(self, flat, p):
        import torch

        proto = torch.from_numpy(self._proto[flat.numpy()])
        e = self._project(torch.nn.functional.normalize(proto, dim=-1), p) + p["E"][flat]
        return torch.nn.functional.normalize(e, dim=-1)

    def model_embeddings(self, ids: Sequence[str]) -> np.ndarray:
        """Current unit embeddings ``[n, d]`` of known models (projected space)."""
        import torch

        with torch.no_grad():
            return self._model_emb(torch.as_tensor([self._row[m] for m in ids], dtype=torch.long), self._params).numpy()

    def absorb(self, items: Interactions, keep_text: bool = False) -> None:
        """Add positive queries to their models' prototypes (reward-weighted sums); ``keep_text``
        (a labelled experience's rows, with encoder tuning on): keep their texts, to embed them
        again when the encoder changes. Feedback events' texts are not kept (unbounded); their part
        of a prototype is dropped at the next tuning (the event reservoir still replays some)."""
        keep = np.array([m in self._row for m in items.model], dtype=bool)
        if not keep.any():
            return
        rows = np.array([self._row[m] for m, k in zip(items.model, keep) if k], dtype=np.int64)
        w = (items.reward * items.weight)[keep]
        np.add.at(self._proto, rows, items.emb[keep] * w[:, None])
        self._emb_cache = None
        np.add.at(self._count, rows, np.maximum(w, 0.0))
        if keep_text and self.config.encoder_epochs:
            texts = [t for t, k in zip(items.text, keep) if k]
            self._absorbed += [(int(r), t, float(x)) for r, t, x in zip(rows, texts, w) if t]

    # ---------------------------------------------------------------- encoder tuning
    def tune_encoder(self, data: Examples, held: Interactions | None, cards: Sequence[ModelCard]) -> bool:
        """Fine-tune the dense encoder on (request, target card) pairs of the labelled ``data`` and
        the ``held`` (replayed) rows, then embed the cards and absorbed queries again; True when the
        encoder changed (the learner then embeds its rows again). Off with ``encoder_epochs`` 0."""
        from cmr.encoders.lexical import dense_part
        from cmr.encoders.tuned import TunedMiniLMEncoder

        c: CarveConfig = self.config
        if not c.encoder_epochs or data.labels is None or self.encoder is None:
            return False
        doc = {card.id: self._card_doc(card) for card in cards}
        pairs = [(t, data.model_ids[j]) for t, j in zip(data.texts, data.labels) if j >= 0]
        if held is not None:
            pairs += [(t, m) for t, m, r in zip(held.text, held.model, held.reward) if t and r > 0]
        pairs = [(t, doc[m]) for t, m in pairs if m in doc]
        if len(pairs) < 2:
            return False
        dense = dense_part(self.encoder)
        inner = getattr(dense, "inner", dense)
        if not isinstance(dense, TunedMiniLMEncoder):
            # tuned in place from here on: an uncached copy (a cache names its vectors by the encoder's
            # name at wrapping time); the packaged weights, or the tuned ones this policy was restored with
            if getattr(inner, "digest", None) and not isinstance(inner, TunedMiniLMEncoder):
                raise CMRError(f"carve encoder_epochs: encoder {inner.name} holds tuned weights this backend cannot train "
                               "(train with encoder backend 'torch')")
            dense = TunedMiniLMEncoder.from_state(inner.tuned_state()) if isinstance(inner, TunedMiniLMEncoder) else TunedMiniLMEncoder()
            self.encoder = self.encoder.with_dense(dense) if hasattr(self.encoder, "with_dense") else dense
        # torch's own thread count: the whole network trains here, not carve's small matrices
        dense.tune([q for q, _ in pairs], [d for _, d in pairs], epochs=c.encoder_epochs, lr=c.encoder_lr, seed=c.seed + len(self._absorbed))
        self._reembed()
        return True

    def _reembed(self) -> None:
        """Card docs and absorbed queries through the (changed) encoder: prototypes rebuilt."""
        ids = [m for m in self._models if m in self._doc_text]
        if ids:
            for m, v in zip(ids, self.encoder.encode([self._doc_text[m] for m in ids])):
                self._doc_emb[m] = np.asarray(v, np.float32)
        proto = np.zeros_like(self._proto)
        for i, m in enumerate(self._models):
            if m in self._doc_emb:
                proto[i] = self.config.proto_card_weight * self._doc_emb[m]
        if self._absorbed:
            rows = np.array([r for r, _, _ in self._absorbed], np.int64)
            w = np.array([x for _, _, x in self._absorbed], np.float32)
            np.add.at(proto, rows, self.encoder.encode([t for _, t, _ in self._absorbed]) * w[:, None])
        self._proto = proto.astype(np.float32)
        self._emb_cache = None
        self._hard = None

    def _domain_logp(self, z, p):
        import torch

        d = torch.nn.functional.normalize(p["D"], dim=-1)
        return torch.log_softmax(p["scale"] * (z @ d.T), dim=-1)

    @staticmethod
    def _group_logsumexp(logits, groups, n_groups):
        """Per-row logsumexp of ``logits [B, C]`` within each group (``groups [C]`` or ``[B, C]``) -> ``[B, G]``."""
        import torch

        idx = groups if groups.dim() == 2 else groups.unsqueeze(0).expand_as(logits)
        gmax = torch.full((logits.shape[0], n_groups), -torch.inf, dtype=logits.dtype)
        gmax = gmax.scatter_reduce(1, idx, logits.detach(), reduce="amax", include_self=True)
        ex = torch.exp(logits - gmax.gather(1, idx))
        s = torch.zeros((logits.shape[0], n_groups), dtype=logits.dtype).scatter_add(1, idx, ex)
        return torch.log(s.clamp_min(1e-30)) + torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))

    def _log_scores(self, z, rows, p, logits=None):
        """log-probability of each model in ``rows`` (full candidate set ``[C]``) for queries ``z``."""
        import torch

        if logits is None:
            logits = self._logits(z, rows, p)
        if self.config.domain_bonus > 0 and len(self._domains):
            logits = logits + self._domain_bonus(z, rows, p)
        if not self.config.hierarchical:
            return torch.log_softmax(logits, dim=-1)
        dom = self._mdom()[rows]
        # within-domain normalisation over the candidates, plus the domain head
        lse = self._group_logsumexp(logits, dom, len(self._domains))
        within = logits - lse.gather(1, dom.unsqueeze(0).expand_as(logits))
        return within + self.config.domain_weight * self._domain_logp(z, p)[:, dom]

    def _domain_bonus(self, z, rows, p):
        """``domain_bonus · scale · cos(z, centroid of the candidates of domain(m))`` per model
        ``[B, C]``: a model with one or two queries borrows evidence from its domain's others."""
        import torch

        e = self._model_emb(rows, p)
        dom = self._mdom()[rows]
        cent = torch.zeros((len(self._domains), e.shape[1]), dtype=e.dtype).index_add(0, dom, e)
        cent = torch.nn.functional.normalize(cent, dim=-1)
        return self.config.domain_bonus * p["scale"] * (z @ cent.T)[:, dom]

    def _mdom(self):
        """Domain row of every model row (a tensor, rebuilt only when the tables grew)."""
        import torch

        if getattr(self, "_mdom_cache", None) is None or len(self._mdom_cache) != len(self._models):
            self._mdom_cache = torch.as_tensor([self._drow[d] for d in self._model_domain], dtype=torch.long)
        return self._mdom_cache

    def _mfam(self):
        """Family row of every model row (a tensor, rebuilt only when the tables grew) and the
        number of families; a model without a family ("") is a family of its own."""
        import torch

        if getattr(self, "_mfam_cache", None) is None or len(self._mfam_cache[0]) != len(self._models):
            ix: dict[object, int] = {}
            rows = [ix.setdefault(f or i, len(ix)) for i, f in enumerate(self._model_family)]
            self._mfam_cache = (torch.as_tensor(rows, dtype=torch.long), len(ix))
        return self._mfam_cache

    # ---------------------------------------------------------------- scoring
    def score(self, q: np.ndarray, candidates: Sequence[ModelCard], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """Softmax head: probability of each candidate being the right model (over the candidate
        set). Sigmoid head: predicted quality of each candidate. Unknown candidates are embedded
        from their card first."""
        import torch

        q = np.asarray(q, np.float32)
        if q.ndim == 1:
            q = q[None]
        if not candidates:
            return np.zeros((len(q), 0), np.float32)
        rows = self._candidate_rows(candidates)
        p = self._params
        prior = self._prior(rows.numpy())
        out = []
        with torch.no_grad():
            for i in range(0, len(q), 1024):
                z = self._project(torch.from_numpy(q[i : i + 1024]), p)
                if self._mode == "sigmoid":
                    s = torch.sigmoid(self._sig_logit(z, rows, p))
                else:
                    lg = self._logits(z, rows, p)
                    if prior is not None:
                        lg = lg + prior
                    s = torch.exp(self._log_scores(z, rows, p, lg))
                    if self.config.domain_vote > 0:
                        s = self._vote(s, rows)
                out.append(s.numpy().astype(np.float32))
        return np.concatenate(out)

    def _candidate_rows(self, candidates: Sequence[ModelCard]):
        """Model row of each candidate (unknown ones added from their cards first). Memoised for
        the router's card tuple (one per hub version) while the model table is the same object
        and length (it only appends; a load replaces it): not a Python loop over every model per query."""
        import torch

        memo = self.__dict__.get("_rows_memo")
        if memo is not None and memo[0] is candidates and memo[1] is self._row and memo[2] == len(self._models):
            return memo[3]
        if any(c.id not in self._row for c in candidates):
            self.add_models([c for c in candidates if c.id not in self._row])
        rows = torch.as_tensor([self._row[c.id] for c in candidates], dtype=torch.long)
        if isinstance(candidates, tuple):
            self._rows_memo = (candidates, self._row, len(self._models), rows)
        return rows

    def _vote(self, s, rows):
        """``(1 - v)·p(m) + v·Σ_{m' in domain(m)} p(m')`` over the candidates (``s [B, C]``)."""
        import torch

        v = self.config.domain_vote
        dom = self._mdom()[rows]
        mass = torch.zeros((s.shape[0], len(self._domains)), dtype=s.dtype).index_add(1, dom, s)
        return (1 - v) * s + v * mass[:, dom]

    def _prior(self, rows: np.ndarray):
        """Popularity log-prior per candidate row ``[C]`` (None when both priors are off)."""
        import torch

        c: CarveConfig = self.config
        if c.prior <= 0 and c.domain_prior <= 0:
            return None
        n = self._count[rows] if len(self._count) == len(self._models) else np.zeros(len(rows))
        out = c.prior * np.log1p(n)
        if c.domain_prior > 0:
            dom = self._mdom().numpy()
            per_dom = np.bincount(dom, weights=self._count if len(self._count) == len(self._models) else None, minlength=len(self._domains))
            out = out + c.domain_prior * np.log1p(per_dom[dom[rows]])
        return torch.from_numpy(out.astype(np.float32))

    def _sig_cos(self, z, rows, p):
        return self._logits(z, rows, p) / p["scale"]

    def _sig_logit(self, z, rows, p):
        """Sigmoid head logits: ``sig_a · cos + bias`` (rows ``[C]`` or ``[B, K]``)."""
        return p["sig_a"] * self._sig_cos(z, rows, p) + p["bias"][rows]

    # ---------------------------------------------------------------- training (Learner's Trainable)
    def interactions(self, data: Examples) -> Interactions:
        """The training triples of a batch of labelled data."""
        if self._mode is None:
            self._mode = "softmax" if data.labels is not None else "sigmoid"
        return Interactions.from_examples(data)

    def anchored(self) -> tuple[dict[str, Any], set[str]]:
        """The parameters the anchor holds (the per-model tables row-wise)."""
        return ({} if self._params is None else self._trainable(online=True)), {"E", "D", "bias"}

    def begin_experience(self, cards: Sequence[ModelCard] | None, new: Interactions | None = None) -> None:
        """Add the live models (None: keep them), fold ``new`` into the prototypes (or, for
        ``joint``, reset the parameters)."""
        c: CarveConfig = self.config
        if c.joint and self._params is not None:
            # upper reference: forget the parameters, keep the data, restart from the cards
            known = [ModelCard(id=m, domain=d or None, family=f or None)
                     for m, d, f in zip(self._models, self._model_domain, self._model_family)]
            docs = dict(self._doc_emb)
            proto, count = self._proto, self._count
            self._params, self._models, self._row, self._model_domain, self._model_family = None, [], {}, [], []
            self._proto, self._count = np.zeros((0, 0), np.float32), np.zeros(0, np.float64)
            self._domains, self._drow = [], {}
            self._doc_emb = docs
            self._mdom_cache = self._mfam_cache = None
            self.add_models(known)
            self._proto, self._count = proto, count
        if cards is not None:
            self.add_models(cards)
            self._live = [card.id for card in cards]
        if new is not None and len(new):
            self.absorb(new, keep_text=True)
            if self._mode == "sigmoid":
                self._init_bias(new)
        self._hard = None
        self._opt = None
        self._emb_cache = None

    def _init_bias(self, new: Interactions) -> None:
        """Sigmoid head: a model met for the first time starts at its mean measured quality
        (bias = logit of it), so scores are calibrated before the first gradient step."""
        import torch

        p = self._params
        fresh = [m not in self._bias_done and m in self._row for m in new.model]
        if not any(fresh):
            return
        sub = new.subset(np.asarray(fresh))
        rows = torch.as_tensor([self._row[m] for m in sub.model], dtype=torch.long)
        with torch.no_grad():
            z = self._project(torch.from_numpy(sub.emb), p)
            cos_term = (p["sig_a"] * self._sig_cos(z, rows.unsqueeze(1), p)[:, 0]).numpy()
            uniq, inv = np.unique(rows.numpy(), return_inverse=True)
            n = np.bincount(inv).astype(np.float64)
            mean = np.clip(np.bincount(inv, weights=sub.reward) / n, 0.02, 0.98)
            # the bias that makes the mean logit on the model's rows equal logit(mean quality)
            bias = np.log(mean / (1 - mean)) - np.bincount(inv, weights=cos_term) / n
            p["bias"][torch.from_numpy(uniq)] = torch.from_numpy(bias.astype(np.float32))
        self._bias_done.update(self._models[r] for r in uniq)

    def _trainable(self, online: bool = False) -> dict[str, Any]:
        if self._mode == "sigmoid":
            # every model is right on most prompts, so prototypes barely differ: the per-model
            # offsets carry the query dependence
            return {k: v for k, v in self._params.items() if k != "scale"}
        skip = {"scale", "sig_a"}
        if not self.config.offsets and not (online and self.config.online_offsets):
            skip.add("E")
        return {k: v for k, v in self._params.items() if k not in skip}

    def _card_items(self) -> Interactions:
        if not self.config.card_examples or self._mode != "softmax" or not self._live:
            return Interactions.empty(self._dim())
        emb = np.stack([self._doc_emb[m] for m in self._live])
        dom = [self._model_domain[self._row[m]] for m in self._live]
        return Interactions(emb, list(self._live), np.ones(len(self._live), np.float32), dom,
                            weight=np.full(len(self._live), self.config.card_weight, np.float32))

    def train_epoch(self, items: Interactions, epoch: int, rng: np.random.Generator, penalty=None) -> dict[str, float]:
        """One pass over ``items`` (new data + replay) plus the card examples, in ``rng``'s order;
        ``penalty(params)`` (the anchor) joins every batch's loss."""
        self._emb_cache = None
        try:
            with _torch_threads(self.config.torch_threads):
                return self._train_epoch(items, epoch, rng, penalty)
        finally:
            self._emb_cache = None

    def _train_epoch(self, items: Interactions, epoch: int, rng: np.random.Generator, penalty) -> dict[str, float]:
        import torch

        c: CarveConfig = self.config
        if epoch == 0 or self._epoch_items is None or self._epoch_items is not items:
            self._epoch_all = Interactions.concat([items, self._card_items()])
            self._epoch_items = items
            # what each row contributed to its model's prototype: data rows were absorbed with
            # their reward, card rows are the card part of the prototype
            loo = np.concatenate([items.reward * items.weight, np.full(len(self._epoch_all) - len(items), c.proto_card_weight, np.float32)])
            known = np.array([m in self._row for m in self._epoch_all.model])
            self._epoch_all = self._epoch_all.subset(known)
            self._epoch_loo = loo[known].astype(np.float32)
        data = self._epoch_all
        if len(data) == 0:
            return {"loss": 0.0, "n": 0}
        if self._opt is None:
            lr = c.sigmoid_lr if self._mode == "sigmoid" else c.lr
            self._opt = torch.optim.Adam(list(self._trainable().values()), lr=lr, weight_decay=c.weight_decay)
        sampled = self._use_sampled()
        if sampled and (self._hard is None or epoch % max(1, c.remine_every) == 0):
            self._hard = self._mine_hard(data)
        order = rng.permutation(len(data))
        tot, nb = 0.0, 0
        x_all = torch.from_numpy(data.emb)
        pos_all = torch.as_tensor([self._row[m] for m in data.model], dtype=torch.long)
        for s in range(0, len(order), c.batch_size):
            idx = order[s : s + c.batch_size]
            loss = self._loss(x_all[idx], pos_all[idx], torch.from_numpy(data.reward[idx]),
                              torch.from_numpy(data.weight[idx]), None if not sampled else idx,
                              torch.from_numpy(self._epoch_loo[idx]) if c.leave_one_out else None, rng)
            if penalty is not None:
                loss = loss + penalty(self._params)
            if c.offsets and c.offset_decay > 0:
                loss = loss + c.offset_decay * (self._params["E"][torch.from_numpy(np.unique(pos_all[idx].numpy()))] ** 2).sum(-1).mean()
            self._opt.zero_grad()
            loss.backward()
            self._opt.step()
            tot += float(loss.detach())
            nb += 1
        return {"loss": tot / max(nb, 1), "n": len(data)}

    def end_experience(self) -> None:
        """Drop the experience's optimiser and epoch cache."""
        self._opt = None
        self._epoch_items = None

    @property
    def num_epochs(self) -> int:
        return self.config.epochs

    def _use_sampled(self) -> bool:
        c: CarveConfig = self.config
        if self._mode == "sigmoid":
            return False
        return c.negatives == "sampled" or (c.negatives == "auto" and len(self._live) > c.full_softmax_max)

    def _live_rows(self):
        import torch

        return torch.as_tensor([self._row[m] for m in self._live], dtype=torch.long)

    def _mine_hard(self, data: Interactions) -> np.ndarray:
        """Per training row, the ``n_hard`` live models nearest its projected query, positive excluded."""
        import torch

        k = self.config.n_hard
        live = self._live_rows()
        out = np.zeros((len(data), k), dtype=np.int64)
        with torch.no_grad():
            for s in range(0, len(data), 2048):
                z = self._project(torch.from_numpy(data.emb[s : s + 2048]), self._params)
                lg = self._logits(z, live, self._params)
                pos = torch.as_tensor([self._row[m] for m in data.model[s : s + 2048]])
                lg[live.unsqueeze(0) == pos.unsqueeze(1)] = -torch.inf
                top = lg.topk(min(k, max(1, len(live) - 1)), dim=1).indices
                out[s : s + 2048, : top.shape[1]] = live[top].numpy()
        return out

    def _sample_candidates(self, pos, idx, rng):
        """Sampled negatives per row: mined hard + same-domain + random (positive in column 0)."""
        import torch

        c: CarveConfig = self.config
        live = self._live_rows().numpy()
        B = len(pos)
        hard = self._hard[idx]
        rand = live[rng.integers(0, len(live), size=(B, c.n_random))]
        dom_rows = self._domain_members()
        same = np.empty((B, c.n_domain), dtype=np.int64)
        for i, r in enumerate(pos.tolist()):  # one vectorised draw per row of a batch
            members = dom_rows[self._model_domain[r]]
            same[i] = members[rng.integers(0, len(members), size=c.n_domain)]
        cand = np.concatenate([pos.numpy()[:, None], hard, same, rand], axis=1)
        cand_t = torch.from_numpy(cand)
        # a sampled negative equal to the positive is masked out of the softmax
        mask = torch.zeros(cand_t.shape, dtype=torch.bool)
        mask[:, 1:] = cand_t[:, 1:] == pos.unsqueeze(1)
        return cand_t, mask

    def _domain_members(self) -> dict[str, np.ndarray]:
        out: dict[str, list[int]] = {}
        for m in self._live:
            r = self._row[m]
            out.setdefault(self._model_domain[r], []).append(r)
        return {d: np.asarray(v) for d, v in out.items()}

    def _loo_logit(self, z, x, pos, loo, p):
        """Logit of each row's own model with the row's own query taken out of the prototype
        (leave-one-out): otherwise a model with one or two queries is trivially matched by its
        own query, and the projection learns to separate queries from each other instead of
        routing them."""
        import torch

        proto = torch.from_numpy(self._proto[pos.numpy()]) - loo.unsqueeze(1) * x
        norm = proto.norm(dim=-1, keepdim=True)
        # nothing left (a model whose prototype is just this row): keep the full prototype
        full = torch.from_numpy(self._proto[pos.numpy()])
        proto = torch.where(norm > 1e-4, proto, full)
        e = self._project(torch.nn.functional.normalize(proto, dim=-1), p) + p["E"][pos]
        e = torch.nn.functional.normalize(e, dim=-1)
        return p["scale"] * (z * e).sum(-1)

    def _loss(self, x, pos, reward, weight, idx, loo=None, rng=None):
        """Reward-weighted contrastive loss: r·(−log p) + (1 − r)·(−log(1 − p)).

        ``loo`` [B]: how much of each row's query its model's prototype holds (left out);
        ``rng`` draws the sampled negatives (``idx`` given)."""
        import torch

        p = self._params
        z = self._project(x, p)
        has_loo = loo is not None and bool((loo > 0).any())
        if self._mode == "sigmoid":
            lg = self._sig_logit(z, pos.unsqueeze(1), p)[:, 0]
            l = torch.nn.functional.binary_cross_entropy_with_logits(lg, reward, reduction="none")
            return (weight * l).sum() / weight.sum()
        if idx is None:
            live = self._live_rows()
            col = torch.full((len(self._models),), -1, dtype=torch.long)
            col[live] = torch.arange(len(live))
            pc = col[pos].clamp_min(0).unsqueeze(1)
            logits = self._logits(z, live, p)
            if has_loo:
                logits = logits.scatter(1, pc, self._loo_logit(z, x, pos, loo, p).unsqueeze(1))
            ls = self._log_scores(z, live, p, logits)
            logp = ls.gather(1, pc)[:, 0]
            grp = live
        else:
            cand, mask = self._sample_candidates(pos, idx, rng)
            lg = self._logits(z, cand, p)
            if has_loo:
                lg = torch.cat([self._loo_logit(z, x, pos, loo, p).unsqueeze(1), lg[:, 1:]], dim=1)
            lg = lg.masked_fill(mask, -torch.inf)
            ls = torch.log_softmax(lg, dim=1)
            logp = ls[:, 0]
            grp = cand
            if self.config.hierarchical:
                dom = self._mdom()[pos]
                logp = logp + self.config.domain_weight * self._domain_logp(z, p).gather(1, dom.unsqueeze(1))[:, 0]
        pull = -logp
        if not self.config.hierarchical:
            # log of the summed probability of the row's domain / family (a reward-0 row only
            # pushes its model away)
            if self.config.domain_loss > 0 and len(self._domains):
                dom = self._mdom()
                lse = self._group_logsumexp(ls, dom[grp], len(self._domains))
                pull = pull - self.config.domain_loss * lse.gather(1, dom[pos].unsqueeze(1))[:, 0]
            if self.config.family_loss > 0:
                fam, n_fam = self._mfam()
                lse = self._group_logsumexp(ls, fam[grp], n_fam)
                pull = pull - self.config.family_loss * lse.gather(1, fam[pos].unsqueeze(1))[:, 0]
        push = -torch.log1p(-torch.exp(logp).clamp(max=1 - 1e-6))
        l = reward * pull + (1 - reward) * push
        return (weight * l).sum() / weight.sum()

    def fit(self, data: Examples, cards: Sequence[ModelCard]) -> None:
        """Carve learns only through :class:`cmr.continual.learner.Learner`, which holds its
        replay and anchor: ``Learner(policy).fit(data, cards)`` / ``.consume(events)``."""
        raise TypeError(_LEARNER_ONLY)

    def update(self, events: Sequence[FeedbackEvent]) -> None:
        """See :meth:`fit`."""
        raise TypeError(_LEARNER_ONLY)

    def online_step(self, items: Interactions, replay: Interactions, penalty=None) -> dict[str, float]:
        """``online_steps`` gradient steps on ``items`` + ``replay`` (plus ``penalty``, the anchor),
        then the positive ``items`` join their models' prototypes: bounded cost per event.
        A reward-1 event pulls the query towards the chosen model, a reward-0 one pushes it away."""
        with _torch_threads(self.config.torch_threads):
            out = self._online_step(items, replay, penalty)
        self._emb_cache = None
        self.absorb(items)
        return out

    def _online_step(self, items: Interactions, replay: Interactions, penalty) -> dict[str, float]:
        import torch

        c: CarveConfig = self.config
        new_models = sorted({m for m in items.model if m not in self._row})
        if new_models:
            self.add_models([ModelCard(id=m) for m in new_models])
            self._live = list(dict.fromkeys(self._live + new_models))
        if self._mode is None:
            self._mode = "softmax"
        if not self._live:
            self._live = list(self._models)
        batch = Interactions.concat([items, replay])
        keep = np.array([m in self._row for m in batch.model])
        batch = batch.subset(keep)
        if len(batch) == 0:
            return {"loss": 0.0}
        opt = torch.optim.SGD(list(self._trainable(online=True).values()), lr=c.online_lr)
        x = torch.from_numpy(batch.emb)
        pos = torch.as_tensor([self._row[m] for m in batch.model], dtype=torch.long)
        tot = 0.0
        for _ in range(c.online_steps):
            loo = torch.from_numpy(np.concatenate([np.zeros(len(items), np.float32), (batch.reward * batch.weight)[len(items):]])) if c.leave_one_out else None
            loss = self._loss(x, pos, torch.from_numpy(batch.reward), torch.from_numpy(batch.weight), None, loo)
            if penalty is not None:
                loss = loss + penalty(self._params)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach())
        return {"loss": tot / c.online_steps, "n": len(batch)}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        ids = list(self._doc_emb)
        d.update(
            mode=self._mode,
            models=list(self._models),
            model_domain=list(self._model_domain),
            model_family=list(self._model_family),
            domains=list(self._domains),
            live=list(self._live),
            doc_ids=ids,
            doc_emb=np.stack([self._doc_emb[i] for i in ids]) if ids else np.zeros((0, 0), np.float32),
            proto=self._proto,
            count=self._count,
            doc_text=[self._doc_text.get(i, "") for i in ids],
            absorbed_rows=np.array([r for r, _, _ in self._absorbed], np.int64),
            absorbed_text=[t for _, t, _ in self._absorbed],
            absorbed_w=np.array([x for _, _, x in self._absorbed], np.float32),
            bias_done=sorted(self._bias_done),
            params={} if self._params is None else {k: v.detach().numpy().copy() for k, v in self._params.items()},
        )
        return d

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        super().load_state_dict(state)
        self._mode = state["mode"]
        self._models = list(state["models"])
        self._row = {m: i for i, m in enumerate(self._models)}
        self._model_domain = list(state["model_domain"])
        # a state saved before families were kept: every model its own family
        self._model_family = list(state.get("model_family") or [""] * len(self._models))
        self._mfam_cache = None
        self._domains = list(state["domains"])
        self._drow = {d: i for i, d in enumerate(self._domains)}
        self._mdom_cache = None
        self._emb_cache = None
        self._live = list(state["live"])
        self._doc_emb = {m: np.asarray(v, np.float32) for m, v in zip(state["doc_ids"], state["doc_emb"])}
        self._proto = np.array(state["proto"], dtype=np.float32)
        self._doc_text = {m: t for m, t in zip(state["doc_ids"], state.get("doc_text") or []) if t}
        self._absorbed = [(int(r), t, float(x)) for r, t, x in zip(state.get("absorbed_rows", []), state.get("absorbed_text") or [],
                                                                    state.get("absorbed_w", []))]
        self._count = np.array(state.get("count", np.zeros(len(self._models))), dtype=np.float64)
        self._bias_done = set(state.get("bias_done", []))
        params = state["params"]
        self._params = {k: torch.from_numpy(np.array(v, dtype=np.float32)).requires_grad_(True) for k, v in params.items()} or None
