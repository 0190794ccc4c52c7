"""The figures of the evaluations (matplotlib, headless Agg backend; PNG files)."""

from __future__ import annotations

import numpy as np


def _pyplot():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def passkey_heatmap(result: dict, path: str) -> str:
  """Accuracy by context length (rows) and key depth (columns), as the paper's passkey figure."""
  plt = _pyplot()
  lengths = [str(x) for x in result["lengths"]]
  depths = [f"{d:g}" for d in result["depths"]]
  grid = np.array([[result["accuracy"][L][d] for d in depths] for L in lengths])
  fig, ax = plt.subplots(figsize=(max(5.5, 1.5 + 0.6 * len(depths)), max(3.0, 1.5 + 0.5 * len(lengths))))
  im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  ax.set_xticks(range(len(depths)), depths)
  ax.set_yticks(range(len(lengths)), lengths)
  ax.set_xlabel("key depth (fraction of the context)")
  ax.set_ylabel("context length (tokens)")
  ax.set_title(f"passkey retrieval, {result['trials']} trials per cell")
  for i in range(len(lengths)):
    for j in range(len(depths)):
      ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=7)
  fig.colorbar(im, ax=ax, label="accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def context_perplexity(result: dict, path: str) -> str:
  """Mean NLL of the last tokens against context length (log-scale x), one line per text and the mean."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  lengths = result["context_lengths"]
  for t in result["texts"]:
    ax.plot(lengths, t["nll"], color="0.75", lw=0.8)
  ax.plot(lengths, result["mean_nll"], color="C0", lw=2, marker="o", label="mean over texts")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel(f"mean NLL of the last {result['target_tokens']} tokens (nats)")
  ax.set_title("perplexity against context length")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _layers_shown(L: int) -> list[int]:
  return sorted({0, L // 2, L - 1})


def routing_experts(result: dict, path: str) -> str:
  """Expert shares by domain for the first, middle and last layer: first choice (top row) and either
  choice (bottom row), with the uniform share as a dashed line."""
  plt = _pyplot()
  E, k, L = result["experts"], result["top_k"], result["layers"]
  layers = _layers_shown(L)
  domains = list(result["domains"])
  fig, axes = plt.subplots(2, len(layers), figsize=(4.5 * len(layers), 6), squeeze=False, sharey="row")
  width = 0.8 / len(domains)
  for row, (key, uniform) in enumerate((("share_first", 1 / E), ("share_either", k / E))):
    for col, layer in enumerate(layers):
      ax = axes[row][col]
      for i, d in enumerate(domains):
        ax.bar(np.arange(E) + (i - (len(domains) - 1) / 2) * width, result["domains"][d][key][layer], width, label=d)
      ax.axhline(uniform, color="k", ls="--", lw=0.8)
      ax.set_xticks(range(E))
      ax.set_title(f"layer {layer}, {'first choice' if row == 0 else f'among top-{k}'}")
      ax.set_xlabel("expert")
    axes[row][0].set_ylabel("share of tokens")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def routing_repetition(result: dict, path: str) -> str:
  """Consecutive-token repetition per layer and domain beside the uniform baselines (Table 5)."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  base = result["baselines"]
  for ax, key, title in ((axes[0], "repeat_first", "same first-choice expert"),
                         (axes[1], "repeat_topk", f"top-{result['top_k']} sets share an expert")):
    for d, s in result["domains"].items():
      ax.plot(range(result["layers"]), s[key], marker="o", label=d)
    ax.axhline(base[key], color="k", ls="--", lw=0.8, label="uniform")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of consecutive token pairs")
    ax.set_title(title)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
