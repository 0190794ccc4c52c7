"""Routing analysis, the Mixtral paper's §5: which experts take which tokens, by domain and layer.

For every domain (``mixtral_jax.eval.domains``), documents are tokenized (BOS first) and cut into
windows of at most ``seq_len`` tokens; one forward pass per batch of windows returns every layer's
router logits ``[L, B, T, E]``. BOS is dropped (it is the same token in every window). Per layer, from
each token's top-k experts by router logit (the model's own choice: softmax is monotone), sorted by
logit so that the first is the first choice:

  (a) share_first[e]  = fraction of tokens whose first choice is e          (sums to 1 over e)
      share_either[e] = fraction of tokens that have e among their top-k    (sums to k over e)
  (b) repeat_first    = fraction of consecutive token pairs (t, t+1) in a window with the same first choice
      repeat_topk     = fraction of consecutive pairs whose top-k sets share at least one expert
      beside their values under uniform independent routing: 1/E, and 1 - C(E-k, k)/C(E, k)
      (12.5% and 46.4% for top-2 of 8; the paper's Table 5).
  (c) ``layer_XX.html``: each domain's first tokens coloured by their first-choice expert (hover: top-k).
  (d) ``routing.json``: every number above; ``routing_experts.png`` and ``routing_repetition.png``: plots.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .batching import batch_shards, mesh_context, plan


@nnx.jit
def _router_logits(model, ids_BT, mask_BT):
  _, aux = model.hidden(ids_BT, attention_mask=mask_BT)
  return aux["router_logits"].astype(jnp.float32)


def router_logits(model, seqs: Sequence[Sequence[int]], *, batch_size: int = 8, max_tokens: int = 16384,
                  mesh=None, bar=None) -> list[np.ndarray]:
  """Per sequence, float32 router logits ``[L, len(seq), E]`` (batched in power-of-two shape buckets)."""
  out: list = [None] * len(seqs)
  with mesh_context(mesh):
    for idx, B, T in plan([len(s) for s in seqs], batch_size, max_tokens, batch_shards(mesh)):
      ids = np.zeros((B, T), np.int32)
      mask = np.zeros((B, T), np.int32)
      for r, i in enumerate(idx):
        ids[r, :len(seqs[i])], mask[r, :len(seqs[i])] = seqs[i], 1
      if mesh is not None:
        from mixtral_jax.sharding.rules import logical_sharding  # noqa: PLC0415
        sh = logical_sharding(("batch", None), mesh)
        ids, mask = jax.device_put(ids, sh), jax.device_put(mask, sh)
      logits = np.asarray(_router_logits(model, jnp.asarray(ids), jnp.asarray(mask)))
      for r, i in enumerate(idx):
        out[i] = logits[:, r, :len(seqs[i])]
      if bar is not None:
        bar.update(len(idx))
  return out


def windows(tokenizer, docs: Sequence[str], seq_len: int, max_tokens: int) -> list[list[int]]:
  """Token windows (the first of each document starts with BOS), at most ``max_tokens`` tokens in all."""
  out, total = [], 0
  for d in docs:
    ids = tokenizer.encode(d)
    for start in range(0, len(ids), seq_len):
      w = ids[start:start + seq_len][:max_tokens - total]
      if len(w) >= 2:
        out.append(w)
        total += len(w)
      if total >= max_tokens:
        return out
  return out


def uniform_baselines(E: int, k: int) -> dict[str, float]:
  """Chance levels under uniform, independent routing of consecutive tokens."""
  return {"repeat_first": 1 / E, "repeat_topk": 1 - math.comb(E - k, k) / math.comb(E, k)}


def routing_stats(logits: Sequence[np.ndarray], k: int) -> dict:
  """The statistics (a) and (b) of the module docstring from router logits ``[L, T, E]`` per window
  (consecutive tokens; pairs never span windows)."""
  L, _, E = logits[0].shape
  first_counts = np.zeros((L, E))
  either_counts = np.zeros((L, E))
  same_first = np.zeros(L)
  share_one = np.zeros(L)
  tokens = pairs = 0
  for lg in logits:
    top = np.argsort(-lg, axis=-1, kind="stable")[..., :k]  # [L, T, k], first choice first
    T = lg.shape[1]
    tokens += T
    pairs += T - 1
    onehot = np.zeros((L, T, E), bool)
    np.put_along_axis(onehot, top, True, axis=-1)
    first_counts += np.stack([np.bincount(top[l, :, 0], minlength=E) for l in range(L)])
    either_counts += onehot.sum(1)
    same_first += (top[:, 1:, 0] == top[:, :-1, 0]).sum(1)
    share_one += (onehot[:, 1:] & onehot[:, :-1]).any(-1).sum(1)
  return {"tokens": int(tokens), "pairs": int(pairs),
          "share_first": (first_counts / tokens).tolist(), "share_either": (either_counts / tokens).tolist(),
          "repeat_first": (same_first / max(pairs, 1)).tolist(), "repeat_topk": (share_one / max(pairs, 1)).tolist()}


# ------------------------------------------------------------------------------ the coloured pages

_COLOURS = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
            "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3")


def _piece_text(tokenizer, token: int) -> str:
  piece = tokenizer._sp.id_to_piece(int(token))  # noqa: SLF001 - pieces keep the leading-space marker
  if piece.startswith("<0x") and piece.endswith(">"):
    byte = int(piece[3:-1], 16)
    return chr(byte) if byte < 128 else "\ufffd"
  return piece.replace("\u2581", " ")


def token_page(tokenizer, layer: int, samples: dict[str, tuple[list[int], np.ndarray]], E: int) -> str:
  """HTML: per domain, tokens on a background of their first-choice expert's colour (title: top-k)."""
  legend = " ".join(f'<span style="background:{_COLOURS[e % len(_COLOURS)]}">&nbsp;expert {e}&nbsp;</span>'
                    for e in range(E))
  parts = [f"<!doctype html><meta charset='utf-8'><title>routing, layer {layer}</title>",
           "<style>body{font-family:sans-serif} pre{white-space:pre-wrap;font-family:monospace;line-height:1.6}</style>",
           f"<h1>First-choice expert of each token, layer {layer}</h1><p>{legend}</p>"]
  for domain, (ids, top_Tk) in samples.items():
    spans = []
    for t, tok in enumerate(ids):
      e = int(top_Tk[t, 0])
      spans.append(f'<span style="background:{_COLOURS[e % len(_COLOURS)]}" '
                   f'title="experts {", ".join(str(int(x)) for x in top_Tk[t])}">'
                   f"{html.escape(_piece_text(tokenizer, tok))}</span>")
    parts.append(f"<h2>{html.escape(domain)}</h2><pre>{''.join(spans)}</pre>")
  return "\n".join(parts)


