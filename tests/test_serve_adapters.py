"""``mixtral-jax serve --adapter NAME=PATH`` (many LoRA adapters at once, unmerged) in a subprocess, driven
by the real ``openai`` client. The reference is ``generate`` in this process on the base with that adapter
MERGED into its weights (``from_pretrained(base, adapter=PATH)``), one request alone; the base's requests
against plain ``generate``.

Two adapters: a PEFT directory on attention (q, v, o; rank 4) and a mixtral-jax LoRA run with per-expert
adapters (w1, w2, w3 of every expert, and the router; rank 2, so the bank pads it to 4). Also: /v1/models
lists the base and both adapters; an unknown name is a 404 ``model_not_found``; prefix-cache pages are
never shared across adapters; bad adapters fail at start-up in one line naming the adapter; and
``generate --adapter PATH`` still merges its one adapter."""

import concurrent.futures
import json
import os

import numpy as np
import openai
import pytest

import mixtral_jax
from mixtral_jax import cli
from mixtral_jax.checkpoint import orbax_io, save
from mixtral_jax.generate import generate
from mixtral_jax.lora import LoraSection
from mixtral_jax.lora import adapters as adapters_lib
from mixtral_jax.lora import run as run_lib
from mixtral_jax.lora.factors import Factors
from mixtral_jax.lora.peft_io import write_peft
from mixtral_jax.tokenizer import Tokenizer
from processes import free_port, serving
from test_serve import metrics

pytestmark = pytest.mark.subprocess_cli

NAME = "tiny-base"
CONTEXT, PAGE = 256, 16


def random_factors(cfg, targets, rank, scale, seed, std=0.08):
  rng = np.random.default_rng(seed)
  out = []
  for t in targets:
    a, b = adapters_lib.shapes(cfg, t, rank)
    L = (cfg.num_hidden_layers,)
    out.append(Factors(t, rng.normal(0, std, L + a).astype(np.float32), rng.normal(0, std, L + b).astype(np.float32),
                       scale))
  return out


def write_lora_run(run, base_path, cfg, section: LoraSection, seed: int) -> None:
  """A mixtral-jax LoRA run as training leaves it: lora.json (the base's fingerprint) and the adapters
  of checkpoint step 1 (``checkpoints/1/params``)."""
  os.makedirs(run)
  with open(os.path.join(run, run_lib.RECORD), "w") as f:
    json.dump(run_lib.record(section, cfg, checkpoint=base_path, preset=None, seed=0), f)
  factors = random_factors(cfg, section.targets, section.rank, section.scale, seed)
  flat = {}
  for f in factors:
    flat[adapters_lib.adapter_key(f.target, "A")], flat[adapters_lib.adapter_key(f.target, "B")] = f.A, f.B
  orbax_io.save_params(os.path.join(run, "checkpoints", "1", "params"), orbax_io.unflatten(flat))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("adapters")
  model = mixtral_jax.create_model(mixtral_jax.get_config("tiny", vocab_size=32000), seed=5)
  cfg = model.cfg
  path = str(save(model, root / NAME))
  peft_dir = str(root / "attn-peft")
  write_peft(random_factors(cfg, ("q", "v", "o"), 4, 2.0, seed=1), cfg, peft_dir, base_path=path)
  run_dir = str(root / "experts-run")
  write_lora_run(run_dir, path, cfg, LoraSection(rank=2, alpha=4.0, targets=("router", "w1", "w2", "w3")), seed=2)
  return root, path, {"attn": peft_dir, "experts": run_dir}


@pytest.fixture(scope="module")
def server(setup):
  _, path, adapters = setup
  flags = [a for name, p in adapters.items() for a in ("--adapter", f"{name}={p}")]
  # No --kv-cache-gib: the default paged cache (on CPU the fixed rows' 4 x 256 tokens, 64 pages of 16).
  with serving(path, "--max-batch", "4", "--max-context", str(CONTEXT), "--prefill-chunk", "32",
               "--page-size", str(PAGE), "--dtype", "float32", *flags) as url:
    yield url


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def test_models_lists_base_and_adapters_and_unknown_is_404(server, client):
  assert metrics(server)["mixtral_jax_kv_pages"] == 4 * CONTEXT // PAGE - 1  # the default pool, null page aside
  models = client.models.list().data
  assert [m.id for m in models] == [NAME, "attn", "experts"]
  with pytest.raises(openai.NotFoundError) as e:
    client.completions.create(model="sql", prompt="hi", max_tokens=2)
  assert e.value.code == "model_not_found" and "'sql'" in e.value.message and "experts" in e.value.message


