"""Teacher cache: round trip in both storages, padding neutrality, loss equality, errors."""

import gc
import json
import warnings

import jax
import jax.numpy as jnp
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


def _topk(n, v=50, k=3, seed=0, length=2):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    lp = scipy.special.log_softmax(rng.normal(size=(length, v)), -1)
    ids = np.argsort(-lp, -1)[:, :k]
    out.append((ids, np.take_along_axis(lp, ids, -1)))
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
  assert b["ids"].shape == (3, 5, 4) and b["where"].shape == (3, 5)
  # Padded tokens are neutral for the loss; real tokens give the same value as the raw arrays.
  zs = rng.normal(size=(3, 5, 20))
  out = np.asarray(L.topk_tail_kl(zs, b["ids"], b["values"], where=b["where"]))
  assert np.all(out[~b["where"]] == 0)
  for r, i in enumerate([0, 3, 6]):
    ids, lp = ex[i]
    m = min(5, ids.shape[0])
    if m:
      raw = np.asarray(L.topk_tail_kl(zs[r, :m], ids[:m], lp[:m]))
      np.testing.assert_allclose(out[r, :m], raw, rtol=1e-5)


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
  assert b["values"][0, 3].sum() == 0 and not b["where"][0, 3]
  with pytest.raises(ValueError, match="already"):
    TC.TeacherCacheWriter(tmp_path / "s", kind="sampled", k=6, vocab_size=10)
  with pytest.raises(ValueError, match="kind"):
    TC.TeacherCacheWriter(tmp_path / "x", kind="dense", k=6, vocab_size=10)
  with pytest.raises(FileNotFoundError):
    TC.TeacherCache(tmp_path / "missing")
  with pytest.raises(IndexError):
    cache[5]


# T1: a boolean `where`, padded rows all -inf, neutral for the losses even without `where`.
def test_batch_where_and_padding_neutral_without_where(tmp_path):
  ids, lp = L.topk_teacher(jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)),
                                       jnp.float32), k=2)
  TC.write_teacher_cache(tmp_path / "c", [(np.asarray(ids), np.asarray(lp)),
                                          (np.asarray(ids[:1]), np.asarray(lp[:1]))],
                         kind="topk", k=2, vocab_size=6)
  b = TC.TeacherCache(tmp_path / "c").batch([0, 1])
  assert "mask" not in b and b["where"].dtype == np.bool_
  np.testing.assert_array_equal(b["where"], [[True, True, True], [True, False, False]])
  assert np.all(b["values"][~b["where"]] == -np.inf)
  s = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 6)), jnp.float32)
  for fn in (L.topk_tail_kl, L.truncated_topk_kl):
    for f in (fn, jax.jit(fn)):
      out = np.asarray(f(s, b["ids"], b["values"]))
      assert np.all(out[~b["where"]] == 0), fn.__name__
      ref = np.asarray(fn(s, b["ids"], b["values"], where=b["where"]))
      np.testing.assert_allclose(out, ref, rtol=1e-6)
      gs, gt = jax.grad(lambda a, v: f(a, b["ids"], v).sum(), argnums=(0, 1))(
          s, jnp.asarray(b["values"]))
      assert np.all(np.isfinite(gs)) and np.all(np.asarray(gs)[~b["where"]] == 0)
      assert np.all(np.isfinite(gt)) and np.all(np.asarray(gt)[~b["where"]] == 0)


# T2: one writer per directory.
def test_second_writer_is_refused(tmp_path):
  kw = dict(kind="topk", k=3, vocab_size=50, examples_per_shard=2)
  a = TC.TeacherCacheWriter(tmp_path / "c", **kw)
  with pytest.raises(ValueError, match="another TeacherCacheWriter"):
    TC.TeacherCacheWriter(tmp_path / "c", **kw)
  for ex in _topk(4):
    a.add(*ex)
  a.close()
  assert len(TC.TeacherCache(tmp_path / "c")) == 4
  # A directory holding shards of an unfinished cache is refused too.
  w = TC.TeacherCacheWriter(tmp_path / "d", **kw)
  for ex in _topk(3):
    w.add(*ex)
  w._closed = True  # simulate a crash: shards written, no manifest  # pylint: disable=protected-access
  w._release_lock()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="recover_teacher_cache"):
    TC.TeacherCacheWriter(tmp_path / "d", **kw)


