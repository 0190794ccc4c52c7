"""mixtral_jax.generate against transformers' generate on a random tiny model loaded through
from_pretrained, sampling against NumPy, stop strings and streaming, a mesh against one device, and
bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import mixtral_jax
from mixtral_jax import sampling
from mixtral_jax.generate import generate
from mixtral_jax.model import layer_views
from reference import TINY

NEW = 32
PROMPTS = [np.random.RandomState(1).randint(3, 1000, n).tolist() for n in (10, 4, 7)]


@pytest.fixture(scope="module")
def models(hf_model, save_hf, tmp_path_factory):
  hf = hf_model(seed=0)
  hf.generation_config.eos_token_id = None  # compare full-length runs; EOS is tested on its own
  path = save_hf(hf, tmp_path_factory.mktemp("hf") / "tiny")
  return hf, path, mixtral_jax.from_pretrained(path)


def hf_generate(hf, prompts, eos=None):
  """transformers' greedy continuation of each prompt (left-padded batch), pads after EOS removed."""
  T = max(map(len, prompts))
  ids = np.zeros((len(prompts), T), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
  out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW, do_sample=False,
                    pad_token_id=0, eos_token_id=eos)
  rows = [r[T:].tolist() for r in out]
  return [r[:r.index(eos)] if eos in r else r for r in rows]


@pytest.fixture(scope="module")
def greedy(models):
  """Our greedy continuations of PROMPTS as one left-padded batch."""
  _, _, model = models
  return generate(model, PROMPTS, NEW, eos_id=None)


@pytest.mark.slow
def test_greedy_batch1_matches_transformers(models):
  hf, _, model = models
  got = generate(model, [PROMPTS[0]], NEW, eos_id=None)
  assert got.tokens == hf_generate(hf, [PROMPTS[0]])
  assert got.finish_reasons == ["length"] and got.texts is None


@pytest.mark.slow
def test_greedy_left_padded_batch_matches_transformers(models, greedy):
  hf, _, _ = models
  want = hf_generate(hf, PROMPTS)
  for i in range(len(PROMPTS)):
    assert greedy.tokens[i] == want[i], f"prompt {i}"


@pytest.mark.slow
def test_eos_stops_each_row_like_transformers(models, greedy):
  hf, _, model = models
  full = hf_generate(hf, PROMPTS)
  eos = full[1][5]  # a token transformers emits at step 5 of row 1
  want = hf_generate(hf, PROMPTS, eos=eos)
  got = generate(model, PROMPTS, NEW, eos_id=eos)
  assert got.tokens == want
  assert got.finish_reasons == ["eos" if len(w) < NEW else "length" for w in want]
  assert got.finish_reasons[1] == "eos" and got.tokens[1] == full[1][:full[1].index(eos)]


class CharTokenizer:
  """A stand-in tokenizer: token t is the letter chr(97 + t % 26). Lets stop strings and streaming run
  on the tiny 1000-token model (no sentencepiece model has 1000 pieces)."""
  vocab_size, eos_id = 1000, 2

  def encode(self, text, bos=True):
    return [1] * bos + [ord(c) - 97 + 26 for c in text]

  def decode(self, ids):
    return "".join(chr(97 + t % 26) for t in ids)

  def check_vocab(self, n):
    assert n == self.vocab_size


@pytest.mark.slow
def test_stop_string_and_streaming(models, greedy):
  _, _, model = models
  full = CharTokenizer().decode(greedy.tokens[0])
  stop = full[12:15]
  cut = full.find(stop)  # may be before 12 if the pattern repeats
  events = []
  got = generate(model, [PROMPTS[0]], NEW, tokenizer=CharTokenizer(), stop=["zzzzzzzz", stop], eos_id=None,
                 stream=lambda i, tok, text: events.append((i, tok, text)))
  assert got.finish_reasons == ["stop"]
  assert got.texts == [full[:cut]]
  assert got.tokens == [greedy.tokens[0][:cut + len(stop)]]  # up to the token completing the stop string
  assert [t for _, t, _ in events if t is not None] == got.tokens[0]
  assert "".join(text for _, _, text in events) == got.texts[0]
  # Nothing that later became part of the stop string was streamed early.
  streamed = ""
  for _, _, text in events:
    streamed += text
    assert full[:cut].startswith(streamed)


def test_text_prompts_use_the_tokenizer(models, greedy):
  _, _, model = models
  text = "helloworld"
  got = generate(model, [text], NEW, tokenizer=CharTokenizer(), eos_id=None)
  want = generate(model, [[1] + [ord(c) - 71 for c in text]], NEW, eos_id=None)
  assert got.tokens == want.tokens and got.texts == [CharTokenizer().decode(want.tokens[0])]


def test_single_prompt_as_numpy_ids(models, greedy):
  """One prompt given alone as a NumPy array or a list of NumPy ints is one row, not many."""
  _, _, model = models
  row = np.asarray(PROMPTS[0], np.int64)
  assert generate(model, row, NEW, eos_id=None).tokens == [greedy.tokens[0]]
  assert generate(model, list(row), NEW, eos_id=None).tokens == [greedy.tokens[0]]