def test_mixed_batch_equals_merged_generate_and_keeps_prefixes_apart(setup, server, client):
  """One decode batch of base + both adapters on the same long prompt: each answer equals ``generate``
  with its adapter merged (the base's equals plain generate), and only the base's repeat reuses the base's
  cached prefix pages (pages are keyed by adapter)."""
  _, path, adapters = setup
  tok = Tokenizer.load("v1")
  prompt = "A short story about a lighthouse keeper and the sea. " * 4  # several full pages
  n = 12
  want = {None: generate(mixtral_jax.from_pretrained(path, dtype="float32"), [prompt], n, tokenizer=tok).texts[0]}
  for name, p in adapters.items():
    merged = mixtral_jax.from_pretrained(path, adapter=p, dtype="float32")
    want[name] = generate(merged, [prompt], n, tokenizer=tok).texts[0]
  assert len(set(want.values())) == 3  # every adapter changes the greedy answer

  ask = lambda model: client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)  # noqa: E731
  assert ask(NAME).choices[0].text == want[None]
  before = metrics(server)
  assert ask(NAME).choices[0].text == want[None]  # the base's repeat: its prefix comes from the cache
  hits = "mixtral_jax_prefix_cache_hit_tokens_total"
  base_hits = metrics(server)[hits] - before[hits]
  assert base_hits >= 2 * PAGE

  before = metrics(server)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    got = dict(zip(["attn", "experts", NAME], pool.map(ask, ["attn", "experts", NAME])))
  after = metrics(server)
  for name, r in got.items():
    assert r.model == name
    assert r.choices[0].text == want[None if name == NAME else name], name
  # Only the base row hit the cache: the adapters' rows computed their own pages.
  assert after[hits] - before[hits] == base_hits
  steps = after["mixtral_jax_batch_occupancy"] * after["mixtral_jax_batch_rows"]  # mean rows per decode step so far
  assert steps > 1.0  # rows of different adapters decoded in the same steps


def _serve_error(capsys, path, *flags):
  rc = cli.main(["serve", "--model", path, "--port", str(free_port()), "--kv-cache-gib", "0.01",
                 "--max-context", "64", *flags])
  err = capsys.readouterr().err.strip().splitlines()
  return rc, err[-1] if err else ""


def test_bad_adapters_fail_at_startup_in_one_line(setup, capsys):
  root, path, adapters = setup
  rc, line = _serve_error(capsys, path, "--adapter", f"ghost={root / 'nowhere'}")
  assert rc == 2 and "--adapter ghost=" in line and "does not exist" in line, line
  other = mixtral_jax.get_config("tiny", vocab_size=32000, hidden_size=64)  # an adapter of another base
  write_peft(random_factors(other, ("q",), 2, 1.0, seed=3), other, str(root / "wrong"), base_path=None)
  rc, line = _serve_error(capsys, path, "--adapter", f"wrong={root / 'wrong'}")
  assert rc == 2 and "--adapter wrong=" in line and "another base" in line, line
  rc, line = _serve_error(capsys, path, "--adapter", f"{NAME}={adapters['attn']}")
  assert rc == 2 and "already taken by the base model" in line, line
  rc = cli.main(["serve", "--model", path, "--port", str(free_port()), "--fixed-rows", "--adapter",
                 f"attn={adapters['attn']}"])
  line = capsys.readouterr().err.strip()
  assert rc == 2 and "--adapter needs the paged KV cache, not with --fixed-rows" in line and "\n" not in line, line


def test_generate_cli_still_merges_its_adapter(setup, capsys):
  """``generate --adapter PATH`` (one adapter, merged, as before ``serve --adapter``) prints what
  ``generate`` prints on ``from_pretrained(base, adapter=PATH)``, and not the base's continuation."""
  _, path, adapters = setup
  tok = Tokenizer.load("v1")
  prompt = "The lighthouse keeper"
  want = generate(mixtral_jax.from_pretrained(path, adapter=adapters["experts"]), [prompt], 6, tokenizer=tok)
  base = generate(mixtral_jax.from_pretrained(path), [prompt], 6, tokenizer=tok)
  assert want.texts[0] != base.texts[0]
  rc = cli.main(["generate", "--model", path, "--adapter", adapters["experts"], "--prompt", prompt,
                 "--max-new-tokens", "6", "--temperature", "0", "--no-echo"])
  assert rc == 0 and capsys.readouterr().out.strip() == want.texts[0].strip()
