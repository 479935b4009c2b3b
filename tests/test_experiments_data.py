"""experiments.data: bundled TFDS builders (array_record, no TF), numpy splits, batch sampler."""

import numpy as np
import pytest

from experiments import data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_digits_prepared_offline_and_stratified(data_dir):
  ds = data.load_supervised("digits", data_dir=data_dir)
  assert (data_dir / "digits" / "1.0.0").is_dir()
  assert any("array_record" in p.name for p in (data_dir / "digits" / "1.0.0").iterdir())
  assert ds.train.x.shape == (1347, 8, 8, 1) and ds.test.x.shape == (450, 8, 8, 1)
  assert ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int32
  assert 0.0 <= ds.train.x.min() and ds.train.x.max() == 1.0
  assert ds.num_classes == 10 and ds.input_shape == (8, 8, 1)
  # Stratified: every class has ~1/4 of its examples in the test split.
  for c in range(10):
    n_tr, n_te = np.sum(ds.train.y == c), np.sum(ds.test.y == c)
    assert abs(n_te / (n_tr + n_te) - 450 / 1797) < 0.02
  # The split is the same every time (fixed random_state), and matches sklearn's images.
  from sklearn.datasets import load_digits
  d = load_digits()
  all_x = np.concatenate([ds.train.x, ds.test.x]).reshape(1797, 64) * 16
  assert sorted(map(tuple, all_x.astype(int))) == sorted(map(tuple, d.data.astype(int)))
  again = data.load_supervised("digits", data_dir=data_dir)
  np.testing.assert_array_equal(again.test.y, ds.test.y)


def test_mnist1d_matches_package(data_dir):
  ds = data.load_supervised("mnist1d", data_dir=data_dir)
  assert ds.train.x.shape == (4000, 40) and ds.test.x.shape == (1000, 40)
  from mnist1d.data import get_dataset_args, make_dataset
  ref = make_dataset(get_dataset_args())
  # TFDS shuffles records on write: compare as multisets of rows.
  key = lambda a: sorted(map(tuple, np.round(a, 5)))
  assert key(ds.test.x) == key(np.asarray(ref["x_test"], np.float32))


def test_unprepared_dataset_error_says_what_where_how(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.load_supervised("cifar10", data_dir=tmp_path)
  msg = str(e.value)
  assert "'cifar10'" in msg and str(tmp_path) in msg and "download_and_prepare" in msg
  with pytest.raises(data.DatasetNotPreparedError, match="no_such_dataset_xyz"):
    data.prepare("no_such_dataset_xyz", tmp_path)
  with pytest.raises(ValueError, match="name"):
    data.prepare("", tmp_path)


def test_default_data_dir_outside_repo(monkeypatch, tmp_path):
  monkeypatch.delenv("KDJAX_DATA_DIR", raising=False)
  assert str(data.default_data_dir()).endswith(".cache/kdjax/tfds")
  monkeypatch.setenv("KDJAX_DATA_DIR", str(tmp_path))
  assert data.default_data_dir() == tmp_path
  assert data.default_data_dir("/x/y") == data.pathlib.Path("/x/y")


def test_batch_sampler_is_a_function_of_seed_and_step():
  s = data.BatchSampler(103, 10, seed=7)
  assert s.steps_per_epoch == 10
  epoch0 = np.concatenate([s.indices(k) for k in range(10)])
  assert len(np.unique(epoch0)) == 100  # no repeats within an epoch; remainder dropped
  # Random access equals sequential iteration (what resume relies on), any order of calls.
  seq = [idx for _, idx in data.BatchSampler(103, 10, seed=7).iterate(0, 25)]
  fresh = data.BatchSampler(103, 10, seed=7)
  for k in (24, 3, 17, 0):
    np.testing.assert_array_equal(fresh.indices(k), seq[k])
  assert not np.array_equal(s.indices(0), s.indices(10))  # a new permutation per epoch
  assert not np.array_equal(s.indices(0), data.BatchSampler(103, 10, seed=8).indices(0))
  assert data.BatchSampler(5, 64, 0).batch_size == 5
  with pytest.raises(ValueError, match="batch_size"):
    data.BatchSampler(10, 0, 0)