@pytest.mark.slow
def test_sampling_is_seeded_reproducible_and_batch_independent(models):
  _, _, model = models
  kw = dict(temperature=1.0, top_k=50, top_p=0.95, eos_id=None)
  a = generate(model, PROMPTS, 16, seed=7, **kw)
  b = generate(model, PROMPTS, 16, seed=7, **kw)
  c = generate(model, PROMPTS, 16, seed=8, **kw)
  assert a.tokens == b.tokens
  assert a.tokens != c.tokens
  # Row 0's draws do not depend on which other prompts share its batch.
  alone = generate(model, [PROMPTS[0], PROMPTS[2], PROMPTS[1]], 16, seed=7, **kw)
  assert alone.tokens[0] == a.tokens[0]


# ------------------------------------------------------------------------------ sampling maths


def _np_filter(z, temperature, top_k, top_p):
  """NumPy reference, by definition: after temperature, keep v if fewer than k tokens have a larger
  logit (top-k), then keep v if the tokens strictly more probable than v hold less than p (top-p)."""
  z = z.astype(np.float64) / temperature
  for r in range(z.shape[0]):
    if top_k:
      z[r][[np.sum(z[r] > z[r][v]) >= top_k for v in range(z.shape[1])]] = -np.inf
    if top_p:
      prob = np.exp(z[r] - z[r].max())
      prob /= prob.sum()
      z[r][[prob[prob > prob[v]].sum() >= top_p for v in range(z.shape[1])]] = -np.inf
  return z


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, None), (0.7, None, 0.8), (1.3, 5, 0.6),
                                                      (1.0, None, 0.3)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
  z = np.random.RandomState(0).randn(4, 12).astype(np.float32)
  z[1, [2, 5, 7]] = z[1].max() + 1  # ties at the top
  got = np.asarray(sampling.filter_logits(z, sampling.Sampling(temperature, top_k, top_p)))
  want = _np_filter(z, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


@pytest.mark.slow
def test_sample_frequencies_match_filtered_softmax():
  z = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], np.float32))
  s = sampling.Sampling(temperature=1.0, top_p=0.8)  # keeps 0.5, 0.2, 0.15
  keys = jax.random.split(jax.random.key(1), 20000)
  draws = np.asarray(jax.vmap(lambda k: sampling.sample(z, k, 0, s)[0])(keys))
  freq = np.bincount(draws, minlength=5) / len(draws)
  np.testing.assert_allclose(freq, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)


# ------------------------------------------------------------------------------ decode MoE path


@pytest.mark.parametrize("per_expert", [False, True])
@pytest.mark.parametrize("N", [1, 3, 4, 16])
def test_selected_expert_dispatch_matches_numpy(N, per_expert):
  """The small-batch MoE path (each pair slices its own expert, or with ``per_expert`` switches over
  per-expert arrays) against float64 NumPy; with N=3 two tokens share an expert; with N=4 all E slots
  are used; N=16 (a 16-row decode step, N*k > 2E) runs every expert on every token."""
  from mixtral_jax.moe import dispatch_selected
  rs = np.random.RandomState(N)
  E, D, F, k = 8, 16, 24, 2
  x, w1, w3 = rs.randn(N, D), rs.randn(E, D, F) / 4, rs.randn(E, D, F) / 4
  w2 = rs.randn(E, F, D) / 4
  ids = np.array([[3, 5], [5, 0], [7, 3], [1, 0]] + [rs.choice(E, k, replace=False) for _ in range(N - 4)],
                 np.int32)[:N]
  w = rs.rand(N, k)
  w /= w.sum(1, keepdims=True)
  silu = lambda a: a / (1 + np.exp(-a))
  want = sum(w[:, j, None] * np.stack([(silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e] for n, e in enumerate(ids[:, j])])
             for j in range(k))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  experts = tuple(tuple(f32(a[e]) for e in range(E)) for a in (w1, w3, w2)) if per_expert else None
  got = jax.jit(dispatch_selected)(f32(x), f32(w), jnp.asarray(ids), f32(w1), f32(w3), f32(w2), experts)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_moe_with_expert_views_up_to_one_block_equals_the_blocked_kernel(models):
  """A 16-row decode step and a 128-token prefill chunk given per-expert views (every expert over every
  token, weights read in place) against the same MoE layer without views (the blocked dropless kernel,
  its float32 results checked against NumPy in test_experts)."""
  _, _, model = models
  cfg = model.cfg
  assert cfg.moe_block == 128 and cfg.dtype == "float32"
  state, experts = layer_views(model)[0]
  moe = nnx.merge(nnx.graphdef(model.blocks), state).moe  # layer 0, over the views of its arrays
  graphdef, params = nnx.split(moe)
  run = jax.jit(lambda params, x_BTD, experts: nnx.merge(graphdef, params)(x_BTD, experts=experts)[0])
  for B, T in ((16, 1), (1, 128)):
    x_BTD = jax.random.normal(jax.random.key(B), (B, T, cfg.hidden_size))
    want, got = run(params, x_BTD, None), run(params, x_BTD, experts)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sixteen_row_decode_with_views_takes_the_selected_path(monkeypatch):
  """A 16-row decode step (32 token-expert pairs) with per-expert views runs dispatch_selected (on CPU the
  blocked dropless path pads each expert to 128 rows: 10x slower) and gives the hidden states of the
  scanned stack's dropless path."""
  from flax import nnx
  from mixtral_jax import moe
  from mixtral_jax.model import layer_views
  cfg = mixtral_jax.MixtralConfig(**{**TINY, "param_dtype": "float32", "dtype": "float32"})
  model = mixtral_jax.Mixtral(cfg, rngs=nnx.Rngs(3))
  ids = jnp.asarray(np.random.RandomState(0).randint(1, 1000, (16, 1)), jnp.int32)
  want, _ = model.hidden(ids)
  calls = []
  real = moe.dispatch_selected
  monkeypatch.setattr(moe, "dispatch_selected", lambda *a, **kw: calls.append(1) or real(*a, **kw))
  got, _ = model.hidden(ids, layers=layer_views(model))
  assert len(calls) == cfg.num_hidden_layers
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ mesh


