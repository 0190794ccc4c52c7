"""The sentencepiece tokenizer against mistral-common's own (MistralTokenizer.v1()/.v3()), on a few
hundred generated strings; loading from directories; bad files; vocabulary checks."""

import random
import shutil

import numpy as np
import pytest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral_jax.tokenizer import Tokenizer

FRAGMENTS = {
    "ascii": ["hello", "world", "The quick brown fox", "jumps over", "a", "I", "don't", "e.g.", "U.S.A."],
    "accents": ["café", "naïve", "Ångström", "façade", "señor", "Müller", "über", "crème brûlée", "Zoë", "ØRESUND"],
    "digits": ["0", "7", "42", "2024", "3.14159", "1,000,000", "-273.15", "1e-5", "0x1F", "555-0199", "１２３"],
    "space": [" ", "  ", "   ", "        ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", " \n ", "\r\n", "\u00a0"],
    "emoji": ["😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "🚀🔥", "✨", "❤️", "🤖"],
    "code": ["def f(x):\n    return x ** 2", "for (int i = 0; i < n; ++i) { s += a[i]; }", "<div class=\"a\">",
             "import numpy as np", "x_BTD = jnp.einsum('btd,df->btf', x, w)", "SELECT * FROM t WHERE id=1;",
             "{\"key\": [1, 2, {\"n\": null}]}", "#include <stdio.h>", "$ ls -la ~/", "a != b && c || !d"],
    "cjk": ["你好，世界", "日本語のテキスト", "한국어 문장", "漢字", "東京タワー", "中文标点：“引号”"],
    "other": ["Привет мир", "مرحبا بالعالم", "שלום", "Γειά σου", "नमस्ते", "ไทย", "[INST]", "[/INST]", "<s>",
              "</s>", "[TOOL_CALLS]", "ﬁ ligature", "½ ¾", "™ © ®", "\\n literal", "tab\there"],
}
SEPARATORS = ["", " ", "  ", "\n", "\t", "\n\n", " \t ", ", ", "   "]


def generated_strings(n=320, seed=0):
  """Deterministic mixed-script strings; every few has leading or trailing whitespace."""
  rng = random.Random(seed)
  pools = list(FRAGMENTS.values())
  out = ["", " ", "\n", "  leading", "trailing  ", " \t\n mixed", "a" * 300, "\x00\x01 control"]
  for pool in pools:
    out.extend(pool)
  while len(out) < n:
    parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 6))]
    s = "".join(p + rng.choice(SEPARATORS) for p in parts)
    if rng.random() < 0.3:
      s = rng.choice([" ", "  ", "\t", "\n"]) + s
    out.append(s)
  return out


STRINGS = generated_strings()


@pytest.fixture(scope="module", params=["v1", "v3"])
def pair(request):
  """(ours, mistral-common's raw sentencepiece tokenizer, mistral-common's MistralTokenizer)."""
  mistral = MistralTokenizer.v1() if request.param == "v1" else MistralTokenizer.v3()
  return Tokenizer.load(request.param), mistral.instruct_tokenizer.tokenizer, mistral


def test_strings_cover_the_required_kinds():
  joined = "".join(STRINGS)
  for needle in ["é", "42", "   ", "\n", "\t", "😀", "def ", "你好"]:
    assert needle in joined
  assert sum(s[:1].isspace() for s in STRINGS) > 30
  assert len(STRINGS) >= 300


def test_encode_matches_mistral_common(pair):
  ours, theirs, _ = pair
  for s in STRINGS:
    for bos, eos in [(True, False), (False, False), (True, True), (False, True)]:
      assert ours.encode(s, bos=bos, eos=eos) == theirs.encode(s, bos=bos, eos=eos), (s, bos, eos)


def test_default_encode_adds_bos_only(pair):
  ours, theirs, _ = pair
  assert ours.encode("Hello world") == theirs.encode("Hello world", bos=True, eos=False)
  assert ours.encode("Hello world")[0] == ours.bos_id == 1


def test_decode_matches_mistral_common(pair):
  ours, theirs, mistral = pair
  for s in STRINGS:
    ids = theirs.encode(s, bos=True, eos=True)
    assert ours.decode(ids) == mistral.decode(ids), s
    assert ours.decode(np.asarray(ids, np.int32)) == mistral.decode(ids)


