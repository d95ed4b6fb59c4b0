"""Embedding conditions in the runtime: checks, the artifact's null embedding, and the
null rows of the stacked batch."""
import numpy as np
import pytest

from cfg_export.runtime.conditions import check_embeddings, read_null_embedding, rows_for
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.guidance import GuidanceOptions, guided_model
from cfg_export.runtime.manifest import Condition, Layout, Manifest, ModelFacts, TensorSpec
from cfg_export.runtime.pipeline import check_cond
from cfg_export.runtime.schedule import NoiseSchedule
from tests.runtime.fakes import RecordingBackend

L, D = 3, 4


def make_manifest(layout=Layout.STACKED, kind="embedding") -> Manifest:
    if kind == "embedding":
        condition = Condition("embedding", null_file="null_embedding.npy", shape=(L, D))
        cond = TensorSpec("cond", ("2N", L, D), "float32")
    else:
        condition = Condition("class", 10, 10)
        cond = TensorSpec("cond", ("2N",), "int64")
    facts = ModelFacts(condition, "eps", NoiseSchedule(), (1, 2, 2))
    rows = "2N" if layout is Layout.STACKED else "N"
    inputs = [TensorSpec("sample", (rows, 1, 2, 2), "float32"), TensorSpec("timestep", (rows,), "int64"),
              TensorSpec(cond.name, (rows, *cond.shape[1:]), cond.dtype)]
    if layout is Layout.FUSED:
        inputs.append(TensorSpec("w", (rows,), "float32"))
    return Manifest(facts, layout, tuple(inputs), (TensorSpec("eps", (rows, 1, 2, 2), "float32"),))


def EmbeddingBackend(manifest):
    """eps = 0.1 * sample + the mean of each row's embedding: easy to predict."""
    return RecordingBackend(manifest, lambda f: 0.1 * f["sample"] + f["cond"].mean(axis=(1, 2)).reshape(-1, 1, 1, 1))


def test_check_embeddings():
    manifest = make_manifest()
    one = np.ones((L, D))
    assert check_embeddings(one, manifest).shape == (1, L, D)
    assert check_embeddings(one, manifest).dtype == np.float32
    assert check_embeddings(np.ones((5, L, D), np.float32), manifest).shape == (5, L, D)
    with pytest.raises(CfgExportError, match=r"cond: got shape \[3, 5\], expected \[3, 4\] for every image, "
                                             r"or \[N, 3, 4\]"):
        check_embeddings(np.ones((L, 5)), manifest)
    with pytest.raises(CfgExportError, match="negative: contains NaN or infinity"):
        check_embeddings(np.full((L, D), np.nan), manifest, "negative")
    with pytest.raises(CfgExportError, match="this model takes class conditions, not embeddings"):
        check_embeddings(one, make_manifest(kind="class"))
    with pytest.raises(CfgExportError, match=r"cond: got shape \[3, 4\]; this model takes class labels \[N\]"):
        check_cond(one, make_manifest(kind="class"))


def test_rows_for():
    e = np.arange(L * D, dtype=np.float32).reshape(1, L, D)
    assert rows_for(e, 4, "negative").shape == (4, L, D)
    with pytest.raises(CfgExportError, match=r"negative: got 2 embeddings, expected 1 or one per image \(3\)"):
        rows_for(np.concatenate([e, e]), 3, "negative")


def test_read_null_embedding(tmp_path):
    manifest = make_manifest()
    with pytest.raises(CfgExportError, match="null_embedding.npy: cannot read the null embedding"):
        read_null_embedding(manifest, tmp_path)
    np.save(tmp_path / "null_embedding.npy", np.ones((L + 1, D)))
    with pytest.raises(CfgExportError, match=r"null embedding of shape \[4, 4\], the manifest says \[3, 4\]"):
        read_null_embedding(manifest, tmp_path)
    np.save(tmp_path / "null_embedding.npy", np.ones((L, D), np.float64))
    assert read_null_embedding(manifest, tmp_path).dtype == np.float32


def run(options, null_embedding=None, layout=Layout.STACKED):
    backend = EmbeddingBackend(make_manifest(layout))
    x = np.random.default_rng(0).standard_normal((2, 1, 2, 2))
    cond = np.stack([np.full((L, D), 1.0), np.full((L, D), 2.0)]).astype(np.float32)
    with backend:
        eps = guided_model(backend, 2, options, null_embedding=null_embedding)(x, 500, cond, sigma=1.0)
    return backend.feeds, eps, x


def test_null_rows_hold_the_null_embedding():
    feeds, eps, x = run(GuidanceOptions(w=2.0), null_embedding=np.full((L, D), 5.0))
    (f,) = feeds
    assert f["cond"].shape == (4, L, D) and f["cond"].dtype == np.float32
    np.testing.assert_array_equal(f["cond"][2:], np.full((2, L, D), 5.0))
    eps_c = 0.1 * x.astype(np.float32) + np.array([1.0, 2.0]).reshape(-1, 1, 1, 1)
    eps_u = 0.1 * x.astype(np.float32) + 5.0
    np.testing.assert_allclose(eps, 3 * eps_c - 2 * eps_u, rtol=1e-6)


def test_negative_embedding_takes_the_null_rows():
    negative = np.stack([np.full((L, D), 7.0), np.full((L, D), 8.0)]).astype(np.float32)
    feeds, _, _ = run(GuidanceOptions(w=1.0, negative=negative), null_embedding=np.zeros((L, D)))
    np.testing.assert_array_equal(feeds[0]["cond"][2:], negative)


def test_stacked_embedding_model_needs_a_null():
    with pytest.raises(CfgExportError, match=r"needs its null embedding \[L, D\] for the null rows"):
        run(GuidanceOptions(w=1.0))