@pytest.mark.slow
def test_expert_parallel_mesh_matches_one_device(models, greedy):
  _, path, _ = models
  model = mixtral_jax.from_pretrained(path, mesh="data=2,expert=4")
  got = generate(model, PROMPTS, NEW, eos_id=None, mesh="data=2,expert=4")
  assert got.tokens == greedy.tokens


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("prompts,kw,match", [
    ([[5, 6], []], {}, "prompt 1 is empty"),
    ([], {}, "at least one prompt"),
    ([list(range(3, 3 + TINY["max_position_embeddings"] + 1))], {}, "longer than the model's context of 256"),
    ([[5] * 250], {"max_new_tokens": 10}, "ask for at most 6 new tokens"),
    ([[5, 1000]], {}, "outside the vocabulary"),
    (["hello"], {}, "no tokenizer"),
    ([[5]], {"stop": "x"}, "stop strings need a tokenizer"),
    ([[5]], {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ([[5]], {"temperature": -1}, "temperature must be >= 0"),
    ([[5]], {"top_p": 1.5}, "top_p must be in"),
])
def test_bad_input_raises_clear_errors(models, prompts, kw, match):
  _, _, model = models
  kw = {"max_new_tokens": 4, **kw}
  with pytest.raises(ValueError, match=match):
    generate(model, prompts, kw.pop("max_new_tokens"), **kw)


# ------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """The ``tiny`` preset (the real 32000-piece vocabulary) saved as our checkpoint."""
  from mixtral_jax import checkpoint
  model = mixtral_jax.create_model(mixtral_jax.get_config("tiny"), seed=1)
  return checkpoint.save(model, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.mark.slow
def test_cli_generate_streams_what_the_api_returns(tiny_checkpoint, capsys):
  from mixtral_jax import cli
  rc = cli.main(["generate", "--model", tiny_checkpoint, "--prompt", "Hello", "--max-new-tokens", "16",
                 "--temperature", "0.8", "--seed", "3"])
  out = capsys.readouterr()
  model = mixtral_jax.from_pretrained(tiny_checkpoint)
  want = mixtral_jax.generate(model, ["Hello"], 16, tokenizer="v1", temperature=0.8, top_p=0.9, seed=3)  # CLI top-p
  assert rc == 0
  assert out.out == "Hello" + want.texts[0] + "\n"  # the prompt, then its continuation
  assert f"{len(want.tokens[0])} tokens, finished by {want.finish_reasons[0]}" in out.err


@pytest.mark.slow
def test_cli_chat_uses_the_instruct_template(tiny_checkpoint, capsys, monkeypatch):
  import io
  from mixtral_jax import cli
  from mixtral_jax.chat import encode_chat
  from mixtral_jax.tokenizer import Tokenizer
  monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\n/exit\n"))
  rc = cli.main(["chat", "--model", tiny_checkpoint, "--max-new-tokens", "16", "--system", "Be brief."])
  out = capsys.readouterr().out
  model = mixtral_jax.from_pretrained(tiny_checkpoint)
  ids = encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])
  want = generate(model, [ids], 16, tokenizer=Tokenizer.load("v1"), temperature=0.7, top_p=0.9, seed=0)  # CLI defaults
  assert rc == 0 and out == want.texts[0] + "\n"


@pytest.mark.slow
def test_cli_generate_reports_bad_input_in_one_line(tiny_checkpoint, capsys):
  from mixtral_jax import cli
  rc = cli.main(["generate", "--model", tiny_checkpoint, "--prompt", "Hello", "--max-new-tokens", "5000"])
  err = capsys.readouterr().err
  assert rc == 2 and "exceeds the model's context of 2048" in err and "Traceback" not in err
