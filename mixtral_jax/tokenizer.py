"""The Mistral sentencepiece tokenizer: plain text <-> token ids, with explicit BOS/EOS.

Mixtral uses sentencepiece models with byte fallback, so every string encodes without ``<unk>`` and
``decode(encode(s)) == s`` for any text sentencepiece does not normalise (it keeps whitespace runs,
tabs and newlines; it folds a leading space into the first piece). Two files matter, both shipped
inside the ``mistral-common`` package:

  * ``v1``: ``tokenizer.model.v1``, 32000 pieces, Mixtral-8x7B (base and Instruct) and 8x22B v0.1 base.
  * ``v3``: ``mistral_instruct_tokenizer_240323.model.v3``, 32768 pieces, Mixtral-8x22B-Instruct. Ids
    1-750 are control tokens (``<s>``, ``</s>``, ``[INST]``, ``[TOOL_CALLS]``, ``[AVAILABLE_TOOLS]``, ...),
    so its normal pieces sit at other ids than v1's (``Hello`` is 22557 in v1, 23325 in v3): the two
    are not interchangeable.

Plain ``encode`` never produces control tokens: the text ``"[INST]"`` encodes as ordinary pieces.
Chat and tool prompts, which need them, go through :func:`mixtral_jax.chat.encode_chat`.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Iterable

import sentencepiece

from mixtral_jax.text_input import check_text

# Bundled files of mistral-common, by the version names its MistralTokenizer.v1()/.v3() use.
BUNDLED = {
    "v1": "tokenizer.model.v1",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
}
# The vocabulary size each bundled tokenizer expects of a model, used to suggest the right one.
BUNDLED_VOCAB = {32000: "v1", 32768: "v3"}


def bundled_path(name: str) -> str:
  """Path of a tokenizer file that mistral-common ships, by version name ('v1' or 'v3')."""
  if name not in BUNDLED:
    raise ValueError(f"unknown bundled tokenizer {name!r}; choose one of {', '.join(BUNDLED)}")
  return str(importlib.resources.files("mistral_common") / "data" / BUNDLED[name])


def resolve_path(path_or_name: str | os.PathLike) -> str:
  """The sentencepiece file meant by a version name, a file path, or a directory.

  A directory must hold ``tokenizer.model`` (Hugging Face layout) or exactly one
  ``tokenizer.model.v*`` (Mistral's consolidated layout).
  """
  if isinstance(path_or_name, str) and path_or_name in BUNDLED:
    return bundled_path(path_or_name)
  path = os.fspath(path_or_name)
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
      return os.path.join(path, "tokenizer.model")
    versioned = sorted(f for f in os.listdir(path) if f.startswith("tokenizer.model.v"))
    if len(versioned) == 1:
      return os.path.join(path, versioned[0])
    if versioned:
      raise ValueError(f"{path} holds several tokenizer files ({', '.join(versioned)}); pass the one to use")
    raise FileNotFoundError(
        f"no tokenizer.model in {path}; pass a path to the tokenizer file, or 'v1' (Mixtral-8x7B, "
        "32000 pieces) or 'v3' (Mixtral-8x22B-Instruct, 32768 pieces)")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"tokenizer file not found: {path}; pass a tokenizer.model path, a directory holding one, "
        f"or one of the bundled names {', '.join(BUNDLED)}")
  return path


class Tokenizer:
  """A sentencepiece model with Mistral's BOS/EOS conventions.

  ``encode(text, bos=True, eos=False)`` returns the pieces of ``text`` with BOS in front and EOS at
  the end when asked. ``decode(ids)`` drops control tokens (BOS, EOS, ``[INST]``...) unless
  ``keep_special=True``, which renders them by name between the decoded runs of text.
  """

  def __init__(self, model_file: str):
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    except (RuntimeError, OSError) as e:
      raise ValueError(
          f"could not read the sentencepiece model {model_file}: the file is corrupt, truncated or not a "
          f"sentencepiece model ({e}); re-download it, or pass 'v1'/'v3' for the bundled files") from None
    self.path = model_file
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    # Mistral's files define no pad piece (-1). Batches still need a valid id to fill with; <unk>
    # is never produced by a byte-fallback model, so padding with it cannot collide with real text.
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()
    self._control = frozenset(i for i in range(self.vocab_size) if self._sp.is_control(i))

  @classmethod
  def load(cls, path_or_name: str | os.PathLike) -> Tokenizer:
    """Loads 'v1', 'v3' (the files mistral-common ships), a tokenizer file, or a directory holding one."""
    return cls(resolve_path(path_or_name))

  def __repr__(self):
    return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of ``text``; BOS first if ``bos``, EOS last if ``eos``."""
    if not isinstance(text, str):
      raise TypeError(f"encode takes a str, got {type(text).__name__}")
    check_text(text, "the text to encode")  # SentencePiece's binding would fail with a C++ cast error
    ids = self._sp.encode(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
    """Text of ``ids`` (a list, NumPy or JAX array of ints).

    Control tokens are dropped, or with ``keep_special`` written as their names (``[TOOL_CALLS]``,
    ``</s>``...) between the text runs, each run decoded on its own.
    """
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(
          f"token id {bad[0]} is outside this tokenizer's vocabulary [0, {self.vocab_size}); strip padding "
          "(-1) before decoding, and check that the model and tokenizer vocabularies match")
    if not keep_special:
      return self._sp.decode(ids)
    parts, run = [], []
    for i in ids:
      if i in self._control:
        parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    return "".join(parts) + self._sp.decode(run)

  def is_special(self, token_id: int) -> bool:
    """Whether ``token_id`` is a control token (BOS, EOS, and v3's ``[INST]``, ``[TOOL_CALLS]``...)."""
    return int(token_id) in self._control

  def special_id(self, piece: str) -> int:
    """The id of a control token by name, e.g. ``special_id("[TOOL_CALLS]")``."""
    token_id = self._sp.piece_to_id(piece)
    if token_id not in self._control:
      raise ValueError(f"{piece!r} is not a control token of {self.path}")
    return token_id

  def check_vocab(self, model_vocab_size: int) -> None:
    """Raises ValueError unless the model's vocabulary size equals this tokenizer's."""
    if model_vocab_size == self.vocab_size:
      return
    hint = (f"load the tokenizer '{BUNDLED_VOCAB[model_vocab_size]}'" if model_vocab_size in BUNDLED_VOCAB
            else "pass the tokenizer.model the model was trained with")
    raise ValueError(
        f"the model's vocabulary has {model_vocab_size} tokens but the tokenizer {self.path} has "
        f"{self.vocab_size}; {hint}")
