r"""CMU's pretrained US-English trigram LM (from the ``pocketsphinx`` wheel) as an exact oracle.

What it is
----------
``pocketsphinx`` 5.1.1 (PyPI, BSD-2) ships ``pocketsphinx/model/en-us/en-us.lm.bin``: a real
pretrained trigram back-off LM (72,547 words, 2,051,547 bigram slots, 1,669,625 trigrams) in
pocketsphinx's binary trie format. This module reads that file with numpy (no pocketsphinx code
runs), scores it exactly like pocketsphinx, and turns it into a small-vocabulary *oracle* (a known
true distribution over token sequences) that a JAX student can be distilled from:

* :func:`read_trie` -> :class:`TrieLM`: the file's tables decoded from its bit arrays, with
  layout and structure checks (a malformed file raises ``ValueError``).
* :func:`score` / :func:`next_word_scores` / :func:`next_word_distribution`: numpy references.
  ``score`` returns pocketsphinx's integer score (``NGramModel.prob``) exactly.
* :func:`ngram_oracle` -> :class:`NGramOracle`: the top-``V'`` words plus a tail bucket, a jitted
  JAX ``log_probs(h2, h1) -> [B, V'+1]``, a ``lax.scan`` sampler and ``decode``.

Units
-----
pocketsphinx stores every score in *logmath units of base 1.0001*: ``v = log10(p) / log10(1.0001)``,
so ``ln p = v * ln(1.0001) = v * 9.99950003e-5`` (:data:`LN_BASE`). The base is not stored in the
file; pocketsphinx's ``NGramModel.prob`` returns these units truncated toward zero to an ``int32``,
so a natural-log comparison with pocketsphinx has a tolerance of < 1 unit (1.0e-4 nats) plus
float32 rounding: 1.1e-4 nats. :class:`TrieLM` keeps the file's units; the oracle works in nats.

Score rule (history ``h1`` = most recent word, ``h2`` the one before; float32 arithmetic in this
order, then C ``(int32)`` truncation): no history -> ``U(w)``; ``h1`` -> ``B(h1,w)`` if the bigram
node exists else ``U(w)+b1(h1)``; ``(h2,h1)`` -> ``T(h2,h1,w)`` if the trigram exists, else
``B(h1,w)+b2(h2,h1)`` if the bigram node exists, else ``(U(w)+b1(h1))+b2(h2,h1)``, where
``b2 = 0`` when the bigram "h2 h1" is absent. The history is cut at its first out-of-vocabulary
word (counting back from ``h1``); an OOV predicted word scores logmath zero, -536,870,912.

File format [paper]
-------------------
As read in cmusphinx/pocketsphinx ``src/lm/ngram_model_trie.c``, ``lm_trie.c``,
``lm_trie_quant.c`` and ``bitarr.c`` (v5.1.1); this reader is written from that description. All
little-endian: the 19-byte ASCII magic ``"Trie Language Model"``, ``uint8`` order n, n ``uint32``
counts, an ``int32`` (former quantisation type, ignored), ``float32`` 16-bit codebooks (n-2 pairs
of [prob 65,536, backoff 65,536], then prob 65,536 for order n), ``c1+1`` unigram records
{``float32`` prob, ``float32`` backoff, ``uint32`` next} (the last one a sentinel), the bigram bit
array (``(1+c2) * 70`` bits + 8 padding bytes; per entry LSB-first: word 17 bits, backoff code 16,
prob code 16, next 21), the trigram bit array (``(1+c3) * 33`` bits + 8 bytes: word 17, prob code
16), then an ``int32`` byte count and the ``c1`` NUL-terminated words (word id = position). Field
widths are bit lengths: word = ``bitlen(c1)``, next = ``bitlen(c3)``.

The trie is *reversed* (KenLM style): unigram ``w`` is the predicted word; its children
``[next(w), next(w+1))`` are the bigram nodes "h1 w" (sorted by ``h1``); a bigram node's children
are the trigrams "h2 h1 w" (sorted by ``h2``). The context backoff ``b2(h2, h1)`` is the backoff
of the node under root ``h1`` with child ``h2``. Dummy bigram nodes (inserted above trigrams whose
bigram is missing, prob = quantised ``U(w)+b1(h1)``) are read as ordinary entries, which
reproduces pocketsphinx. Quirks of the shipped file that :func:`read_trie` records: only 2,051,541
of the 2,051,547 header bigram slots are used; two trigram child ranges are unsorted, so
pocketsphinx's interpolation search misses "whips and bullhorns" and "<s> and jerri".
``compat="pocketsphinx"`` (default) drops the trigram entries that search cannot reach (found by
replaying the search on the unsorted ranges); ``compat="file"`` keeps every stored entry.

Reduced vocabulary [proposed]
-----------------------------
Words are ranked by unigram probability, ``<s>`` excluded (``</s>`` is rank 0, P = 0.0748). With
``V'`` = ``vocab_size``: ids ``0..V'-1`` are the top-``V'`` words in rank order (``</s>`` = 0),
``V'`` is ``<other>`` (the tail bucket: every other word except ``<s>``), ``V'+1`` is ``<s>``
(input only). Outputs have ``V'+1`` entries, inputs ``V'+2``. For a context ``h = (h2, h1)``

    Q(w | h) = exp(s(w|h)) / Z(h)  (w in the top V'),   Q(<other> | h) = tail(h) / Z(h),

with ``s`` the score rule in nats, ``tail(h)`` the summed ``exp(s)`` of all tail words and ``Z(h)``
the sum over all words except ``<s>`` (not 1 because of quantisation and backoff mass, see
Accuracy, so the oracle renormalises exactly). ``<other>`` in a context is an out-of-vocabulary
word, exactly as pocketsphinx treats one: ``h1 = <other>`` gives the unigram distribution and
``h2 = <other>`` the bigram distribution of ``h1``; the result is a Markov chain of order 2 over
tokens. The tail mass is exact without a full-vocabulary pass: with sums over tail words,
``U_tail = sum exp(U)``, ``S_U(h1)`` / ``S_B(h1)`` = sums of ``exp(U(w))`` / ``exp(B(h1,w))`` over
bigram nodes "h1 w", ``S_TB(h2,h1)`` / ``S_T(h2,h1)`` = sums of ``exp(B(h1,w))`` / ``exp(T)`` over
trigrams "h2 h1 w"::

    tail(h) = exp(b2) * [exp(b1(h1)) * (U_tail - S_U(h1)) + S_B(h1) - S_TB(h2,h1)] + S_T(h2,h1)

(precomputed per context in float64 on the host; ``tail = U_tail`` for a unigram context).
The same formula summed over all words but ``<s>`` gives ``Z(h)``, so the JAX ``log_probs`` adds
one host-computed float64 offset (``-log Z`` folded in) to each stored value instead of running a
float32 logsumexp: errors ~1 float32 ulp (max 1.2e-6) instead of 1.7e-6. Pairs ``(h2, h1)`` with
neither a bigram "h2 h1" nor a trigram equal the one-word context ``h1`` (``b2 = 0``).
Nothing precedes ``<s>``: the file has no n-gram ending in ``<s>``, so ``(x, <s>)`` is the
sentence-start context for any ``x``; the sampler starts from ``(<s>, <s>)`` and draws each
token by inverse CDF (one ``jax.random.uniform`` per draw) inside a ``lax.scan``.

Typical use::

  from experiments import ngram
  oracle = ngram.ngram_oracle(vocab_size=2047)           # cached tables, ~0.05 s
  lp = oracle.log_probs(h2, h1)                          # [B, 2048] float32, natural log
  s = oracle.sample(jax.random.key(0), num=256, max_len=64)
  print(oracle.sentences(s)[:3])
  ngram.score(ngram.read_trie(), ["of", "the"], "cat")   # -81761, = NGramModel.prob(
                                                         #   ["cat", "the", "of"])

Accuracy [measured on the shipped LM]
-------------------------------------
``score`` equals ``NGramModel.prob`` on 6,000 / 6,000 mixed queries and on all 72,547 words of
3 contexts (max |float32 score - prob| 0.996 units). The JAX oracle in raw mode is within 1.002e-4
nats of ``prob * ln(1.0001)`` (45,840 queries, bound 1.1e-4); normalised, it is within 1.2e-6 of
the float64 brute force (1,000 contexts) and each row sums to 1 within 2.4e-7. Raw ``Z(h)``: the
one-word contexts span [0.963, 1.018]; over all 514k context pairs [0.645, 1.093] (0.19 % outside
[0.98, 1.01]; the extremes have a stored backoff ``b2`` of +2.66 nats).

Memory and speed (2-core CPU, V' = 2,047)
-----------------------------------------
Parsing the 27 MB file takes 0.9-1.3 s (the :class:`TrieLM` arrays hold ~78 MB); building the
oracle tables from it ~1.9 s more, so :func:`ngram_oracle` caches them as ``.npz`` (52 MB, float64
host tables) in ``cache_dir`` (default ``$KDJAX_CACHE``, else ``~/.cache/kdjax``), keyed by the
file's size and mtime, ``V'`` and ``compat``: first call 2.8 s, cached 0.05 s (plus a one-off
1-2 s JAX compile per batch shape). Device tables: 29 MB float32/int32. ``log_probs`` costs
``O(B * (V' + max row degrees))``: ~10 ms for B = 256; sampling 256 sentences of 64 tokens takes
0.5-0.9 s. Samples at V' = 2,047 (4,000 sentences): mean length 15.6 tokens incl. ``</s>``
(median 11, 10 % longer than 32), 8.9 % ``<other>``, next-token entropy 4.14 nats.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LN_BASE", "LOGMATH_ZERO", "TrieLM", "default_lm_path", "read_trie", "logmath_to_ln",
    "score", "score_ids", "next_word_scores", "next_word_distribution",
    "build_tables", "OracleTables", "oracle_log_probs", "NGramOracle", "Samples", "ngram_oracle",
    "default_cache_dir",
]

LN_BASE = float(np.log(1.0001))       # nats per logmath unit (base 1.0001)
LOG10_BASE = float(np.log10(1.0001))  # log10 per logmath unit
LOGMATH_ZERO = -536_870_912           # pocketsphinx's score of an out-of-vocabulary word
MAGIC = b"Trie Language Model"
CODEBOOK_SIZE = 1 << 16
_COMPAT = ("pocketsphinx", "file")


def logmath_to_ln(x):
  """Logmath units (base 1.0001) -> natural log (float64)."""
  return np.asarray(x, np.float64) * LN_BASE


def default_lm_path() -> pathlib.Path:
  """``en-us.lm.bin`` inside the installed ``pocketsphinx`` package (located without importing it).

  Raises ``FileNotFoundError`` if the package (``pip install pocketsphinx==5.1.1``) is missing.
  """
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("pocketsphinx")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("The pocketsphinx package is not installed: `pip install "
                            "pocketsphinx==5.1.1` (its wheel ships model/en-us/en-us.lm.bin).")
  for loc in spec.submodule_search_locations:
    p = pathlib.Path(loc) / "model" / "en-us" / "en-us.lm.bin"
    if p.is_file():
      return p
  raise FileNotFoundError("No model/en-us/en-us.lm.bin under "
                          f"{list(spec.submodule_search_locations)}")


# ----------------------------------------------------------------------------- the file

@dataclasses.dataclass(frozen=True, eq=False)
class TrieLM:
  """A pocketsphinx binary trigram trie, decoded. Scores are in logmath units (base 1.0001).

  Stored tables (as the file stores them, entries beyond the used counts dropped):

  * ``words`` [c1] str: word id = position (byte-sorted; ``</s>`` = 6, ``<s>`` = 7 here).
  * ``unigram_prob``, ``unigram_backoff`` [c1] float32: ``U(w)``, ``b1(w)``;
    ``unigram_next`` [c1+1] int64: bigram children of root ``w`` are ``[next[w], next[w+1])``.
  * ``bigram_word`` [n2] int32: the child word ``h1`` of bigram node "h1 w";
    ``bigram_prob`` / ``bigram_backoff`` [n2] float32 (codebook values: ``B(h1,w)`` and the
    backoff of "h1 w"); ``bigram_next`` [n2+1] int64: trigram children ``[next[j], next[j+1])``.
  * ``trigram_word`` [n3] int32: the word ``h2`` of trigram "h2 h1 w"; ``trigram_prob`` [n3].

  Derived: ``bigram_root`` [n2] (the predicted word ``w`` of each bigram node),
  ``trigram_parent`` [n3] (its bigram node), ``trigram_reachable`` [n3] bool (False for the
  entries pocketsphinx's search cannot find), ``unsorted_trigram_ranges`` (bigram nodes whose
  trigram words are not strictly increasing). ``counts`` are the header counts, ``offsets`` the
  byte offsets of the sections, ``quant_type`` the ignored header ``int32``.
  """

  path: str
  file_size: int
  order: int
  counts: tuple[int, ...]
  quant_type: int
  offsets: dict
  codebooks: tuple[np.ndarray, ...]
  words: np.ndarray
  unigram_prob: np.ndarray
  unigram_backoff: np.ndarray
  unigram_next: np.ndarray
  bigram_word: np.ndarray
  bigram_prob: np.ndarray
  bigram_backoff: np.ndarray
  bigram_next: np.ndarray
  trigram_word: np.ndarray
  trigram_prob: np.ndarray
  bigram_root: np.ndarray
  trigram_parent: np.ndarray
  trigram_reachable: np.ndarray
  unsorted_trigram_ranges: np.ndarray

  @property
  def num_words(self) -> int:
    return len(self.words)

  @property
  def unigram_ln(self) -> np.ndarray:
    """``U(w)`` as natural logs (float64)."""
    return logmath_to_ln(self.unigram_prob)

  @property
  def unigram_log10(self) -> np.ndarray:
    """``U(w)`` as log10 (float64), the units of the ARPA file it was built from."""
    return np.asarray(self.unigram_prob, np.float64) * LOG10_BASE

  @functools.cached_property
  def vocab(self) -> dict[str, int]:
    """word -> id (case-sensitive)."""
    return {w: i for i, w in enumerate(self.words.tolist())}

  def word_id(self, word: str) -> int | None:
    """The id of ``word``, or None if it is out of vocabulary."""
    return self.vocab.get(word)

  @functools.cached_property
  def _by_child(self):
    """Bigram entries grouped by child word ``h1``: (order, ptr [c1+1])."""
    order = np.argsort(self.bigram_word, kind="stable")
    ptr = np.searchsorted(self.bigram_word[order], np.arange(self.num_words + 1))
    return order, ptr

  @functools.cached_property
  def _tri_by_context(self):
    """Trigram entries sorted by key ``h1 * c1 + h2``: (order, sorted keys)."""
    key = (self.bigram_word[self.trigram_parent].astype(np.int64) * self.num_words
           + self.trigram_word)
    order = np.argsort(key, kind="stable")
    return order, key[order]

  def find_bigram(self, root: int, child: int) -> int | None:
    """Index of bigram node "child root" (history word ``child``, predicted ``root``), or None."""
    a, b = int(self.unigram_next[root]), int(self.unigram_next[root + 1])
    i = a + int(np.searchsorted(self.bigram_word[a:b], child))
    return i if i < b and self.bigram_word[i] == child else None

  def find_trigram(self, node: int, h2: int, compat: str = "pocketsphinx") -> int | None:
    """Index of the trigram with word ``h2`` under bigram node ``node``, or None."""
    a, b = int(self.bigram_next[node]), int(self.bigram_next[node + 1])
    hits = a + np.flatnonzero(self.trigram_word[a:b] == h2)
    if compat == "pocketsphinx":
      hits = hits[self.trigram_reachable[hits]]
    return int(hits[0]) if len(hits) else None


def _bitlen(x: int) -> int:
  return int(x).bit_length()


def _read_field(arr: np.ndarray, bit_offsets: np.ndarray, width: int) -> np.ndarray:
  """LSB-first bit-stream field of ``width`` bits at each of ``bit_offsets`` (uint64 out)."""
  byte = (bit_offsets >> 3).astype(np.int64)
  shift = (bit_offsets & 7).astype(np.uint64)
  nbytes = 4 if width + 7 <= 32 else 8
  gathered = arr[byte[:, None] + np.arange(nbytes)]
  raw = gathered.view("<u4" if nbytes == 4 else "<u8")[:, 0].astype(np.uint64)
  return (raw >> shift) & np.uint64((1 << width) - 1)


def _uniform_find(keys: np.ndarray, begin: int, end: int, max_vocab: int, key: int) -> int | None:
  """Replays pocketsphinx's interpolation search (``lm_trie.c::uniform_find``) on ``keys``.

  The search keeps ``before_v < key < after_v`` and probes ``before + 1 + (uint32)((float)(key -
  before_v) / (after_v - before_v) * (after - before - 1))`` in float32. Returns the index found
  or None; on an unsorted range it can miss a stored key.
  """
  f32 = np.float32
  before_it, before_v, after_it, after_v = begin - 1, 0, end, max_vocab
  if key > after_v:
    return None
  while after_it - before_it > 1:
    frac = f32(f32(key - before_v) / f32(after_v - before_v))
    pivot = before_it + 1 + int(f32(frac * f32(after_it - before_it - 1)))
    mid = int(keys[pivot])
    if mid < key:
      before_it, before_v = pivot, mid
    elif mid > key:
      after_it, after_v = pivot, mid
    else:
      return pivot
  return None


def read_trie(path: str | os.PathLike | None = None) -> TrieLM:
  """Reads a pocketsphinx binary trigram trie (default: the LM shipped in the pocketsphinx wheel).

  Checks, each raising ``ValueError`` with what was wrong: the magic string, order 3, every section
  inside the file and the last one ending exactly at EOF, ``c1`` unique NUL-terminated words,
  unigram ``next`` starting at 0 and non-decreasing, bigram ``next`` non-decreasing over the used
  entries and ending inside the trigram array, word fields in ``[0, c1)``, and bigram children
  strictly increasing within every range. Unsorted trigram ranges are allowed (the shipped file
  has 2) and recorded in ``unsorted_trigram_ranges`` / ``trigram_reachable``.
  """
  path = pathlib.Path(path) if path is not None else default_lm_path()
  buf = np.fromfile(path, dtype=np.uint8)
  size = len(buf)

  def need(end, what):
    if end > size:
      raise ValueError(f"{path}: truncated file: {what} ends at byte {end}, file has {size} bytes")

  need(len(MAGIC) + 1, "header")
  if buf[:len(MAGIC)].tobytes() != MAGIC:
    raise ValueError(f"{path}: not a pocketsphinx trie LM (magic {buf[:len(MAGIC)].tobytes()!r}, "
                     f"expected {MAGIC!r})")
  off = len(MAGIC)
  order = int(buf[off])
  off += 1
  if order != 3:
    raise ValueError(f"{path}: order {order}; only trigram tries (order 3) are supported")
  need(off + 4 * order + 4, "counts")
  counts = tuple(int(c) for c in buf[off:off + 4 * order].view("<u4"))
  off += 4 * order
  quant_type = int(buf[off:off + 4].view("<i4")[0])
  off += 4
  c1, c2, c3 = counts
  if min(counts) < 1:
    raise ValueError(f"{path}: counts {counts} must be positive")
  offsets = {"counts": len(MAGIC) + 1, "quant_type": off - 4, "codebooks": off}

  n_books = 2 * (order - 2) + 1
  need(off + 4 * n_books * CODEBOOK_SIZE, "codebooks")
  books = buf[off:off + 4 * n_books * CODEBOOK_SIZE].view("<f4").reshape(n_books, CODEBOOK_SIZE)
  bi_prob_book, bi_bo_book, tri_prob_book = books[0], books[1], books[2]
  off += 4 * n_books * CODEBOOK_SIZE

  offsets["unigrams"] = off
  need(off + 12 * (c1 + 1), "unigrams")
  uni = buf[off:off + 12 * (c1 + 1)].reshape(c1 + 1, 12)
  unigram_prob = uni[:, 0:4].copy().view("<f4")[:c1, 0].astype(np.float32)
  unigram_backoff = uni[:, 4:8].copy().view("<f4")[:c1, 0].astype(np.float32)
  unigram_next = uni[:, 8:12].copy().view("<u4")[:, 0].astype(np.int64)
  off += 12 * (c1 + 1)

  wb = _bitlen(c1)
  nb = _bitlen(c3)
  b2 = wb + 32 + nb
  b3 = wb + 16
  offsets["bigrams"] = off
  bi_bytes = ((1 + c2) * b2 + 7) // 8 + 8
  need(off + bi_bytes, "bigram bit array")
  bi_arr = buf[off:off + bi_bytes]
  off += bi_bytes
  offsets["trigrams"] = off
  tri_bytes = ((1 + c3) * b3 + 7) // 8 + 8
  need(off + tri_bytes, "trigram bit array")
  tri_arr = buf[off:off + tri_bytes]
  off += tri_bytes

  offsets["words"] = off
  need(off + 4, "word-table size")
  k = int(buf[off:off + 4].view("<i4")[0])
  off += 4
  if k < 0:
    raise ValueError(f"{path}: negative word-table size {k}")
  need(off + k, "word table")
  if off + k != size:
    raise ValueError(f"{path}: the word table ends at byte {off + k} but the file has {size} bytes")
  raw_words = buf[off:off + k].tobytes()
  if not raw_words.endswith(b"\0"):
    raise ValueError(f"{path}: the word table is not NUL-terminated")
  try:
    words = raw_words[:-1].decode("utf-8").split("\0")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: the word table is not UTF-8: {e}") from None
  if len(words) != c1:
    raise ValueError(f"{path}: {len(words)} words in the word table, header says {c1}")
  if len(set(words)) != c1:
    raise ValueError(f"{path}: the word table has duplicate words")

  # Structure: unigram -> bigram pointers.
  if unigram_next[0] != 0 or np.any(np.diff(unigram_next) < 0):
    raise ValueError(f"{path}: unigram `next` pointers must start at 0 and be non-decreasing")
  n2 = int(unigram_next[c1])
  if n2 > c2:
    raise ValueError(f"{path}: unigram sentinel next {n2} exceeds the bigram count {c2}")

  # Bigram bit array: the n2 used entries plus the entry holding the final `next`.
  pos = np.arange(n2 + 1, dtype=np.int64) * b2
  bigram_word = _read_field(bi_arr, pos, wb).astype(np.int64)[:n2]
  bigram_backoff = bi_bo_book[_read_field(bi_arr, pos + wb, 16).astype(np.int64)[:n2]]
  bigram_prob = bi_prob_book[_read_field(bi_arr, pos + wb + 16, 16).astype(np.int64)[:n2]]
  bigram_next = _read_field(bi_arr, pos + wb + 32, nb).astype(np.int64)
  if bigram_next[0] != 0 or np.any(np.diff(bigram_next) < 0):
    raise ValueError(f"{path}: bigram `next` pointers must start at 0 and be non-decreasing")
  n3 = int(bigram_next[n2])
  if n3 > c3:
    raise ValueError(f"{path}: bigram sentinel next {n3} exceeds the trigram count {c3}")
  if n2 and bigram_word.max() >= c1:
    raise ValueError(f"{path}: a bigram word id is >= the vocabulary size {c1}")
  bigram_root = np.repeat(np.arange(c1, dtype=np.int32), np.diff(unigram_next))
  if n2 > 1:
    same = bigram_root[1:] == bigram_root[:-1]
    if np.any(same & (bigram_word[1:] <= bigram_word[:-1])):
      raise ValueError(f"{path}: bigram children are not strictly increasing within a range")

  pos = np.arange(n3, dtype=np.int64) * b3
  trigram_word = _read_field(tri_arr, pos, wb).astype(np.int64)
  trigram_prob = tri_prob_book[_read_field(tri_arr, pos + wb, 16).astype(np.int64)]
  if n3 and trigram_word.max() >= c1:
    raise ValueError(f"{path}: a trigram word id is >= the vocabulary size {c1}")
  trigram_parent = np.repeat(np.arange(n2, dtype=np.int32), np.diff(bigram_next))
  reachable = np.ones(n3, bool)
  if n3 > 1:
    bad = (trigram_parent[1:] == trigram_parent[:-1]) & (trigram_word[1:] <= trigram_word[:-1])
    unsorted = np.unique(trigram_parent[1:][bad])
  else:
    unsorted = np.zeros(0, np.int32)
  for j in unsorted:  # replay pocketsphinx's search on the unsorted ranges (2 in the shipped file)
    a, b = int(bigram_next[j]), int(bigram_next[j + 1])
    for t in range(a, b):
      reachable[t] = _uniform_find(trigram_word, a, b, c1, int(trigram_word[t])) == t

  return TrieLM(
      path=str(path), file_size=size, order=order, counts=counts, quant_type=quant_type,
      offsets=offsets, codebooks=tuple(np.array(b) for b in books),
      words=np.array(words), unigram_prob=unigram_prob, unigram_backoff=unigram_backoff,
      unigram_next=unigram_next, bigram_word=bigram_word.astype(np.int32),
      bigram_prob=bigram_prob.astype(np.float32), bigram_backoff=bigram_backoff.astype(np.float32),
      bigram_next=bigram_next, trigram_word=trigram_word.astype(np.int32),
      trigram_prob=trigram_prob.astype(np.float32), bigram_root=bigram_root,
      trigram_parent=trigram_parent, trigram_reachable=reachable,
      unsorted_trigram_ranges=unsorted.astype(np.int32))


# ----------------------------------------------------------------------------- numpy references

def _check_compat(compat):
  if compat not in _COMPAT:
    raise ValueError(f"compat must be one of {_COMPAT}, got {compat!r}")


def _history_ids(lm: TrieLM, history_words: Sequence[str]) -> tuple[int | None, int | None]:
  """(h1, h2) ids of a history given oldest-first; cut at the first OOV word back from h1."""
  hist = list(history_words)[::-1][:lm.order - 1]
  ids: list[int] = []
  for w in hist:
    i = lm.word_id(w)
    if i is None:
      break
    ids.append(i)
  ids += [None] * (2 - len(ids))
  return ids[0], ids[1]


def _context_backoff(lm: TrieLM, h2: int, h1: int) -> np.float32:
  """``b2(h2, h1)``: backoff of bigram "h2 h1" (node under root h1, child h2), 0 if absent."""
  j = lm.find_bigram(h1, h2)
  return np.float32(0.0) if j is None else lm.bigram_backoff[j]


def score_ids(lm: TrieLM, word: int, h1: int | None = None, h2: int | None = None, *,
              compat: str = "pocketsphinx") -> np.float32:
  """The float32 score (logmath units) of word id ``word`` after ids ``h1`` (latest), ``h2``."""
  _check_compat(compat)
  f32 = np.float32
  u = lm.unigram_prob[word]
  if h1 is None:
    return u
  j = lm.find_bigram(word, h1)
  if h2 is None:
    return lm.bigram_prob[j] if j is not None else f32(u + lm.unigram_backoff[h1])
  if j is not None:
    t = lm.find_trigram(j, h2, compat)
    if t is not None:
      return lm.trigram_prob[t]
    return f32(lm.bigram_prob[j] + _context_backoff(lm, h2, h1))
  return f32(f32(u + lm.unigram_backoff[h1]) + _context_backoff(lm, h2, h1))


def score(lm: TrieLM, history_words: Sequence[str], word: str, *, compat: str = "pocketsphinx",
          as_int: bool = True):
  """pocketsphinx's score of ``word`` after ``history_words`` (oldest first: ``["of", "the"]``).

  ``as_int=True`` returns the ``int`` that ``NGramModel.prob([word, *reversed(history)])`` returns
  (float32 arithmetic, truncation toward zero); ``as_int=False`` the float32 before truncation.
  Only the last 2 history words count, cut at the first OOV word counting back from the most
  recent; an OOV ``word`` gives :data:`LOGMATH_ZERO`. Multiply by :data:`LN_BASE` for nats.
  """
  w = lm.word_id(word)
  if w is None:
    return LOGMATH_ZERO if as_int else np.float32(LOGMATH_ZERO)
  h1, h2 = _history_ids(lm, history_words)
  s = score_ids(lm, w, h1, h2, compat=compat)
  return int(np.trunc(s)) if as_int else s


def next_word_scores(lm: TrieLM, h1: int | None = None, h2: int | None = None, *,
                     compat: str = "pocketsphinx", dtype=np.float32) -> np.ndarray:
  """Scores of every word id after the history ids (``h1`` most recent), in logmath units.

  ``dtype=np.float32`` follows pocketsphinx's float32 arithmetic (``trunc`` of the result equals
  ``NGramModel.prob`` for every word); ``np.float64`` does the same sums in float64 on the stored
  float32 values (the oracle's reference arithmetic). ``h2`` is ignored when ``h1`` is None.
  """
  _check_compat(compat)
  u = lm.unigram_prob.astype(dtype)
  if h1 is None:
    return u
  b1 = dtype(lm.unigram_backoff[h1])
  b2 = dtype(0.0) if h2 is None else dtype(_context_backoff(lm, h2, h1))
  s = (u + b1) + b2
  order, ptr = lm._by_child  # pylint: disable=protected-access
  nodes = order[ptr[h1]:ptr[h1 + 1]]
  s[lm.bigram_root[nodes]] = lm.bigram_prob[nodes].astype(dtype) + b2
  if h2 is not None:
    torder, tkeys = lm._tri_by_context  # pylint: disable=protected-access
    key = h1 * lm.num_words + h2
    t = torder[np.searchsorted(tkeys, key):np.searchsorted(tkeys, key, side="right")]
    if compat == "pocketsphinx":
      t = t[lm.trigram_reachable[t]]
    s[lm.bigram_root[lm.trigram_parent[t]]] = lm.trigram_prob[t].astype(dtype)
  return s


def next_word_distribution(lm: TrieLM, h1: int | None = None, h2: int | None = None, *,
                           compat: str = "pocketsphinx") -> tuple[np.ndarray, float]:
  """(P [c1] float64, raw Z): ``exp(s ln 1.0001) / Z`` over every word but ``<s>`` (P(<s>) = 0).

  ``Z`` is the raw sum of the scores' probabilities over those words (not 1: quantisation and
  backoff mass; [0.98, 1.01] on the shipped LM).
  """
  s = next_word_scores(lm, h1, h2, compat=compat, dtype=np.float64) * LN_BASE
  bos = lm.word_id("<s>")
  if bos is not None:
    s[bos] = -np.inf
  m = s.max()
  p = np.exp(s - m)
  z = p.sum()
  return p / z, float(np.log(z) + m)


# ----------------------------------------------------------------------------- the reduced oracle

_TABLE_VERSION = 1


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """``cache_dir``, else ``$KDJAX_CACHE``, else ``~/.cache/kdjax``."""
  if cache_dir:
    return pathlib.Path(cache_dir).expanduser()
  env = os.environ.get("KDJAX_CACHE")
  return pathlib.Path(env).expanduser() if env else pathlib.Path("~/.cache/kdjax").expanduser()


def _csr(rows: np.ndarray, n_rows: int) -> np.ndarray:
  """Row pointers [n_rows+1] of entries already sorted by ``rows``."""
  return np.searchsorted(rows, np.arange(n_rows + 1)).astype(np.int32)


def build_tables(lm: TrieLM, vocab_size: int, *, compat: str = "pocketsphinx") -> dict:
  """Host-side (numpy, float64) tables of the reduced-vocabulary oracle; see the module docstring.

  Keys: ``rank_words`` [V'] (LM word ids of tokens 0..V'-1), ``unigram`` [V'] and ``backoff``
  [V'+2] (nats; 0 for ``<other>``), bigram CSR ``bi_ptr`` [V'+3] / ``bi_col`` / ``bi_val`` (rows
  = context token h1, cols = predicted head token), context table keyed by the sorted int32
  ``ctx_key = h2 * (V'+2) + h1`` (every pair with a bigram "h2 h1" or a trigram): ``ctx_b2``,
  trigram CSR ``tri_ptr`` [n_ctx+1] / ``tri_col`` / ``tri_val``, ``ctx_log_tail`` (the tail
  formula) and ``ctx_log_z`` (the same formula summed over every word but ``<s>``); the same per
  one-word context (``h1_*`` [V'+2]) and for the unigram context (``*_u_*``); the normalised
  outputs' offsets (``*_off_*``, ``*_lq_other``: table value + offset = ``log Q``, computed in
  float64 and rounded to float32 once); ``max_bi`` / ``max_tri`` row maxima.
  """
  _check_compat(compat)
  c1 = lm.num_words
  eos, bos = lm.word_id("</s>"), lm.word_id("<s>")
  if eos is None or bos is None:
    raise ValueError("the LM needs </s> and <s> in its vocabulary")
  vp = int(vocab_size)
  if not 1 <= vp < c1 - 1:
    raise ValueError(f"vocab_size must be in [1, {c1 - 2}], got {vocab_size}")
  other, n_in = vp, vp + 2
  candidates = np.flatnonzero(np.arange(c1) != bos)
  ranked = candidates[np.lexsort((candidates, -lm.unigram_prob[candidates].astype(np.float64)))]
  if ranked[0] != eos:
    raise ValueError("</s> is expected to be the most probable unigram")
  head = ranked[:vp]
  tok = np.full(c1, other, np.int64)
  tok[head] = np.arange(vp)
  tok[bos] = vp + 1
  is_tail = tok == other
  ctx_ok = ~is_tail  # head words and <s> can be context tokens

  u = lm.unigram_prob.astype(np.float64) * LN_BASE
  b1w = lm.unigram_backoff.astype(np.float64) * LN_BASE
  bprob = lm.bigram_prob.astype(np.float64) * LN_BASE
  bbo = lm.bigram_backoff.astype(np.float64) * LN_BASE
  tprob = lm.trigram_prob.astype(np.float64) * LN_BASE
  eu = np.exp(u)

  backoff = np.zeros(n_in)
  backoff[tok[ctx_ok]] = b1w[ctx_ok]

  # Bigram nodes "h1 w": CSR by context token h1 over head w.
  child, root = lm.bigram_word, lm.bigram_root
  ctx_tok = tok[child]
  sel = ctx_ok[child] & (tok[root] < vp)
  rows, cols, vals = ctx_tok[sel], tok[root][sel], bprob[sel]
  o = np.argsort(rows * n_in + cols, kind="stable")
  bi_ptr = _csr(rows[o], n_in)
  bi_col, bi_val = cols[o].astype(np.int32), vals[o]

  # Per-context sums of the tail formula, over `mask` words (tail words, or all words but <s>).
  def h1_sums(mask):
    m = ctx_ok[child] & mask[root]
    s_u = np.bincount(ctx_tok[m], weights=eu[root[m]], minlength=n_in)
    s_b = np.bincount(ctx_tok[m], weights=np.exp(bprob[m]), minlength=n_in)
    total = eu[mask].sum()
    a = np.exp(backoff) * (total - s_u) + s_b  # sum of exp(s) for the one-word context h1
    a[other] = total
    return a, total

  all_mask = np.ones(c1, bool)
  all_mask[bos] = False
  a_tail, u_tail = h1_sums(is_tail)
  a_all, u_all = h1_sums(all_mask)

  # Context pairs (h2, h1): b2 from the node under root h1 with child h2.
  sel = ctx_ok[child] & ctx_ok[root]
  b2_key = tok[child][sel] * n_in + tok[root][sel]
  b2_val = bbo[sel]
  # Trigrams "h2 h1 w".
  t_ok = np.ones(len(lm.trigram_word), bool) if compat == "file" else lm.trigram_reachable
  par = lm.trigram_parent
  th1, tw, th2 = child[par], root[par], lm.trigram_word
  sel = t_ok & ctx_ok[th1] & ctx_ok[th2]
  t_key = tok[th2][sel] * n_in + tok[th1][sel]
  t_w = tok[tw][sel]
  t_val, t_bval = tprob[sel], bprob[par][sel]
  ctx_key = np.union1d(b2_key, t_key)
  if ctx_key.size and ctx_key.max() >= 2**31:
    raise ValueError("vocab_size too large for int32 context keys")
  ctx_b2 = np.zeros(len(ctx_key))
  ctx_b2[np.searchsorted(ctx_key, b2_key)] = b2_val
  t_ctx = np.searchsorted(ctx_key, t_key)
  hsel = t_w < vp
  o = np.argsort(t_ctx[hsel] * n_in + t_w[hsel], kind="stable")
  tri_ptr = _csr(t_ctx[hsel][o], len(ctx_key))
  tri_col, tri_val = t_w[hsel][o].astype(np.int32), t_val[hsel][o]
  ctx_h1 = ctx_key % n_in

  def ctx_sum(a_h1, tmask):
    s_t = np.bincount(t_ctx[tmask], weights=np.exp(t_val[tmask]), minlength=len(ctx_key))
    s_tb = np.bincount(t_ctx[tmask], weights=np.exp(t_bval[tmask]), minlength=len(ctx_key))
    return np.exp(ctx_b2) * (a_h1[ctx_h1] - s_tb) + s_t

  ctx_log_tail = np.log(ctx_sum(a_tail, t_w == other))
  ctx_log_z = np.log(ctx_sum(a_all, np.ones(len(t_w), bool)))
  h1_log_tail, h1_log_z = np.log(a_tail), np.log(a_all)
  # h1 = <other> (row `other`) is the unigram context: a[other] = the unigram total.
  log_u_tail, log_u_z = np.log(u_tail), np.log(u_all)
  b1c = backoff[ctx_h1]
  return dict(
      version=np.int64(_TABLE_VERSION), vocab_size=np.int64(vp), rank_words=head.astype(np.int32),
      unigram=u[head], backoff=backoff,
      bi_ptr=bi_ptr, bi_col=bi_col, bi_val=bi_val,
      ctx_key=ctx_key.astype(np.int32), ctx_b2=ctx_b2, tri_ptr=tri_ptr, tri_col=tri_col,
      tri_val=tri_val, ctx_log_tail=ctx_log_tail, ctx_log_z=ctx_log_z,
      h1_log_tail=h1_log_tail, h1_log_z=h1_log_z,
      log_u_tail=np.float64(log_u_tail), log_u_z=np.float64(log_u_z),
      # Normalised-output offsets, each rounded once: value + offset = log Q.
      ctx_off_base=b1c + ctx_b2 - ctx_log_z, ctx_off_bi=ctx_b2 - ctx_log_z, ctx_off_tri=-ctx_log_z,
      ctx_lq_other=ctx_log_tail - ctx_log_z,
      h1_off_base=backoff - h1_log_z, h1_off_bi=-h1_log_z, h1_lq_other=h1_log_tail - h1_log_z,
      uni_off=np.float64(-log_u_z), uni_lq_other=np.float64(log_u_tail - log_u_z),
      max_bi=np.int64(max(1, np.diff(bi_ptr).max())),
      max_tri=np.int64(max(1, np.diff(tri_ptr).max()) if len(ctx_key) else 1),
      head_words=lm.words[head])


class OracleTables(NamedTuple):
  """Device (float32 / int32) tables of :class:`NGramOracle`, a pytree for ``oracle_log_probs``."""

  unigram: object
  backoff: object
  bi_ptr: object
  bi_col: object
  bi_val: object
  ctx_key: object
  ctx_b2: object
  tri_ptr: object
  tri_col: object
  tri_val: object
  ctx_log_tail: object
  h1_log_tail: object
  log_u_tail: object
  ctx_off_base: object
  ctx_off_bi: object
  ctx_off_tri: object
  ctx_lq_other: object
  h1_off_base: object
  h1_off_bi: object
  h1_lq_other: object
  uni_off: object
  uni_lq_other: object


def oracle_log_probs(tables: OracleTables, h2, h1, *, max_bi: int, max_tri: int,
                     raw: bool = False):
  """Pure JAX ``log Q(. | h2, h1)``: ``h2``, ``h1`` int tokens of any shape -> ``[..., V'+1]``.

  Traceable (use it inside your own ``jax.jit``); ``max_bi`` / ``max_tri`` are static. Each
  output is a table value (``U``, ``B`` or ``T`` in nats) plus one per-context offset; for the
  normalised output the offsets include ``-log Z(h)``, precomputed exactly on the host, so every
  entry is within ~1.5 float32 ulps of the float64 ``log Q`` and no logsumexp is needed.
  ``raw=True``: unnormalised ``s ln 1.0001`` on the head and ``log tail`` at ``<other>``.
  """
  h2 = jnp.asarray(h2, jnp.int32)
  h1 = jnp.asarray(h1, jnp.int32)
  shape = jnp.broadcast_shapes(h2.shape, h1.shape)
  h2 = jnp.broadcast_to(h2, shape).reshape(-1)
  h1 = jnp.broadcast_to(h1, shape).reshape(-1)
  vp = tables.unigram.shape[0]
  n_in = vp + 2
  batch = h1.shape[0]
  h1_ok = h1 != vp
  h2_ok = h1_ok & (h2 != vp)
  key = h2 * n_in + h1
  nk = tables.ctx_key.shape[0]
  pos = jnp.clip(jnp.searchsorted(tables.ctx_key, key), 0, nk - 1)
  found = h2_ok & (tables.ctx_key[pos] == key)
  t = tables
  if raw:  # pocketsphinx's sums: U + b1 + b2, B + b2, T; the unnormalised log tail
    b2 = jnp.where(found, t.ctx_b2[pos], 0.0)
    off_base = jnp.where(h1_ok, t.backoff[h1], 0.0) + b2
    off_bi, off_tri = b2, jnp.zeros_like(b2)
    other = jnp.where(found, t.ctx_log_tail[pos], jnp.where(h1_ok, t.h1_log_tail[h1], t.log_u_tail))
  else:  # the same values plus the host's float64 offsets (log Z folded in): log Q
    off_base = jnp.where(found, t.ctx_off_base[pos], jnp.where(h1_ok, t.h1_off_base[h1], t.uni_off))
    off_bi = jnp.where(found, t.ctx_off_bi[pos], t.h1_off_bi[h1])
    off_tri = t.ctx_off_tri[pos]
    other = jnp.where(found, t.ctx_lq_other[pos],
                      jnp.where(h1_ok, t.h1_lq_other[h1], t.uni_lq_other))
  s = t.unigram[None, :] + off_base[:, None]
  rows = jnp.arange(batch)[:, None]

  def scatter(s, start, end, cols_tab, vals_tab, width, add):
    idx = start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
    ok = idx < end[:, None]
    idx = jnp.clip(idx, 0, cols_tab.shape[0] - 1)
    cols = jnp.where(ok, cols_tab[idx], vp)  # vp is out of bounds for [B, vp]: dropped
    return s.at[rows, cols].set(vals_tab[idx] + add[:, None], mode="drop")

  bstart = jnp.where(h1_ok, t.bi_ptr[h1], 0)
  bend = jnp.where(h1_ok, t.bi_ptr[h1 + 1], 0)
  s = scatter(s, bstart, bend, t.bi_col, t.bi_val, max_bi, off_bi)
  tstart = jnp.where(found, t.tri_ptr[pos], 0)
  tend = jnp.where(found, t.tri_ptr[pos + 1], 0)
  s = scatter(s, tstart, tend, t.tri_col, t.tri_val, max_tri, off_tri)
  out = jnp.concatenate([s, other[:, None]], axis=-1)
  return out.reshape(shape + (vp + 1,))


def _inverse_cdf(key, log_probs, shape):
  """Draws of shape ``shape`` from one distribution ``log_probs`` [V] by inverse CDF.

  One ``jax.random.uniform`` per draw and a binary search of the float32 CDF: token ``i`` is drawn
  iff ``cdf[i-1] <= u * cdf[-1] < cdf[i]`` (zero-probability tokens are never drawn). 3x cheaper
  on CPU than Gumbel-max ``jax.random.categorical``, which needs V random numbers per draw.
  """
  cdf = jnp.cumsum(jnp.exp(log_probs))
  u = jax.random.uniform(key, shape, jnp.float32) * cdf[-1]
  tok = jnp.searchsorted(cdf, u, side="right")
  return jnp.minimum(tok, log_probs.shape[-1] - 1).astype(jnp.int32)


class Samples(NamedTuple):
  """Sampled sentences: ``tokens`` [num, max_len] int32 (after ``<s>``; 0 = ``</s>`` also pads),
  ``mask`` [num, max_len] bool (True on real tokens, the final ``</s>`` included), ``lengths``
  [num] int32 (tokens incl. ``</s>``; ``max_len`` for a sentence cut without ``</s>``)."""

  tokens: object
  mask: object
  lengths: object


def _file_key(path: pathlib.Path, vocab_size: int, compat: str) -> str:
  st = path.stat()
  h = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{vocab_size}|{compat}|"
                   f"{_TABLE_VERSION}".encode()).hexdigest()[:16]
  return f"ngram_oracle_v{vocab_size}_{compat}_{st.st_size}_{h}.npz"


class NGramOracle:
  """The trigram LM on ``V'+1`` output tokens (top-``V'`` words + ``<other>``); build with
  :func:`ngram_oracle`.

  Token ids: ``0..V'-1`` head words (``eos_id = 0`` is ``</s>``), ``other_id = V'``,
  ``bos_id = V'+1`` (``<s>``, input only). ``log_probs(h2, h1)`` gives natural-log
  ``Q(. | h2, h1)`` ``[..., V'+1]`` float32 (jitted); ``sample`` draws sentences; ``decode`` maps
  ids to strings; ``reference_log_probs`` is the float64 numpy brute force over the full LM.
  """

  def __init__(self, tables: dict, *, path: pathlib.Path, compat: str, lm: TrieLM | None = None):
    self.host = tables
    self.path = pathlib.Path(path)
    self.compat = compat
    self._lm = lm
    self.vocab_size = int(tables["vocab_size"])
    self.eos_id, self.other_id, self.bos_id = 0, self.vocab_size, self.vocab_size + 1
    self.num_outputs, self.num_inputs = self.vocab_size + 1, self.vocab_size + 2
    self.max_bi, self.max_tri = int(tables["max_bi"]), int(tables["max_tri"])
    self.tokens = [str(w) for w in tables["head_words"]] + ["<other>", "<s>"]
    as32 = lambda a: np.asarray(a, np.float32 if np.asarray(a).dtype.kind == "f" else np.int32)
    self._tables_np = OracleTables(**{f: as32(tables[f]) for f in OracleTables._fields})
    self._device_tables: dict = {}
    fn = functools.partial(oracle_log_probs, max_bi=self.max_bi, max_tri=self.max_tri)
    self._log_probs_fn = fn
    self._jit_log_probs = jax.jit(fn, static_argnames=("raw",))
    self._jit_sample = jax.jit(self._sample_impl, static_argnames=("num", "max_len"))
    self._jit_next = jax.jit(self._sample_next_impl, static_argnames=("num",))
    # Equal oracles (same file, size, mtime, V', compat) compare equal, so an NGramTeacher (the
    # oracle is its static pytree data) built in a later call hits jit caches: no recompile.
    self._identity = (_file_key(self.path, self.vocab_size, compat),
                      int(np.asarray(tables["version"])) if "version" in tables else 0)

  def __eq__(self, other):
    return isinstance(other, NGramOracle) and self._identity == other._identity

  def __hash__(self):
    return hash(self._identity)

  # -- tables
  @property
  def lm(self) -> TrieLM:
    """The full :class:`TrieLM` (read lazily when the tables came from the cache)."""
    if self._lm is None:
      self._lm = read_trie(self.path)
    return self._lm

  def tables(self, device=None) -> OracleTables:
    """The device tables (on ``device``, default: JAX's default device), cached per device."""
    if device not in self._device_tables:  # None: uncommitted, on JAX's default device
      self._device_tables[device] = jax.device_put(self._tables_np, device)
    return self._device_tables[device]

  def _tables_like(self, *arrays) -> OracleTables:
    """The tables on the device of the first committed single-device input, else the default."""
    for a in arrays:
      if isinstance(a, jax.Array) and getattr(a, "committed", False) and len(a.devices()) == 1:
        return self.tables(next(iter(a.devices())))
    return self.tables()

  # -- distribution
  def log_probs(self, h2, h1, *, raw: bool = False):
    """``log Q(. | h2, h1)`` ``[..., V'+1]`` float32, natural log, renormalised.

    ``h2`` (older) and ``h1`` (most recent) are token ids in ``[0, V'+2)``; ``<other>`` is an OOV
    word (``h1 = <other>``: unigram; ``h2 = <other>``: bigram context). ``raw=True`` returns
    pocketsphinx's scores ``s ln 1.0001`` on the head (compare with ``NGramModel.prob``) and the
    unnormalised ``log tail`` at ``<other>``. Runs on the device of committed inputs; inside a
    ``jax.jit`` use :func:`oracle_log_probs` with :meth:`tables`.
    """
    if isinstance(h1, jax.core.Tracer) or isinstance(h2, jax.core.Tracer):
      return self._log_probs_fn(self.tables(), h2, h1, raw=raw)
    self._check_tokens(h2, h1)
    return self._jit_log_probs(self._tables_like(h2, h1), h2, h1, raw=raw)

  def _check_tokens(self, *arrays):
    """Range check of host (non-JAX) token inputs; JAX arrays are not pulled to the host."""
    for a in arrays:
      if not isinstance(a, jax.Array):
        a = np.asarray(a)
        bad = a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() >= self.num_inputs))
        if bad:
          rng = f", range [{a.min()}, {a.max()}]" if a.size else ""
          raise ValueError(f"context tokens must be integers in [0, {self.num_inputs}), "
                           f"got dtype {a.dtype}{rng}")

  def reference_log_probs(self, h2: int, h1: int, *, brute_force: bool = True) -> np.ndarray:
    """float64 numpy ``log Q(. | h2, h1)`` [V'+1] for one context.

    ``brute_force=True`` sums ``exp(s)`` over all LM words (the definition);
    ``False`` uses the host tables' tail formula.
    """
    vp = self.vocab_size
    words = self.host["rank_words"]
    lm = self.lm
    w1 = None if h1 == vp else (lm.word_id("<s>") if h1 == vp + 1 else int(words[h1]))
    w2 = None if (w1 is None or h2 == vp) else (
        lm.word_id("<s>") if h2 == vp + 1 else int(words[h2]))
    s = next_word_scores(lm, w1, w2, compat=self.compat, dtype=np.float64) * LN_BASE
    s[lm.word_id("<s>")] = -np.inf
    head = s[words]
    if brute_force:
      tail_mask = np.ones(lm.num_words, bool)
      tail_mask[words] = False
      tail_mask[lm.word_id("<s>")] = False
      st = s[tail_mask]
      log_tail = np.log(np.exp(st - st.max()).sum()) + st.max()
    else:
      log_tail = self._host_log_tail(h2, h1)
    out = np.append(head, log_tail)
    m = out.max()
    return out - (np.log(np.exp(out - m).sum()) + m)

  def _host_log_tail(self, h2: int, h1: int) -> float:
    vp, t = self.vocab_size, self.host
    if h1 == vp:
      return float(t["log_u_tail"])
    if h2 != vp:
      key = h2 * (vp + 2) + h1
      i = int(np.searchsorted(t["ctx_key"], key))
      if i < len(t["ctx_key"]) and t["ctx_key"][i] == key:
        return float(t["ctx_log_tail"][i])
    return float(t["h1_log_tail"][h1])

  # -- sampling
  def _sample_next_impl(self, tables, key, h2, h1, num):
    lp = self._log_probs_fn(tables, h2, h1)
    return _inverse_cdf(key, lp, (num,))

  def sample_next(self, key, h2: int, h1: int, num: int):
    """``num`` draws [num] int32 of the next token from ``Q(. | h2, h1)`` (scalar context)."""
    self._check_tokens(h2, h1)
    return self._jit_next(self.tables(), key, h2, h1, num=num)

  def _sample_impl(self, tables, key, h2, h1, num, max_len):
    h2 = jnp.broadcast_to(jnp.asarray(h2, jnp.int32), (num,))
    h1 = jnp.broadcast_to(jnp.asarray(h1, jnp.int32), (num,))

    def step(carry, k):
      h2, h1, done = carry
      lp = self._log_probs_fn(tables, h2, h1)
      tok = jax.vmap(lambda kk, row: _inverse_cdf(kk, row, ()))(jax.random.split(k, num), lp)
      tok = jnp.where(done, self.eos_id, tok)
      live = ~done
      return (h1, tok, done | (tok == self.eos_id)), (tok, live)

    keys = jax.random.split(key, max_len)
    _, (toks, live) = jax.lax.scan(step, (h2, h1, jnp.zeros((num,), bool)), keys)
    toks, live = toks.T, live.T
    return Samples(tokens=toks, mask=live, lengths=live.sum(-1).astype(jnp.int32))

  def sample(self, key, num: int, max_len: int, *, h2: int | None = None,
             h1: int | None = None) -> Samples:
    """``num`` sentences from the oracle, tokens after ``<s>`` up to ``</s>`` or ``max_len``.

    Starts from the context ``(<s>, <s>)`` (= sentence start; or the given ``(h2, h1)`` tokens),
    one ``lax.scan`` step per position; the whole sampler is jitted (static ``num``,
    ``max_len``). Cost per step ``O(num * V')``.
    """
    h2 = self.bos_id if h2 is None else h2
    h1 = self.bos_id if h1 is None else h1
    if int(num) < 1 or int(max_len) < 1:
      raise ValueError(f"num and max_len must be >= 1, got {num}, {max_len}")
    self._check_tokens(h2, h1)
    return self._jit_sample(self.tables(), key, h2, h1, num=int(num), max_len=int(max_len))

  def decode(self, ids) -> list[str]:
    """Token ids (1-D) -> their strings (``</s>``, ``<other>``, ``<s>`` included as such)."""
    return [self.tokens[int(i)] for i in np.asarray(ids).reshape(-1)]

  def sentences(self, samples: Samples) -> list[str]:
    """Sampled sentences as text (the final ``</s>`` dropped)."""
    toks, lengths = np.asarray(samples.tokens), np.asarray(samples.lengths)
    out = []
    for row, n in zip(toks, lengths):
      words = self.decode(row[:n])
      out.append(" ".join(words[:-1] if words and words[-1] == "</s>" else words))
    return out


def ngram_oracle(vocab_size: int = 2047, path: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, *, compat: str = "pocketsphinx",
                 lm: TrieLM | None = None, use_cache: bool = True) -> NGramOracle:
  """The reduced-vocabulary oracle of the LM at ``path`` (default: pocketsphinx's en-us LM).

  The host tables are cached as ``.npz`` in :func:`default_cache_dir` keyed by the file's size
  and mtime, ``vocab_size`` and ``compat`` (``use_cache=False`` neither reads nor writes). ``lm``
  reuses an already parsed :class:`TrieLM` of the same file.
  """
  _check_compat(compat)
  path = pathlib.Path(path) if path is not None else (
      pathlib.Path(lm.path) if lm is not None else default_lm_path())
  cache = default_cache_dir(cache_dir) / _file_key(path, int(vocab_size), compat)
  if use_cache and cache.is_file():
    try:
      with np.load(cache, allow_pickle=False) as z:
        tables = {k: z[k] for k in z.files}
      if (int(tables["version"]) == _TABLE_VERSION and int(tables["vocab_size"]) == vocab_size
          and set(OracleTables._fields) <= set(tables)):
        return NGramOracle(tables, path=path, compat=compat, lm=lm)
    except (OSError, ValueError, KeyError):
      pass  # unreadable cache: rebuild
  lm = lm if lm is not None else read_trie(path)
  tables = build_tables(lm, vocab_size, compat=compat)
  if use_cache:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **tables)
    os.replace(tmp, cache)
  return NGramOracle(tables, path=path, compat=compat, lm=lm)
