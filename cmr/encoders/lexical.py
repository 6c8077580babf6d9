"""A fitted lexical view of texts, fused with a dense encoder: what ``embedding="minilm+tfidf"`` runs.

MiniLM misses lexical cues that TF-IDF keeps (model and library names, task words); the two
together score higher than either (README, "Results"). ``LexicalEncoder`` is TF-IDF over word
1–2-grams and character 3–5-grams (sublinear tf, each part l2-normalised), reduced by a truncated
SVD to ``dim`` columns and normalised. ``FusedEncoder`` concatenates a dense encoder's unit vector
with ``weight`` times the lexical one and renormalises, so every policy, FAISS and the decision
store see one ordinary encoder of dimension ``dense.dim + lexical.dim``.

The lexical part is fitted once, on the texts the first training sees (train prompts and card
texts, labels unused), and travels in every checkpoint (``encoder_state`` / ``restore_encoder``,
called by ``cmr.checkpoint``): the benchmark, ``cmr train``, the router and the learner all
encode with the same fitted state. Its SVD components are stored as int8 with one scale per term
(a checkpoint is written per learner step; fp32 would be 4x larger), and the fitted encoder uses
the quantised components from the start, so a restored encoder gives the same vectors.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, Sequence, get_args

import numpy as np

from cmr.errors import ConfigError

#: what a router or benchmark embeds texts with: the dense encoder alone, fused with TF-IDF, or
#: ``auto``: fused where the texts it is fitted on are enough (:data:`AUTO_MIN_TEXTS`), else alone
Embedding = Literal["auto", "minilm", "minilm+tfidf"]
EMBEDDINGS: tuple[str, ...] = get_args(Embedding)

#: fusion settings, chosen on a validation split carved from CMRBench's train splits
#: (docs/results/limits/fused-validation.md)
LEXICAL_WEIGHT = 0.75
LEXICAL_DIM = 256
#: the lexical part reads a text's last this many characters (its end, as the dense part keeps):
#: its analysers cost time linear in the text, and a routed prompt may be megabytes
LEXICAL_CHARS = 8192
#: ``auto`` fuses only when fitted on at least this many texts: twice the SVD's columns, so the
#: lexical part has its full dimension (a few dozen texts would give it a handful of noisy ones)
AUTO_MIN_TEXTS = 2 * LEXICAL_DIM
_WORD = {"ngram_range": (1, 2), "min_df": 2, "sublinear_tf": True, "max_features": 30_000}
_CHAR = {"analyzer": "char_wb", "ngram_range": (3, 5), "min_df": 3, "sublinear_tf": True, "max_features": 20_000}


def _vectorizer(params: dict):
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(**params)


class LexicalEncoder:
    """TF-IDF (word + char n-grams) → truncated SVD → unit norm; fitted with :meth:`fit`."""

    def __init__(self, word: tuple[list[str], np.ndarray], char: tuple[list[str], np.ndarray], codes: np.ndarray, scales: np.ndarray):
        """``word``/``char``: (terms in column order, idf); ``codes`` int8 ``[n_terms, dim]`` and
        ``scales`` float32 ``[n_terms]``: the SVD components, ``codes * scales[:, None]``."""
        self._parts = (word, char)
        # encoding runs the analyzers and a sparse weighted sum by hand: sklearn's transform costs
        # ~3 ms of input checks per call, and a routed query is one call
        self._views = []
        offset = 0
        for params, (terms, idf) in ((_WORD, word), (_CHAR, char)):
            self._views.append((_vectorizer(params).build_analyzer(), {t: offset + i for i, t in enumerate(terms)},
                                np.concatenate([np.zeros(offset), np.asarray(idf, np.float64)])))
            offset += len(terms)
        self.codes, self.scales = codes, scales
        self.components = codes.astype(np.float32) * scales[:, None]
        self.dim = int(codes.shape[1])
        h = hashlib.blake2b(digest_size=8)
        for a in (codes, scales, word[1], char[1]):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update("\x00".join(word[0] + char[0]).encode("utf-8"))
        self.name = f"tfidf-svd{self.dim}-{h.hexdigest()}"

    @classmethod
    def fit(cls, texts: Sequence[str], dim: int = LEXICAL_DIM, seed: int = 0) -> "LexicalEncoder":
        """Fit TF-IDF and its SVD on ``texts`` (at least a few hundred distinct ones make sense)."""
        import scipy.sparse as sp
        from sklearn.decomposition import TruncatedSVD

        texts = [t[-LEXICAL_CHARS:] for t in texts]
        parts, mats = [], []
        for params in (_WORD, _CHAR):
            v = _vectorizer(params)
            try:
                x = v.fit_transform(texts)
            except ValueError:  # no term in enough texts (few or tiny texts): this part adds nothing
                parts.append(([], np.zeros(0)))
                continue
            parts.append(([t for t, _ in sorted(v.vocabulary_.items(), key=lambda kv: kv[1])], v.idf_.astype(np.float64)))
            mats.append(x)
        x = sp.hstack(mats).tocsr() if mats else None
        if x is None or x.shape[1] < 2 or len(texts) < 2:
            raise ConfigError(f"field 'embedding': 'minilm+tfidf' found too few terms to fit in {len(texts)} texts (a word must be in "
                              f"{_WORD['min_df']} of them, a character n-gram in {_CHAR['min_df']}); use 'minilm' or train on more texts")
        k = max(1, min(dim, x.shape[1] - 1, len(texts) - 1))
        with np.errstate(invalid="ignore", divide="ignore"):  # its explained-variance ratio (unused) is 0/0 on a tiny corpus
            comp = TruncatedSVD(k, random_state=seed).fit(x).components_.T.astype(np.float32)  # [n_terms, k]
        scales = np.maximum(np.abs(comp).max(axis=1), 1e-12).astype(np.float32) / 127.0
        codes = np.round(comp / scales[:, None]).astype(np.int8)
        return cls(parts[0], parts[1], codes, scales)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for r, text in enumerate(texts):
            text = text[-LEXICAL_CHARS:]
            for analyze, vocab, idf in self._views:
                # sklearn's TfidfVectorizer.transform, for one text: counts of known terms,
                # sublinear tf × idf, l2-normalised per part; then the SVD projection
                cols, counts = np.unique(np.fromiter((j for t in analyze(text) if (j := vocab.get(t)) is not None), np.int64), return_counts=True)
                if cols.size:
                    w = (1.0 + np.log(counts)) * idf[cols]
                    out[r] += (w / np.linalg.norm(w)) @ self.components[cols]
        return out / np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)

    def state_dict(self) -> dict[str, Any]:
        (wt, wi), (ct, ci) = self._parts
        return {"word_terms": wt, "word_idf": wi, "char_terms": ct, "char_idf": ci, "codes": self.codes, "scales": self.scales}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "LexicalEncoder":
        return cls((list(d["word_terms"]), np.asarray(d["word_idf"])), (list(d["char_terms"]), np.asarray(d["char_idf"])),
                   np.asarray(d["codes"], np.int8), np.asarray(d["scales"], np.float32))


class FusedEncoder:
    """``normalize([dense(x) ; weight · lexical(x)])``: an encoder like any other (name, dim, encode)."""

    def __init__(self, dense, lexical: LexicalEncoder, weight: float = LEXICAL_WEIGHT):
        self.dense, self.lexical, self.weight = dense, lexical, float(weight)
        self.dim = int(dense.dim) + lexical.dim

    @property
    def name(self) -> str:
        # read through: a dense part tuned in place (cmr.encoders.tuned) renames the fusion too
        return f"{self.dense.name}+{self.lexical.name}x{self.weight:g}"

    def with_dense(self, dense) -> "FusedEncoder":
        """The same fitted lexical part over another view of the dense encoder (the router's query path)."""
        return FusedEncoder(dense, self.lexical, self.weight)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        a = self.dense.encode(texts)
        b = self.lexical.encode(texts)
        # both parts are unit vectors: the concatenation's norm is the same for every text
        return (np.hstack([a, self.weight * b]) / np.sqrt(1.0 + self.weight**2)).astype(np.float32, copy=False)

    def dense_of(self, x: np.ndarray) -> np.ndarray:
        """The dense part's unit vectors inside fused vectors ``x`` (``[..., dim]``): exactly what
        ``self.dense`` gives for the same texts (the fusion scales it by a constant)."""
        return np.ascontiguousarray(np.asarray(x, np.float32)[..., : int(self.dense.dim)] * np.float32(np.sqrt(1.0 + self.weight**2)))

    def state_dict(self) -> dict[str, Any]:
        out = {"embedding": "minilm+tfidf", "weight": self.weight, "lexical": self.lexical.state_dict()}
        if (dense := _tuned_state(self.dense)) is not None:
            out["dense"] = dense
        return out


def dense_part(encoder):
    """The dense encoder inside ``encoder`` (itself when not fused)."""
    return getattr(encoder, "dense", encoder)


def fit_encoder(embedding: str, dense, texts: Sequence[str], *, labelled: bool = True):
    """The encoder ``embedding`` names, over ``dense``, fitted on ``texts`` where it needs fitting
    (``auto``: fused when the training rows are ``labelled`` with their target model, there are
    :data:`AUTO_MIN_TEXTS` texts and they hold terms enough, else ``dense`` alone;
    :func:`embedding_of` says which).

    ``labelled=False``: outcome rows (a quality per model). ``auto`` stays dense there: across
    training sizes the fused knn earned nothing on the outcome sets measured, while on labelled rows
    with cards it won at every size (``python -m bench.embedding_threshold``); a served router never
    fuses for them either (it fuses only on the labelled rows of its first start)."""
    if embedding == "minilm" or (embedding == "auto" and (not labelled or len(texts) < AUTO_MIN_TEXTS)):
        return dense
    if embedding in ("auto", "minilm+tfidf"):
        try:
            return FusedEncoder(dense, LexicalEncoder.fit(texts))
        except ConfigError:
            if embedding == "auto":
                return dense
            raise
    raise ValueError(f"unknown embedding {embedding!r}; known: {', '.join(EMBEDDINGS)}")


def _tuned_state(dense) -> dict[str, Any] | None:
    """The fine-tuned weights of a dense encoder (``cmr.encoders.tuned``), None for the packaged ones."""
    inner = getattr(dense, "inner", dense)
    fn = getattr(inner, "tuned_state", None)
    return fn() if fn is not None else None


def _with_tuned(encoder, tuned: dict[str, Any]):
    """``encoder`` (a dense one, maybe cached) over the fine-tuned weights ``tuned``: the same
    backend (ONNX Runtime and its quantisation for the router, torch for training), the same cache."""
    from cmr.encoders.cache import CachedEncoder
    from cmr.encoders.tuned import TunedMiniLMEncoder

    inner = getattr(encoder, "inner", encoder)
    if getattr(inner, "digest", None) == tuned["digest"]:
        return encoder
    new = inner.with_tuned(tuned) if hasattr(inner, "with_tuned") else TunedMiniLMEncoder.from_state(tuned)
    return CachedEncoder(new, encoder.cache) if isinstance(encoder, CachedEncoder) else new


def encoder_state(encoder) -> dict[str, Any] | None:
    """What a checkpoint stores to rebuild ``encoder`` over a dense one (None: the dense alone)."""
    fn = getattr(encoder, "state_dict", None)
    if fn is not None:
        return fn()
    if encoder is not None and (dense := _tuned_state(encoder)) is not None:
        return {"embedding": "minilm", "dense": dense}
    return None


def embedding_of(encoder) -> str:
    """The ``Embedding`` name of ``encoder``."""
    return (encoder_state(encoder) or {}).get("embedding", "minilm") if encoder is not None else "minilm"


def restore_encoder(state: dict[str, Any] | None, encoder):
    """The encoder a checkpoint was trained with: ``encoder``'s dense part, fused with the stored
    lexical part when there is one (``encoder`` is returned as it is when it already holds it)."""
    if encoder is None or not state:
        return dense_part(encoder) if encoder is not None else None
    if state.get("embedding") not in ("minilm", "minilm+tfidf"):
        raise ValueError(f"checkpoint field 'encoder.embedding': unknown {state.get('embedding')!r}; known: {', '.join(EMBEDDINGS)}")
    dense = dense_part(encoder)
    if state.get("dense"):
        dense = _with_tuned(dense, state["dense"])
    if state["embedding"] == "minilm":
        return dense
    lexical = LexicalEncoder.from_state(state["lexical"])
    if (isinstance(encoder, FusedEncoder) and encoder.dense is dense and encoder.lexical.name == lexical.name
            and encoder.weight == float(state["weight"])):
        return encoder
    return FusedEncoder(dense, lexical, float(state["weight"]))
