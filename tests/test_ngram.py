"""experiments.ngram: the pocketsphinx en-us trigram LM read from its binary trie, exactly.

Checks: the file layout and trie structure; integer agreement with pocketsphinx's own
``NGramModel.prob`` (random trigram / bigram-only / random-pair / OOV-history queries, whole
contexts, the two unsorted-range quirks); the reduced-vocabulary JAX oracle (raw scores vs
pocketsphinx within 1.1e-4 nats, normalisation, the exact tail formula vs brute force, OOV =
``<other>`` semantics, float32 JAX vs the float64 numpy reference, jit = eager, another device);
sampling (next-token frequencies within 5 standard errors, sentence structure) and the cache.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pocketsphinx = pytest.importorskip("pocketsphinx")

from experiments import ngram  # noqa: E402  pylint: disable=wrong-import-position

VP = 2047
OOV = "zzqx"  # not in the LM's vocabulary
LN = ngram.LN_BASE


@pytest.fixture(scope="module")
def lm():
  return ngram.read_trie()


@pytest.fixture(scope="module")
def ps_lm(lm):
  return pocketsphinx.NGramModel.readfile(lm.path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("ngram_cache")


@pytest.fixture(scope="module")
def oracle(lm, cache_dir):
  return ngram.ngram_oracle(VP, cache_dir=cache_dir, lm=lm)


def _ps_prob(ps_lm, history, word):
  """pocketsphinx's score: the word first, then the history most recent first."""
  return ps_lm.prob([word] + list(history)[::-1])


def _random_queries(lm, rng):
  """(history oldest-first, word) pairs: 1,200 contexts x 5 words of four kinds."""
  words = lm.words.tolist()
  p = np.exp(lm.unigram_ln)
  p[lm.word_id("<s>")] = 0
  p /= p.sum()
  draw = lambda n: [words[i] for i in rng.choice(len(words), n, p=p)]  # noqa: E731
  queries = []
  for t in rng.integers(0, len(lm.trigram_word), 400):  # existing trigram contexts
    j = lm.trigram_parent[t]
    hist = [words[lm.trigram_word[t]], words[lm.bigram_word[j]]]
    queries += [(hist, w) for w in [words[lm.bigram_root[j]]] + draw(4)]
  for j in rng.integers(0, len(lm.bigram_word), 300):  # bigram-only contexts
    queries += [([words[lm.bigram_word[j]]], w) for w in [words[lm.bigram_root[j]]] + draw(4)]
  for _ in range(300):  # unigram-weighted random pairs
    queries += [(draw(2), w) for w in draw(5)]
  for i in range(200):  # OOV histories (cut there), longer histories, no history
    a, b, c = draw(3)
    hist = [[OOV, b], [a, OOV], [OOV], [], [c, a, b], [OOV, OOV, b]][i % 6]
    queries += [(hist, w) for w in draw(5)]
  return queries


# ----------------------------------------------------------------------------- the file


def test_layout(lm):
  assert os.path.getsize(lm.path) == lm.file_size == 27_114_385
  assert lm.order == 3 and lm.counts == (72_547, 2_051_547, 1_669_625) and lm.quant_type == 1
  assert lm.offsets == {"counts": 20, "quant_type": 32, "codebooks": 36, "unigrams": 786_468,
                        "bigrams": 1_657_044, "trigrams": 19_608_097, "words": 26_495_313}
  assert [len(b) for b in lm.codebooks] == [65_536] * 3
  assert len(lm.words) == len(set(lm.words.tolist())) == 72_547
  assert lm.words[6] == "</s>" and lm.words[7] == "<s>"
  assert int(lm.unigram_prob[7]) == -2_279_673  # <s>: log10 P = -99
  np.testing.assert_allclose(np.exp(lm.unigram_ln).sum(), 0.9999988, atol=1e-7)


