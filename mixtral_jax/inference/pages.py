"""Paged KV-cache bookkeeping on the host: a pool of fixed-size pages, a page table per sequence,
admission by free pages, preemption of the newest sequence, and prefix caching.

The device holds one pool of ``num_pages`` pages per layer, each ``page_size`` token slots (see
:mod:`mixtral_jax.attn.paged`). Page 0 is the null page: never handed out, it fills the unused tail
of every page table and takes the writes of padding rows, so a padded entry is always a valid index.
A sequence's token at position p lives in slot ``p % page_size`` of page ``pages[p // page_size]``.

Prefix caching (vLLM's hash-chained blocks):

  * A page that is full gets the key ``h_i = blake2b(h_{i-1} || adapter || tokens of page i)``, so the
    key names all tokens from position 0 to the page's end, under one adapter (the same tokens give
    other keys and values under another adapter).
  * A new sequence walks its prompt's keys and reuses the longest run of pages found in the table,
    pinning them (reference count + 1). It never reuses its last prompt token: that one is always
    prefilled, because its logits give the first sampled token.
  * A page whose count drops to 0 keeps its key and joins an LRU list; it is evicted (key dropped) only
    when a fresh page is needed and the free list is empty. Pages are never written once full, so a
    shared page is read-only; only a sequence's own, partly filled last page takes writes.

Memory pressure: ``admit`` succeeds only when the pages for the whole prompt fit (free + evictable);
``ensure_room`` grows each running sequence by a page when it crosses a page boundary, and when the
pool is dry preempts the newest running sequence (its pages released, its tokens kept so it can be
admitted again later and recomputed, most of it usually from the prefix cache). The oldest sequence
therefore always progresses, as long as one ``max_context`` sequence fits in the pool
(:func:`pages_for_budget` refuses smaller pools).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import math

import numpy as np

NULL_PAGE = 0
# Default page size. 64 tokens: the mean waste (half a page per sequence, 32 tokens) is under 1% of a
# 4k-token chat; one page of keys is a block of 64 for attention (a matmul tile that keeps the MXU/
# tensor cores busy on TPU/GPU; 16-token pages would need four pages per block and four times the
# table entries and hash look-ups); and shared system prompts are reused to within 63 tokens.
PAGE_SIZE = 64


@dataclasses.dataclass
class Sequence:
  """A request's view of the pool. ``tokens``: every token known so far (prompt, then the sampled ones);
  the first ``computed`` have keys/values in ``pages``; ``keys[i]`` is the prefix key of full page i."""
  id: int
  tokens: list[int]
  adapter: str | None = None
  pages: list[int] = dataclasses.field(default_factory=list)
  computed: int = 0
  cached_tokens: int = 0  # of the prompt, reused from the prefix cache at admission
  keys: list[bytes] = dataclasses.field(default_factory=list)
  order: int = 0  # admission order; the largest is the newest


@dataclasses.dataclass
class PrefixStats:
  """Prompt tokens looked up in the prefix cache, those found, and pages evicted."""
  queried_tokens: int = 0
  hit_tokens: int = 0
  evicted_pages: int = 0
  preempted: int = 0

  @property
  def hit_rate(self) -> float:
    return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def page_key(parent: bytes, adapter: str | None, tokens) -> bytes:
  """The prefix key of a full page: a hash of its parent's key, the adapter and the page's tokens."""
  h = hashlib.blake2b(parent, digest_size=16)
  h.update(b"\0" if adapter is None else b"\1" + adapter.encode() + b"\0")
  h.update(np.asarray(tokens, np.int64).tobytes())
  return h.digest()


class PagePool:
  """Pages 1..num_pages-1 of one device pool, with reference counts, a free list, the prefix table
  and the LRU list of unreferenced cached pages. Not thread-safe: the engine loop owns it."""

  def __init__(self, num_pages: int, page_size: int = PAGE_SIZE, *, prefix_caching: bool = True):
    if num_pages < 2 or page_size < 1:
      raise ValueError(f"a page pool needs >= 2 pages (page 0 is the null page) and page_size >= 1, got "
                       f"{num_pages} pages of {page_size}")
    self.num_pages, self.page_size, self.prefix_caching = int(num_pages), int(page_size), prefix_caching
    self.refs = np.zeros(self.num_pages, np.int32)
    self.free: collections.deque[int] = collections.deque(range(1, self.num_pages))
    self.by_key: dict[bytes, int] = {}
    self.key_of: dict[int, bytes] = {}
    self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # unreferenced cached pages
    self.stats = PrefixStats()
    self._order = itertools.count()

  # ------------------------------------------------------------------ counts

  def available(self) -> int:
    """Pages a new allocation can take: free ones and unreferenced cached ones (evicted on demand)."""
    return len(self.free) + len(self.lru)

  def pages_for(self, n_tokens: int) -> int:
    return -(-n_tokens // self.page_size)

  # ------------------------------------------------------------------ sequences

  def admit(self, seq_id: int, tokens: list[int], adapter: str | None = None) -> Sequence | None:
    """A new sequence holding pages for all of ``tokens``, reusing the longest cached prefix; None (and
    nothing changed) when the pool cannot hold it now."""
    if not tokens:
      raise ValueError("a sequence needs at least one token")
    hits = self._match(tokens, adapter)
    need = self.pages_for(len(tokens)) - len(hits)
    pinned_from_lru = sum(page in self.lru for _, page in hits)
    if need > self.available() - pinned_from_lru:
      return None
    seq = Sequence(seq_id, list(tokens), adapter, order=next(self._order))
    for key, page in hits:
      self._pin(page)
      seq.pages.append(page)
      seq.keys.append(key)
    seq.pages += [self._take() for _ in range(need)]
    seq.computed = seq.cached_tokens = len(hits) * self.page_size
    self.stats.queried_tokens += len(tokens)
    self.stats.hit_tokens += seq.cached_tokens
    return seq

  def mark_computed(self, seq: Sequence, n: int) -> None:
    """Keys/values of ``seq.tokens[:n]`` are now in its pages: full pages enter the prefix table."""
    if not seq.computed <= n <= min(len(seq.tokens), len(seq.pages) * self.page_size):
      raise ValueError(f"sequence {seq.id}: computed must grow within its tokens and pages, got {n} after "
                       f"{seq.computed} ({len(seq.tokens)} tokens, {len(seq.pages)} pages)")
    seq.computed = n
    P = self.page_size
    while len(seq.keys) < n // P:
      i = len(seq.keys)
      key = page_key(seq.keys[-1] if seq.keys else b"", seq.adapter, seq.tokens[i * P:(i + 1) * P])
      seq.keys.append(key)
      page = seq.pages[i]
      # Another sequence may have filled an equal page first; then this copy stays unkeyed (freed, not
      # cached, on release) and later sequences reuse the first one.
      if self.prefix_caching and key not in self.by_key and page not in self.key_of:
        self.by_key[key], self.key_of[page] = page, key

  def append(self, seq: Sequence, token: int) -> None:
    """Adds a sampled token; its keys/values are written at the next step (call ``ensure_room`` first)."""
    seq.tokens.append(int(token))

  def has_room(self, seq: Sequence) -> bool:
    return len(seq.tokens) <= len(seq.pages) * self.page_size

  def grow(self, seq: Sequence) -> bool:
    """Gives ``seq`` pages for all its tokens; False (nothing taken) when the pool is dry."""
    need = self.pages_for(len(seq.tokens)) - len(seq.pages)
    if need > self.available():
      return False
    seq.pages += [self._take() for _ in range(max(need, 0))]
    return True

  def ensure_room(self, running: list[Sequence]) -> list[Sequence]:
    """Grows every running sequence to hold its tokens, oldest first, preempting the newest while the
    pool is dry. Returns the preempted sequences (released; their tokens are kept for re-admission)."""
    alive = sorted(running, key=lambda s: s.order)
    preempted = []
    i = 0
    while i < len(alive):
      if self.grow(alive[i]):
        i += 1
        continue
      victim = alive.pop()  # the newest, possibly alive[i] itself
      self.release(victim)
      self.stats.preempted += 1
      preempted.append(victim)
    return preempted

  def release(self, seq: Sequence) -> None:
    """Drops the sequence's references: cached pages join the LRU list, the others the free list."""
    for page in reversed(seq.pages):  # the tail first, so a shared prefix outlives its extensions in LRU
      self.refs[page] -= 1
      if self.refs[page] == 0:
        if page in self.key_of:
          self.lru[page] = None
        else:
          self.free.append(page)
    seq.pages, seq.keys, seq.computed = [], [], 0

  def page_table(self, seqs: list[Sequence | None], width: int) -> np.ndarray:
    """int32 ``[len(seqs), width]``: each sequence's pages, then NULL_PAGE (None rows: all null)."""
    table = np.full((len(seqs), width), NULL_PAGE, np.int32)
    for b, seq in enumerate(seqs):
      if seq is not None:
        if len(seq.pages) > width:
          raise ValueError(f"sequence {seq.id} holds {len(seq.pages)} pages but the table is {width} wide; "
                           "raise the table width to max_context / page_size")
        table[b, :len(seq.pages)] = seq.pages
    return table

  # ------------------------------------------------------------------ internals

  def _match(self, tokens, adapter) -> list[tuple[bytes, int]]:
    """(key, page) of the longest cached run of full pages, leaving at least the last token out."""
    if not self.prefix_caching:
      return []
    hits, key, P = [], b"", self.page_size
    for i in range((len(tokens) - 1) // P):
      key = page_key(key, adapter, tokens[i * P:(i + 1) * P])
      page = self.by_key.get(key)
      if page is None:
        break
      hits.append((key, page))
    return hits

  def _pin(self, page: int) -> None:
    self.lru.pop(page, None)
    self.refs[page] += 1

  def _take(self) -> int:
    if self.free:
      page = self.free.popleft()
    else:
      page, _ = self.lru.popitem(last=False)  # least recently released
      del self.by_key[self.key_of.pop(page)]
      self.stats.evicted_pages += 1
    self.refs[page] = 1
    return page


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
  """KV-cache bytes one token takes over all layers: keys and values, ``K * H`` each per layer."""
  return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def pages_for_budget(gib: float, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int,
                     max_context: int, page_size: int = PAGE_SIZE) -> int:
  """Pages (the null page included) that ``gib`` GiB hold; refuses a pool too small for one
  ``max_context`` sequence, with the arithmetic."""
  per_page = bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes) * page_size
  num_pages = int(gib * 2**30 // per_page)
  need = math.ceil(max_context / page_size) + 1
  if num_pages < need:
    raise ValueError(
        f"--kv-cache-gib {gib:g} holds {num_pages} pages of {page_size} tokens ({per_page / 2**20:g} MiB each: "
        f"2 x {num_layers} layers x {num_kv_heads} kv heads x {head_dim} x {dtype_bytes} bytes x {page_size}), but "
        f"one --max-context {max_context} request needs {need - 1} pages plus the null page "
        f"({need * per_page / 2**30:.3f} GiB); raise --kv-cache-gib or lower --max-context")
  return num_pages


def tokens_that_fit(budget_bytes: int, reserved_bytes: int, *, num_layers: int, num_kv_heads: int, head_dim: int,
                    dtype_bytes: int, page_size: int = PAGE_SIZE) -> int:
  """Cache tokens (whole pages, the null page left out) that fit in a device's ``budget_bytes`` after
  ``reserved_bytes`` of parameters and temporaries; what ``plan --generate`` reports."""
  per_page = bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes) * page_size
  pages = max((budget_bytes - reserved_bytes) // per_page - 1, 0)
  return int(pages * page_size)