# ------------------------------------------------------------------------------ the whole analysis


def analyse(model, tokenizer, domains: dict[str, list[str]], *, seq_len: int = 512, tokens: int = 8192,
            batch_size: int = 8, mesh=None, progress: bool = True, page_tokens: int = 400) -> tuple[dict, dict]:
  """(result dict for routing.json, {layer: html page}) over ``domains`` {name: documents}."""
  from tqdm import tqdm  # noqa: PLC0415

  cfg = model.cfg
  E, k, L = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
  seq_len = min(seq_len, cfg.max_position_embeddings)
  per_domain, stats, samples = {}, {}, {}
  for name, docs in domains.items():
    per_domain[name] = windows(tokenizer, docs, seq_len, tokens)
    if not per_domain[name]:
      raise ValueError(f"domain {name}: its text gives fewer than 2 tokens; give it more text")
  bar = tqdm(total=sum(len(w) for w in per_domain.values()), desc="routing", unit="window", disable=not progress,
             dynamic_ncols=True)
  for name, wins in per_domain.items():
    logits = router_logits(model, wins, batch_size=batch_size, mesh=mesh, bar=bar)
    # Drop BOS: the same token opens every document, so it would only add a constant to every share.
    trimmed = [(w[1:], lg[:, 1:]) if w[0] == tokenizer.bos_id else (w, lg) for w, lg in zip(wins, logits)]
    trimmed = [(w, lg) for w, lg in trimmed if len(w) >= 2]
    stats[name] = routing_stats([lg for _, lg in trimmed], k)
    w0, lg0 = trimmed[0]
    top = np.argsort(-lg0[:, :page_tokens], axis=-1, kind="stable")[..., :k]
    samples[name] = (w0[:page_tokens], top)
  bar.close()
  pages = {layer: token_page(tokenizer, layer, {d: (ids, top[layer]) for d, (ids, top) in samples.items()}, E)
           for layer in range(L)}
  result = {"experts": E, "top_k": k, "layers": L, "seq_len": seq_len, "baselines": uniform_baselines(E, k),
            "domains": stats}
  return result, pages


def write(result: dict, pages: dict, out: str) -> list[str]:
  """routing.json, layer_XX.html and the two plots in ``out``; returns the paths written."""
  from .plots import routing_experts, routing_repetition  # noqa: PLC0415
  paths = [os.path.join(out, "routing.json")]
  with open(paths[0], "w") as f:
    json.dump(result, f, indent=1)
  for layer, page in pages.items():
    paths.append(os.path.join(out, f"layer_{layer:02d}.html"))
    with open(paths[-1], "w", encoding="utf-8") as f:
      f.write(page)
  paths.append(routing_experts(result, os.path.join(out, "routing_experts.png")))
  paths.append(routing_repetition(result, os.path.join(out, "routing_repetition.png")))
  return paths