def test_structure(lm):
  nxt = lm.unigram_next
  assert nxt[0] == 0 and np.all(np.diff(nxt) >= 0) and nxt[-1] == 2_051_541
  assert len(lm.bigram_word) == 2_051_541
  assert lm.bigram_next[0] == 0 and np.all(np.diff(lm.bigram_next) >= 0)
  assert lm.bigram_next[-1] == 1_669_625
  same = lm.bigram_root[1:] == lm.bigram_root[:-1]
  assert np.all(lm.bigram_word[1:][same] > lm.bigram_word[:-1][same])
  assert len(lm.unsorted_trigram_ranges) == 2
  lost = np.flatnonzero(~lm.trigram_reachable)
  named = {tuple(lm.words[[lm.trigram_word[t], lm.bigram_word[lm.trigram_parent[t]],
                           lm.bigram_root[lm.trigram_parent[t]]]]) for t in lost}
  assert named == {("whips", "and", "bullhorns"), ("<s>", "and", "jerri")}


def _corrupt(lm, tmp_path, name, edit):
  data = bytearray(open(lm.path, "rb").read())
  data = edit(data)
  p = tmp_path / name
  p.write_bytes(bytes(data))
  return p


@pytest.mark.parametrize("name, edit, match", [
    ("magic", lambda d: b"X" + d[1:], "magic"),
    ("order", lambda d: d[:19] + b"\x04" + d[20:], "order"),
    ("truncated", lambda d: d[:-100], "word table|truncated"),
    ("trailing", lambda d: d + b"\0", "ends at byte"),
    ("short", lambda d: d[:1_000_000], "truncated"),
    ("next", lambda d: d[:786_468 + 8] + (5).to_bytes(4, "little") + d[786_468 + 12:], "next"),
])
def test_malformed_file_raises(lm, tmp_path, name, edit, match):
  with pytest.raises(ValueError, match=match):
    ngram.read_trie(_corrupt(lm, tmp_path, name, edit))


# ----------------------------------------------------------------------------- exact agreement


def test_exact_integer_agreement_random_queries(lm, ps_lm):
  queries = _random_queries(lm, np.random.default_rng(0))
  assert len(queries) == 6000
  ours = np.array([ngram.score(lm, h, w) for h, w in queries])
  theirs = np.array([_ps_prob(ps_lm, h, w) for h, w in queries])
  assert np.array_equal(ours, theirs), np.flatnonzero(ours != theirs)[:10]
  flt = np.array([ngram.score(lm, h, w, as_int=False) for h, w in queries[:1000]], np.float64)
  assert np.abs(flt - theirs[:1000]).max() < 1.0
  assert ngram.score(lm, ["the"], OOV) == _ps_prob(ps_lm, ["the"], OOV) == ngram.LOGMATH_ZERO


@pytest.mark.parametrize("h2, h1", [("of", "the"), (None, "and"), ("<s>", "i")])
def test_exact_integer_agreement_full_context(lm, ps_lm, h2, h1):
  s = ngram.next_word_scores(lm, lm.word_id(h1), lm.word_id(h2) if h2 else None)
  hist = [h1] + ([h2] if h2 else [])
  theirs = np.array([ps_lm.prob([w] + hist) for w in lm.words.tolist()])
  assert np.array_equal(np.trunc(s).astype(np.int64), theirs)


def test_unsorted_range_quirk(lm, ps_lm):
  assert ngram.score(lm, ["whips", "and"], "bullhorns") == -170_957
  assert ngram.score(lm, ["<s>", "and"], "jerri") == -174_348
  assert _ps_prob(ps_lm, ["whips", "and"], "bullhorns") == -170_957
  assert _ps_prob(ps_lm, ["<s>", "and"], "jerri") == -174_348
  assert ngram.score(lm, ["whips", "and"], "bullhorns", compat="file") == -43_375
  # The stored -126,618.53 (rounded: -126,619) truncates to -126,618 like every score.
  assert ngram.score(lm, ["<s>", "and"], "jerri", compat="file") == -126_618
  np.testing.assert_allclose(ngram.score(lm, ["<s>", "and"], "jerri", compat="file", as_int=False),
                             -126_618.53, atol=0.01)
  for j in lm.unsorted_trigram_ranges:  # every entry there: reachable <=> pocketsphinx finds it
    for t in range(lm.bigram_next[j], lm.bigram_next[j + 1]):
      w = lm.words[[lm.bigram_root[j], lm.bigram_word[j], lm.trigram_word[t]]].tolist()
      found = _ps_prob(ps_lm, [w[2], w[1]], w[0]) == int(np.trunc(lm.trigram_prob[t]))
      assert found == lm.trigram_reachable[t]