def test_decode_round_trips_text(pair):
  ours, _, _ = pair
  for s in STRINGS:
    assert ours.decode(ours.encode(s, bos=True, eos=True)) == s, repr(s)


def test_plain_text_never_yields_control_tokens(pair):
  ours, theirs, _ = pair
  for s in STRINGS:
    assert not any(ours.is_special(i) for i in ours.encode(s, bos=False)), s
  assert {i for i in range(ours.vocab_size) if ours.is_special(i)} == theirs.special_ids


def test_sizes_and_special_ids():
  v1, v3 = Tokenizer.load("v1"), Tokenizer.load("v3")
  assert (v1.vocab_size, v3.vocab_size) == (32000, 32768)
  for tok in (v1, v3):
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert 0 <= tok.pad_id < tok.vocab_size and tok.pad_id not in (tok.bos_id, tok.eos_id)
  mistral_v3 = MistralTokenizer.v3().instruct_tokenizer.tokenizer
  for piece in ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]"]:
    assert v3.special_id(piece) == mistral_v3.get_special_token(piece)
  with pytest.raises(ValueError, match="not a control token"):
    v1.special_id("[TOOL_CALLS]")


def test_decode_keep_special_names_control_tokens():
  tok = Tokenizer.load("v3")
  mistral = MistralTokenizer.v3()
  a = mistral.instruct_tokenizer.tokenizer.encode("Weather in  Paris?", bos=True, eos=False)
  b = mistral.instruct_tokenizer.tokenizer.encode('[{"name": "f", "arguments": {}}]', bos=False, eos=True)
  ids = a + [5] + b  # 5 is [TOOL_CALLS] in the v3 file
  expected = "<s>" + mistral.decode(a) + "[TOOL_CALLS]" + mistral.decode(b) + "</s>"
  assert tok.decode(ids, keep_special=True) == expected
  assert tok.decode(ids) == mistral.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)


def test_load_from_directories(tmp_path, pair):
  ours, _, _ = pair
  hf_dir, mistral_dir = tmp_path / "hf", tmp_path / "consolidated"
  hf_dir.mkdir()
  mistral_dir.mkdir()
  shutil.copy(ours.path, hf_dir / "tokenizer.model")
  shutil.copy(ours.path, mistral_dir / "tokenizer.model.v3")
  for source in (hf_dir, str(hf_dir / "tokenizer.model"), mistral_dir):
    loaded = Tokenizer.load(source)
    assert loaded.vocab_size == ours.vocab_size
    assert loaded.encode(STRINGS[40]) == ours.encode(STRINGS[40])


def test_missing_and_ambiguous_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.model in .*'v1'"):
    Tokenizer.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="tokenizer file not found: .*nope.model"):
    Tokenizer.load(tmp_path / "nope.model")
  for name in ("tokenizer.model.v1", "tokenizer.model.v3"):
    (tmp_path / name).write_bytes(b"x")
  with pytest.raises(ValueError, match="several tokenizer files"):
    Tokenizer.load(tmp_path)


def test_corrupt_and_truncated_files(tmp_path):
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"this is not a protobuf" * 10)
  truncated = tmp_path / "tokenizer.model"
  truncated.write_bytes(open(Tokenizer.load("v1").path, "rb").read()[:5000])
  for path in (garbage, truncated, tmp_path):
    with pytest.raises(ValueError, match="corrupt, truncated or not a sentencepiece model"):
      Tokenizer.load(path)


def test_check_vocab():
  v1, v3 = Tokenizer.load("v1"), Tokenizer.load("v3")
  v1.check_vocab(32000)
  v3.check_vocab(32768)
  with pytest.raises(ValueError, match=r"model's vocabulary has 32768 tokens .* has 32000; load the tokenizer 'v3'"):
    v1.check_vocab(32768)
  with pytest.raises(ValueError, match=r"has 1000 tokens .* has 32768; pass the tokenizer.model"):
    v3.check_vocab(1000)


def test_decode_rejects_ids_outside_vocab():
  tok = Tokenizer.load("v1")
  for bad in (-1, 32000):
    with pytest.raises(ValueError, match=f"token id {bad} is outside"):
      tok.decode([1, 5, bad])
  with pytest.raises(TypeError, match="takes a str"):
    tok.encode(["a list"])
