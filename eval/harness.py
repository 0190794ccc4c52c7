"""lm-evaluation-harness adapter: ``HarnessLM``, registered with lm-eval as ``mixtral-jax``.

It implements the three request types of ``lm_eval.api.model.LM`` the way lm-eval's own Hugging Face
model (``--model hf``) does, so scores are comparable number for number:

  * ``loglikelihood(context, continuation)``: lm-eval's ``TemplateLM`` encodes the pair (trailing spaces
    of the context move to the continuation; context + continuation is encoded whole and split after
    the context's own token count; an empty context becomes BOS). The sequence (context + continuation)
    is left-truncated to ``max_length + 1`` tokens; the answer is the sum of the continuation tokens'
    log-probabilities and whether each of them is the argmax.
  * ``loglikelihood_rolling(text)``: lm-eval's disjoint rolling windows of ``max_length`` tokens over
    the text's tokens (BOS included, with BOS as the prefix, so P(BOS | BOS) is part of the sum, as in
    the HF model), scored as above and summed.
  * ``generate_until(context, gen_kwargs)``: greedy (or sampled, with ``do_sample``) generation with
    :func:`mixtral_jax.generate`, stopping at EOS, any ``until`` string or ``max_gen_toks`` tokens; the
    context is left-truncated to ``max_length - max_gen_toks`` tokens.

Scoring requests are batched by :func:`mixtral_jax.eval.batching.score_sequences` (sorted by length,
power-of-two shape buckets, one compilation per bucket); generation requests are sorted by length and
batched by ``generate`` (which buckets prompt length and batch size the same way).

Use it from lm-eval's API or CLI::

  lm_eval.simple_evaluate(model=HarnessLM("runs/tiny"), tasks=["mixtral_jax_demo"],
                          task_manager=TaskManager(include_path=...))
  lm_eval --model mixtral-jax --model_args model=runs/tiny,batch_size=8 --tasks ...   (after importing this)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from mixtral_jax.generate import bucket

from .batching import score_sequences


def _int_or(value, default: int) -> int:
  """lm-eval passes model_args as strings and batch_size as "auto"/None sometimes."""
  if value is None or (isinstance(value, str) and not value.strip().isdigit()):
    return default
  return int(value)


@register_model("mixtral-jax")
class HarnessLM(TemplateLM):
  """A mixtral-jax model as an lm-eval ``LM`` (module docstring).

  Args:
    model: a checkpoint path (anything ``mixtral_jax.from_pretrained`` reads) or a ``Mixtral``.
    tokenizer: a ``Tokenizer``, a path or 'v1'/'v3'; default the checkpoint's tokenizer.model, else the
      bundled one matching the vocabulary.
    batch_size: rows per scoring batch (halved for long buckets to keep ``max_batch_tokens``).
    max_length: the longest window in tokens; default ``max_position_embeddings``.
    max_gen_toks: default generation budget when a task gives none.
    mesh: a mesh spec such as "expert=4" or a ``jax.sharding.Mesh``.
  """

  def __init__(self, model, tokenizer=None, batch_size=8, max_length=None, max_gen_toks=256, mesh=None,
               dtype=None, max_batch_tokens=16384, progress=True, **_ignored):
    super().__init__()
    from mixtral_jax.eval.loading import load_model  # noqa: PLC0415
    self.model, self.tokenizer, self.mesh = load_model(model, tokenizer=tokenizer, mesh=mesh, dtype=dtype)
    self.batch_size = _int_or(batch_size, 8)
    self._max_length = _int_or(max_length, self.model.cfg.max_position_embeddings)
    self._max_gen_toks = _int_or(max_gen_toks, 256)
    self.max_batch_tokens = _int_or(max_batch_tokens, 16384)
    self.progress = progress if isinstance(progress, bool) else str(progress).lower() != "false"

  # ------------------------------------------------------------------------------ tokens

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tokenizer.bos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return os.path.basename(self.tokenizer.path)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_kw) -> list[int]:
    """BOS + pieces (like the HF tokenizer with ``add_bos_token``); no BOS when ``add_special_tokens``
    is False, or when the text already starts with the BOS piece's text."""
    bos = self.tokenizer.decode([self.tokenizer.bos_id], keep_special=True)
    if add_special_tokens is None and string.startswith(bos):
      return [self.tokenizer.bos_id] + self.tokenizer.encode(string[len(bos):], bos=False)
    return self.tokenizer.encode(string, bos=add_special_tokens is not False)

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode(tokens)

  # ------------------------------------------------------------------------------ scoring

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_kw) -> list[tuple[float, bool]]:
    seqs, spans = [], []
    for _, context_enc, continuation_enc in requests:
      if not context_enc or not continuation_enc:
        raise ValueError("a log-likelihood request needs a non-empty context and continuation")
      seq = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
      seqs.append(seq)
      spans.append(len(continuation_enc))
    bar = tqdm(total=len(seqs), desc="loglikelihood", disable=disable_tqdm or not self.progress, dynamic_ncols=True)
    # Only the continuations reach the LM head; a power-of-two span keeps the compiled shapes few.
    scored = score_sequences(self.model, seqs, batch_size=self.batch_size, max_tokens=self.max_batch_tokens,
                             mesh=self.mesh, bar=bar, tail=bucket(max(spans, default=1), 16))
    bar.close()
    out = []
    for (key, _, _), (lp, greedy), n in zip(requests, scored, spans):
      answer = (float(lp[-n:].sum(dtype="float64")), bool(greedy[-n:].all()))
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
      out.append(answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for r, (text,) in enumerate(req.args for req in requests):
      for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)):
        windows.append((None, ctx, cont))
        owner.append(r)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for r, (ll, _) in zip(owner, scores):
      totals[r] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # ------------------------------------------------------------------------------ generation

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    from mixtral_jax.generate import generate  # noqa: PLC0415

    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):  # one group per distinct gen_kwargs, as lm-eval's HF model
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    out: list[str | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress,
               dynamic_ncols=True)
    eos_text = self.tokenizer.decode([self.eot_token_id], keep_special=True)
    for members in groups.values():
      kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
      until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=eos_text) if s and s != eos_text]
      max_gen = int(kwargs.pop("max_gen_toks"))
      if max_gen >= self.max_length:
        raise ValueError(f"max_gen_toks={max_gen} leaves no room for a prompt in max_length={self.max_length}")
      sampling = {"temperature": float(kwargs.get("temperature", 0.0) or 0.0)} if kwargs.get("do_sample") else {}
      if kwargs.get("do_sample") and kwargs.get("top_p") is not None:
        sampling["top_p"] = float(kwargs["top_p"])
      prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):] for i in members}
      order = sorted(members, key=lambda i: -len(prompts[i]))
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        gen = generate(self.model, [prompts[i] for i in chunk], max_gen, tokenizer=self.tokenizer, stop=until or None,
                       mesh=self.mesh, seed=int(kwargs.get("seed", 0) or 0), **sampling)
        for i, text in zip(chunk, gen.texts):
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.update(len(chunk))
    bar.close()
    return out