# T3: metadata is checked before any shard is written.
def test_non_json_metadata_fails_in_init(tmp_path):
  with pytest.raises(TypeError, match="metadata"):
    TC.TeacherCacheWriter(tmp_path / "c", kind="topk", k=3, vocab_size=50,
                          metadata={"T": np.float32(2.)})
  assert not list((tmp_path / "c").glob("shard-*")) if (tmp_path / "c").exists() else True


# T4: an unclosed writer warns; recover_teacher_cache finishes it from the complete shards.
@pytest.mark.parametrize("storage", ["npz", "array_record"])
def test_unclosed_writer_warns_and_recovers(tmp_path, storage):
  ex = _topk(7)

  def forget():
    w = TC.TeacherCacheWriter(tmp_path / "c", kind="topk", k=3, vocab_size=50,
                              examples_per_shard=4, storage=storage, temperature=2.0)
    for e in ex:
      w.add(*e)

  with pytest.warns(ResourceWarning, match="never closed"):
    forget()
    gc.collect()
  with pytest.raises(FileNotFoundError, match="recover_teacher_cache"):
    TC.TeacherCache(tmp_path / "c")
  TC.recover_teacher_cache(tmp_path / "c")
  cache = TC.TeacherCache(tmp_path / "c")
  assert len(cache) == 4 and cache.temperature == 2.0
  for i in range(4):
    np.testing.assert_array_equal(cache[i]["ids"], ex[i][0])
  with pytest.raises(ValueError, match="already"):
    TC.recover_teacher_cache(tmp_path / "c")


def test_error_inside_context_keeps_complete_shards(tmp_path):
  with pytest.warns(RuntimeWarning, match="recover_teacher_cache"):
    with pytest.raises(KeyError):
      with TC.TeacherCacheWriter(tmp_path / "c", kind="topk", k=3, vocab_size=50,
                                 examples_per_shard=2) as w:
        for e in _topk(3):
          w.add(*e)
        raise KeyError("teacher crashed")
  TC.recover_teacher_cache(tmp_path / "c")
  assert len(TC.TeacherCache(tmp_path / "c")) == 3


# T5: invalid or degraded values are refused.
@pytest.mark.parametrize("kind,ids,values,match", [
    ("topk", [[0, 0, 1]], [[-2., -3., -4.]], "repeat"),
    ("topk", [[0, 1, 2]], [[.5, -1., -2.]], "<= 0"),
    ("topk", [[0, 1, 2]], [[-.1, -.2, -.3]], "mass"),
    ("topk", [[0, 1, 2]], [[np.nan, -1., -2.]], "NaN"),
    ("topk", [[0, 1, 2]], [[np.inf, -1., -2.]], "NaN or \\+inf"),
    ("sampled", [[0, 1, 2]], [[np.inf, 1., 2.]], "inf"),
    ("sampled", [[0, 1, 2]], [[np.nan, 1., 2.]], "NaN"),
    ("topk", [[0, 1, 50]], [[-2., -3., -4.]], "ids"),
    ("topk", [[0, 1, -1]], [[-2., -3., -4.]], "ids"),
])
def test_invalid_values_are_refused(tmp_path, kind, ids, values, match):
  with TC.TeacherCacheWriter(tmp_path / "c", kind=kind, k=3, vocab_size=50) as w:
    with pytest.raises(ValueError, match=match):
      w.add(np.array(ids), np.array(values))
    w.add(np.array([[0, 1, 2]]), np.array([[-2., -3., -np.inf]]) if kind == "topk"
          else np.ones((1, 3)))   # -inf padding (and repeated padding ids) is fine


