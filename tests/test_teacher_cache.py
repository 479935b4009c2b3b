"""Teacher cache: round trip in both storages, padding neutrality, loss equality, errors."""

import jax
import numpy as np
import pytest
import scipy.special

from kdjax import losses as L
from kdjax import teacher_cache as TC


def _examples(rng, n, v=20, k=4):
  out = []
  for _ in range(n):
    length = int(rng.integers(0, 6))
    lp_full = scipy.special.log_softmax(rng.normal(size=(length, v)) * 2, -1)
    ids = np.argsort(-lp_full, -1)[:, :k]
    out.append((ids, np.take_along_axis(lp_full, ids, -1)))
  return out


@pytest.mark.parametrize("storage", ["npz", "array_record"])
def test_round_trip_and_batch(tmp_path, storage):
  rng = np.random.default_rng(0)
  ex = _examples(rng, 7)
  TC.write_teacher_cache(tmp_path / "c", ex, kind="topk", k=4, vocab_size=20, storage=storage,
                         examples_per_shard=3, metadata={"teacher": "toy"})
  cache = TC.TeacherCache(tmp_path / "c")
  assert len(cache) == 7 and cache.manifest["metadata"]["teacher"] == "toy"
  assert len(cache.manifest["shards"]) == 3
  for i, (ids, lp) in enumerate(ex):
    np.testing.assert_array_equal(cache[i]["ids"], ids)
    np.testing.assert_allclose(cache[i]["values"], lp, rtol=1e-6)
  b = cache.batch([0, 3, 6], length=5)
  assert b["ids"].shape == (3, 5, 4) and b["mask"].shape == (3, 5)
  # Padded tokens are neutral for the loss; real tokens give the same value as the raw arrays.
  zs = rng.normal(size=(3, 5, 20))
  out = np.asarray(L.topk_tail_kl(zs, b["ids"], b["values"], where=b["mask"]))
  assert np.all(out[~b["mask"]] == 0)
  full = np.asarray(L.topk_tail_kl(zs, b["ids"], np.where(b["mask"][..., None], b["values"],
                                                           np.log(0.1))))
  np.testing.assert_allclose(out[b["mask"]], full[b["mask"]], rtol=1e-6)


def test_sampled_cache_and_errors(tmp_path):
  zt = np.random.default_rng(1).normal(size=(3, 10))
  ids, w = L.sample_sparse_targets(jax.random.key(0), zt, num_samples=6)
  with TC.TeacherCacheWriter(tmp_path / "s", kind="sampled", k=6, vocab_size=10,
                             value_dtype="float16") as wr:
    wr.add(np.asarray(ids), np.asarray(w))
    with pytest.raises(ValueError, match="ids"):
      wr.add(np.full((2, 6), 10), np.ones((2, 6)))
    with pytest.raises(ValueError, match="ids"):
      wr.add(np.zeros((2, 5), int), np.ones((2, 5)))
    with pytest.raises(ValueError, match="weights"):
      wr.add(np.zeros((2, 6), int), -np.ones((2, 6)))
  cache = TC.TeacherCache(tmp_path / "s")
  b = cache.batch([0, 0], length=4)
  assert b["values"][0, 3].sum() == 0 and not b["mask"][0, 3]
  with pytest.raises(ValueError, match="already"):
    TC.TeacherCacheWriter(tmp_path / "s", kind="sampled", k=6, vocab_size=10)
  with pytest.raises(ValueError, match="kind"):
    TC.TeacherCacheWriter(tmp_path / "x", kind="dense", k=6, vocab_size=10)
  with pytest.raises(FileNotFoundError):
    TC.TeacherCache(tmp_path / "missing")
  with pytest.raises(IndexError):
    cache[5]
