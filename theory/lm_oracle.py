"""Checks of the pretrained trigram LM used as an exact oracle/teacher (experiments.ngram).

The oracle is CMU's US-English trigram LM from the ``pocketsphinx`` wheel, read from its binary
trie by kdjax's own reader and reduced to the top-V' words + an ``<other>`` bucket. These checks
compare the jitted JAX oracle with pocketsphinx's own ``NGramModel.prob`` (the authors' scorer)
and check that every renormalised distribution is a distribution. Write-up: lm_oracle.md.
"""

from __future__ import annotations

import functools

import numpy as np

from theory.registry import Result, register

_DOC = "lm_oracle.md"
VP = 2047
N_CONTEXTS = 1000


@functools.lru_cache(maxsize=1)
def _oracle():
  from experiments import ngram  # pylint: disable=import-outside-toplevel
  return ngram.ngram_oracle(VP)


def _contexts(o, n, seed):
  """n random (h2, h1) token contexts, drawn from oracle sentences (realistic trigram contexts)
  mixed with uniform random token pairs, `<s>` and `<other>` (an OOV word) included."""
  import jax  # pylint: disable=import-outside-toplevel
  s = o.sample(jax.random.PRNGKey(seed), num=n // 4, max_len=16)
  toks, mask = np.asarray(s.tokens), np.asarray(s.mask)
  rng = np.random.default_rng(seed)
  bos = o.bos_id
  seq = np.concatenate([np.full((toks.shape[0], 2), bos), toks], axis=1)
  pairs = []
  for b in range(toks.shape[0]):
    t = rng.integers(0, max(int(mask[b].sum()), 1))
    pairs.append((seq[b, t], seq[b, t + 1]))
  while len(pairs) < n:
    pairs.append((rng.integers(0, o.num_inputs), rng.integers(0, o.num_outputs)))
  h = np.asarray(pairs, np.int32)
  return h[:, 0], h[:, 1]


@register("lm_oracle.matches_pocketsphinx",
          source="[paper] pocketsphinx NGramModel.prob (cmusphinx/pocketsphinx 5.1.1)",
          statement="JAX oracle raw scores (s ln 1.0001) equal pocketsphinx's integer scores "
                    "within 1.1e-4 nats on 1000 random contexts x 5 head words (truncation < 1 "
                    "unit of base 1.0001 + float32 rounding)",
          doc=f"{_DOC}#agreement")
def _matches_pocketsphinx():
  import pocketsphinx  # pylint: disable=import-outside-toplevel
  from experiments import ngram  # pylint: disable=import-outside-toplevel
  o = _oracle()
  ps = pocketsphinx.NGramModel.readfile(str(o.path))
  h2, h1 = _contexts(o, N_CONTEXTS, seed=0)
  raw = np.asarray(o.log_probs(h2, h1, raw=True), np.float64)
  rng = np.random.default_rng(1)
  oov = "zzqx"
  word = lambda i: oov if i == o.other_id else o.tokens[i]  # noqa: E731
  worst = 0.0
  for b in range(len(h1)):
    hist = [word(int(h1[b])), word(int(h2[b]))]     # pocketsphinx: most recent first
    for w in rng.integers(0, VP, 5):
      want = ps.prob([o.tokens[int(w)]] + hist) * ngram.LN_BASE
      worst = max(worst, abs(raw[b, int(w)] - want))
  return Result(measured=worst, tolerance=1.1e-4,
                detail=f"{N_CONTEXTS * 5} queries, max |error| {worst:.3g} nats")


@register("lm_oracle.normalised",
          source="[proposed] renormalised top-V' + tail reduction",
          statement="every renormalised oracle distribution Q(.|h2,h1) over V'+1 tokens sums to "
                    "1 within 1e-5 (float32) and gives <s> no mass, on 1000 random contexts",
          doc=f"{_DOC}#normalisation")
def _normalised():
  o = _oracle()
  h2, h1 = _contexts(o, N_CONTEXTS, seed=2)
  lp = np.asarray(o.log_probs(h2, h1), np.float64)
  err = float(np.max(np.abs(np.exp(lp).sum(-1) - 1.0)))
  if lp.shape[-1] != VP + 1:          # <s> is input only: no output column at all
    err = float("inf")
  return Result(measured=err, tolerance=1e-5, detail=f"max |sum - 1| = {err:.3g}")