def test_dtype_overflow_and_vocab_limit(tmp_path):
  with TC.TeacherCacheWriter(tmp_path / "c", kind="sampled", k=3, vocab_size=50,
                             value_dtype="float16") as w:
    with pytest.raises(ValueError, match="overflow"):
      w.add(np.array([[0, 1, 2]]), np.array([[1e5, 1., 2.]]))
  with pytest.raises(ValueError, match="vocab_size"):
    TC.TeacherCacheWriter(tmp_path / "d", kind="topk", k=3, vocab_size=2**31)
  with pytest.raises(ValueError, match="k"):
    TC.TeacherCacheWriter(tmp_path / "e", kind="topk", k=True, vocab_size=50)


# T6: bounded reader memory.
def test_reader_keeps_a_bounded_number_of_shards(tmp_path):
  TC.write_teacher_cache(tmp_path / "c", _topk(20, length=1), kind="topk", k=3, vocab_size=50,
                         examples_per_shard=1)
  cache = TC.TeacherCache(tmp_path / "c", max_open_shards=3)
  for i in range(20):
    cache[i]
    assert len(cache._open) <= 3  # pylint: disable=protected-access
  assert len(cache._open) == 3  # pylint: disable=protected-access
  for _ in range(2):
    for i in range(20):
      np.testing.assert_array_equal(cache[i]["ids"], _topk(20, length=1)[i][0])


# T7: read errors name the file and what was expected.
def _manifest(d):
  return json.loads((d / "manifest.json").read_text())


def _write(d, storage="npz"):
  TC.write_teacher_cache(d, _topk(4), kind="topk", k=3, vocab_size=50, examples_per_shard=2,
                         storage=storage)
  return d


@pytest.mark.parametrize("storage", ["npz", "array_record"])
def test_truncated_shard_names_the_file(tmp_path, storage):
  d = _write(tmp_path / "c", storage)
  f = d / _manifest(d)["shards"][0]["file"]
  f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
  cache = TC.TeacherCache(d)
  with pytest.raises(ValueError, match=f.name):
    cache[0]


def test_bad_manifests_name_the_file(tmp_path):
  d = _write(tmp_path / "c")
  m = _manifest(d)
  (d / "manifest.json").write_text(json.dumps(dict(m, k=5)))
  with pytest.raises(ValueError, match="shard-00000.*k = 5"):
    TC.TeacherCache(d)[0]
  (d / "manifest.json").write_text(json.dumps(dict(m, num_examples=5)))
  with pytest.raises(ValueError, match="manifest.json.*num_examples"):
    TC.TeacherCache(d)
  shards = [dict(m["shards"][0], num_examples=3), dict(m["shards"][1], num_examples=1)]
  (d / "manifest.json").write_text(json.dumps(dict(m, shards=shards)))
  with pytest.raises(ValueError, match="shard-00000.*holds 2 examples"):
    TC.TeacherCache(d)[0]
  (d / "manifest.json").write_text("{garbled")
  with pytest.raises(ValueError, match="manifest.json.*JSON"):
    TC.TeacherCache(d)
  (d / "manifest.json").write_text(json.dumps(m))
  (d / m["shards"][1]["file"]).unlink()
  with pytest.raises(FileNotFoundError, match="shard-00001"):
    TC.TeacherCache(d)[3]
  with pytest.raises(ValueError, match="length"):
    TC.TeacherCache(d).batch([0], length=-1)


# A11: the temperature travels with the cached targets.
def test_temperature_is_recorded_and_returned(tmp_path):
  z = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
  ids, lp = L.topk_teacher(z, k=2, temperature=4.0)
  TC.write_teacher_cache(tmp_path / "c", [(np.asarray(ids), np.asarray(lp))], kind="topk", k=2,
                         vocab_size=6, temperature=4.0)
  cache = TC.TeacherCache(tmp_path / "c")
  b = cache.batch([0])
  assert cache.manifest["temperature"] == 4.0 and b["temperature"] == 4.0
  s = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 6)), jnp.float32)
  np.testing.assert_allclose(
      L.topk_tail_kl(s, b["ids"], b["values"], temperature=b["temperature"], where=b["where"]),
      L.topk_tail_kl(s[0], ids, lp, temperature=4.0)[None], rtol=1e-5)
