"""The data pipeline: tokenize once into shards, read them through Grain as deterministic, resumable,
per-process global batches, mixed from several sources by weight.

  files.py     finding input files, the held-out split by file, documents of each file kind
  chat.py      SFT conversations: tokens and assistant-turn loss weights (mistral-common's template)
  shards.py    the shard format: atomic writes, checksums, the manifest, reads by offset
  tokenize.py  ``mixtral-jax tokenize``: plan, parallel workers, resumable, manifest
  rows.py      rows of T (+1) tokens from shards: packed text windows, packed conversations
  preference.py, preference_shards.py   DPO pairs: encoding, pair rows, pair shards (tokenize --preference)
  pipeline.py  the Grain pipeline: shuffle, mix, batch, per-process columns, prefetch, state
  build.py     from the run config to the iterators (tokenizing ``data.paths`` on first use)
  commands.py  the ``tokenize`` subcommand
"""

from .build import Data, build, parse_sources, resolve_sources
from .chat import assistant_spans
from .files import find_files, is_heldout, split_files, stdlib_root
from .pipeline import BatchIterator
from .rows import PackedChatRows, ShardSet, TextRows, first_fit, make_rows, pack_conversations, pack_window
from .shards import load_manifest, tokenizer_fingerprint
from .tokenize import TokenizeSpec, tokenize

__all__ = [
    "BatchIterator", "Data", "PackedChatRows", "ShardSet", "TextRows", "TokenizeSpec", "assistant_spans", "build",
    "find_files", "first_fit", "is_heldout", "load_manifest", "make_rows", "pack_conversations", "pack_window",
    "parse_sources", "resolve_sources", "split_files", "stdlib_root", "tokenize", "tokenizer_fingerprint",
]