# ----------------------------------------------------------------------------- the JAX oracle


def _token_contexts(oracle, rng, n):
  """n (h2, h1) token contexts: half existing context keys, half random (incl. <s>, <other>)."""
  keys = oracle.host["ctx_key"]
  k = keys[rng.integers(0, len(keys), n // 2)]
  h2 = np.concatenate([k // oracle.num_inputs, rng.integers(0, oracle.num_inputs, n - n // 2)])
  h1 = np.concatenate([k % oracle.num_inputs, rng.integers(0, oracle.num_inputs, n - n // 2)])
  h2[:8] = oracle.other_id
  h1[8:16] = oracle.other_id
  h1[16:24] = h2[24:32] = oracle.bos_id
  return h2.astype(np.int32), h1.astype(np.int32)


def _token_word(oracle, t):
  return OOV if t == oracle.other_id else oracle.tokens[int(t)]


def test_raw_matches_pocketsphinx(oracle, ps_lm):
  rng = np.random.default_rng(1)
  h2, h1 = _token_contexts(oracle, rng, 1000)
  raw = np.asarray(oracle.log_probs(h2, h1, raw=True))
  assert raw.shape == (1000, VP + 1) and raw.dtype == np.float32
  cols = rng.integers(0, VP, (1000, 5))
  cols[:, 0] = 0  # </s>
  err = []
  for i in range(1000):
    hist = [_token_word(oracle, h2[i]), _token_word(oracle, h1[i])]
    for c in cols[i]:
      err.append(abs(float(raw[i, c]) - _ps_prob(ps_lm, hist, oracle.tokens[c]) * LN))
  assert max(err) <= 1.1e-4, max(err)


def test_normalisation_and_tail_formula(oracle, lm):
  h2, h1 = _token_contexts(oracle, np.random.default_rng(2), 1000)
  q = np.exp(np.asarray(oracle.log_probs(h2, h1), np.float64))
  assert q.shape == (1000, VP + 1)  # no <s> column: <s> is never predicted
  assert np.abs(q.sum(-1) - 1).max() <= 1e-5
  p, log_z = ngram.next_word_distribution(lm, lm.word_id("the"), lm.word_id("of"))
  assert p[lm.word_id("<s>")] == 0 and abs(p.sum() - 1) <= 1e-12 and 0.98 < np.exp(log_z) < 1.01
  # Raw Z (not 1: quantisation, backoff mass): [0.963, 1.014] on these 1,000 contexts, the
  # one-word contexts span [0.963, 1.018], and all 514k context pairs [0.645, 1.093] (0.19 %
  # outside [0.98, 1.01], e.g. "a supposed", whose stored backoff b2 is +2.66 nats).
  lz = np.asarray(oracle.log_probs(h2, h1, raw=True), np.float64)
  z_rand = np.exp(lz).sum(-1)
  assert 0.96 < z_rand.min() and z_rand.max() < 1.02, (z_rand.min(), z_rand.max())
  ctx_z = np.exp(oracle.host["ctx_log_z"])
  assert 0.64 < ctx_z.min() and ctx_z.max() < 1.1
  assert np.mean((ctx_z < .98) | (ctx_z > 1.01)) < 0.003
  words, n_in = oracle.host["rank_words"], oracle.num_inputs
  word = lambda t: lm.word_id("<s>") if t == oracle.bos_id else int(words[t])  # noqa: E731
  for i in (np.argmin(ctx_z), np.argmax(ctx_z)):  # the extremes equal brute force
    key = int(oracle.host["ctx_key"][i])
    _, log_z = ngram.next_word_distribution(lm, word(key % n_in), word(key // n_in))
    assert abs(log_z - oracle.host["ctx_log_z"][i]) <= 1e-12
  # float64 run of the same JAX code: exactly normalised, equal to brute force over 72,546 words
  with jax.enable_x64(True):
    t64 = ngram.OracleTables(**{f: jnp.asarray(oracle.host[f]) for f in ngram.OracleTables._fields})
    lq = np.asarray(ngram.oracle_log_probs(t64, h2[:200], h1[:200], max_bi=oracle.max_bi,
                                           max_tri=oracle.max_tri))
  assert lq.dtype == np.float64 and np.abs(np.exp(lq).sum(-1) - 1).max() <= 1e-12
  ref = np.stack([oracle.reference_log_probs(a, b) for a, b in zip(h2[:200], h1[:200])])
  assert np.abs(lq - ref).max() <= 1e-12


def test_tail_formula_vocab_8191(lm):
  o = ngram.NGramOracle(ngram.build_tables(lm, 8191), path=lm.path, compat="pocketsphinx", lm=lm)
  assert len(o.host["bi_col"]) == 1_258_173 and len(o.host["tri_col"]) == 1_521_039
  h2, h1 = _token_contexts(o, np.random.default_rng(3), 200)
  for a, b in zip(h2, h1):
    brute = o.reference_log_probs(a, b)
    formula = o.reference_log_probs(a, b, brute_force=False)
    assert np.abs(brute - formula).max() <= 1e-12


def test_oov_semantics(oracle, lm, ps_lm):
  other = oracle.other_id
  rng = np.random.default_rng(4)
  h = rng.integers(0, oracle.num_inputs, 64).astype(np.int32)
  # h1 = <other>: the unigram distribution, whatever h2.
  uni = np.asarray(oracle.log_probs(h, np.full(64, other, np.int32)))
  assert np.all(uni == uni[:1])
  np.testing.assert_allclose(uni[0], oracle.reference_log_probs(other, other), atol=2e-6)
  # h2 = <other>: the bigram distribution of h1, = h1 alone.
  bi = np.asarray(oracle.log_probs(np.full(64, other, np.int32), h))
  keys = set(oracle.host["ctx_key"].tolist())
  n_in = oracle.num_inputs
  x = np.array([next(a for a in range(VP) if a * n_in + b not in keys) for b in h], np.int32)
  np.testing.assert_array_equal(np.asarray(oracle.log_probs(x, h)), bi)  # no "x h1" = no h2
  for b, row in zip(h[:8], bi[:8]):
    np.testing.assert_allclose(row, oracle.reference_log_probs(other, b), atol=2e-6)
  # Both equal pocketsphinx called with an OOV string, as exact integers.
  head = oracle.tokens[:VP]
  w1 = oracle.tokens[int(h[0])] if h[0] != other else "the"
  for hist in ([w1, OOV], [OOV, w1], [OOV, OOV]):
    ours = np.array([ngram.score(lm, hist, w) for w in head])
    assert np.array_equal(ours, np.array([_ps_prob(ps_lm, hist, w) for w in head]))
  unigram = np.trunc(ngram.next_word_scores(lm)[oracle.host["rank_words"]]).astype(np.int64)
  assert np.array_equal(unigram, np.array([_ps_prob(ps_lm, [w1, OOV], w) for w in head]))


def test_jax_matches_float64_reference(oracle):
  h2, h1 = _token_contexts(oracle, np.random.default_rng(5), 1000)
  lp = np.asarray(oracle.log_probs(h2, h1))
  ref = np.stack([oracle.reference_log_probs(a, b) for a, b in zip(h2, h1)])
  assert np.abs(lp - ref).max() <= 2e-6
  # Padded / reshaped batches give the same rows.
  padded = np.asarray(oracle.log_probs(np.pad(h2, (0, 24)), np.pad(h1, (0, 24),
                                                                  constant_values=VP)))
  np.testing.assert_allclose(padded[:1000], lp, atol=1e-6)
  grid = np.asarray(oracle.log_probs(h2.reshape(10, 100), h1.reshape(10, 100)))
  np.testing.assert_allclose(grid.reshape(1000, -1), lp, atol=1e-6)
  # jit = eager.
  fn = lambda a, b: ngram.oracle_log_probs(oracle.tables(), a, b, max_bi=oracle.max_bi,  # noqa
                                            max_tri=oracle.max_tri)
  with jax.disable_jit():
    eager = np.asarray(fn(jnp.asarray(h2[:16]), jnp.asarray(h1[:16])))
  np.testing.assert_allclose(eager, lp[:16], atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(h2[:16], h1[:16])), lp[:16], atol=1e-6)
  # Inputs on a non-default device: the oracle runs there.
  dev = jax.devices()[-1]
  out = oracle.log_probs(jax.device_put(h2[:16], dev), jax.device_put(h1[:16], dev))
  assert out.devices() == {dev}
  np.testing.assert_allclose(np.asarray(out), lp[:16], atol=1e-6)


# ----------------------------------------------------------------------------- sampling, cache


def _max_z(draws, q, n_min=10.0):
  """Largest |frequency - q| / SE over tokens with expected count >= n_min and the lumped rest."""
  n = len(draws)
  freq = np.bincount(draws, minlength=len(q)) / n
  big = q * n >= n_min
  f = np.append(freq[big], freq[~big].sum())
  p = np.append(q[big], q[~big].sum())
  return float(np.max(np.abs(f - p) / np.sqrt(p * (1 - p) / n)))


def test_next_token_frequencies(oracle):
  b, o = oracle.bos_id, oracle.other_id
  key = oracle.host["ctx_key"][12345]
  contexts = [(b, b), (int(key // oracle.num_inputs), int(key % oracle.num_inputs)), (o, 3)]
  for i, (h2, h1) in enumerate(contexts):
    draws = np.asarray(oracle.sample_next(jax.random.key(i), h2, h1, 100_000))
    q = np.exp(oracle.reference_log_probs(h2, h1))
    assert _max_z(draws, q) <= 5, (h2, h1)


def test_sentences(oracle):
  s = oracle.sample(jax.random.key(0), 2000, 24)
  toks, mask, lengths = (np.asarray(a) for a in s)
  assert toks.shape == mask.shape == (2000, 24) and toks.dtype == np.int32
  assert np.all((toks >= 0) & (toks <= VP))  # never <s>
  assert np.array_equal(mask, np.arange(24) < lengths[:, None])
  eos = toks == oracle.eos_id
  first_eos = np.where(eos.any(-1), eos.argmax(-1) + 1, 24)
  assert np.array_equal(first_eos, lengths)  # ends at the first </s> or at max_len
  assert np.all(toks[~mask] == oracle.eos_id)
  # Nothing precedes <s> (no n-gram of the file ends in <s>): (x, <s>) = sentence start for all x.
  start = np.asarray(oracle.log_probs(np.arange(oracle.num_inputs), oracle.bos_id))
  assert np.all(start == start[:1])
  q0 = np.exp(oracle.reference_log_probs(oracle.bos_id, oracle.bos_id))
  assert _max_z(toks[:, 0], q0) <= 5  # first tokens ~ Q(. | <s>)
  assert 8 < lengths.mean() < 20
  text = oracle.sentences(s)
  assert len(text) == 2000 and "<s>" not in " ".join(text)
  assert oracle.decode([0, VP, VP + 1]) == ["</s>", "<other>", "<s>"]
  cont = oracle.sample(jax.random.key(1), 4, 5, h2=oracle.bos_id, h1=oracle.tokens.index("the"))
  assert cont.tokens.shape == (4, 5)
  with pytest.raises(ValueError, match="context tokens"):
    oracle.log_probs(np.array([0]), np.array([VP + 2]))


def test_cache_roundtrip(oracle, cache_dir, monkeypatch):
  files = list(cache_dir.iterdir())
  assert len(files) == 1 and files[0].suffix == ".npz"

  def no_parse(*a, **k):
    raise AssertionError("read_trie must not run on a cache hit")

  monkeypatch.setattr(ngram, "read_trie", no_parse)
  again = ngram.ngram_oracle(VP, cache_dir=cache_dir)
  for k in ngram.OracleTables._fields:
    np.testing.assert_array_equal(again.host[k], oracle.host[k])
  assert again.tokens == oracle.tokens
  monkeypatch.setenv("KDJAX_CACHE", str(cache_dir))
  assert ngram.default_cache_dir() == cache_dir
  assert oracle.tokens[0] == "</s>" and len(oracle.tokens) == VP + 2