# ------------------------------------------------------------------------------ running tasks


def task_dir() -> str:
  """The tasks shipped with mixtral-jax (``mixtral_jax_demo``: choice, rolling and generate, local data)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def task_manager(tasks: Sequence[str], include_path: str | None = None):
  """A ``TaskManager`` that knows ``tasks``: our tasks and ``include_path`` alone when they hold them all
  (indexing lm-eval's thousands of YAML files takes seconds), else those plus lm-eval's own. Unknown
  names raise ValueError listing the closest known ones."""
  import difflib  # noqa: PLC0415

  from lm_eval.tasks import TaskManager  # noqa: PLC0415

  paths = [task_dir()] + ([include_path] if include_path else [])
  if include_path and not os.path.isdir(include_path):
    raise FileNotFoundError(f"--include-path {include_path} is not a folder of task YAML files")
  local = TaskManager(include_path=paths, include_defaults=False)
  missing = [t for t in tasks if not local.match_tasks([t])]
  if not missing:
    return local
  # A near miss of one of our own task names is a typo, not one of lm-eval's: say so without the slow index.
  near = {t: difflib.get_close_matches(t, local.all_tasks, n=5, cutoff=0.85) for t in missing}
  if all(near.values()):
    raise ValueError(_unknown(near))
  manager = TaskManager(include_path=paths)
  unknown = [t for t in tasks if not manager.match_tasks([t])]
  if unknown:
    raise ValueError(_unknown({t: difflib.get_close_matches(t, manager.all_tasks, n=5, cutoff=0.6) for t in unknown}))
  return manager


def _unknown(close: dict[str, list[str]]) -> str:
  hints = [f"{t!r} (close: {', '.join(c)})" if c else repr(t) for t, c in close.items()]
  return (f"unknown task(s) {'; '.join(hints)}; `lm_eval ls tasks` lists them all, and --include-path adds a "
          "folder of your own YAML tasks")


def run_tasks(lm: HarnessLM, tasks: Sequence[str], *, include_path: str | None = None, limit: float | None = None,
              num_fewshot: int | None = None, log_samples: bool = False, seed: int = 0) -> dict:
  """``lm_eval.simple_evaluate`` on ``lm`` with our task folder (and ``include_path``) indexed."""
  import lm_eval  # noqa: PLC0415

  tasks = list(tasks)
  if not tasks:
    raise ValueError("no tasks given; pass --tasks NAME[,NAME...] (e.g. mixtral_jax_demo)")
  return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(tasks, include_path),
                                 limit=limit, num_fewshot=num_fewshot, log_samples=log_samples,
                                 random_seed=seed, numpy_random_seed=seed, fewshot_random_seed=seed)
