"""``benchmarks/accelerator.py --smoke``: the GPU benchmark's code path, on CPU at tiny shapes, in a
one-device child. Checks that every section produced its figures (none failed), each as a fraction of
the (here measured) peak, that the attention kernels agree with blockwise on the same inputs, and that
the JSON and markdown reports are written. About 80 s of CPU time, nearly all compiling."""

import json
import os
import subprocess
import sys

import pytest

from processes import child_env

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.mark.subprocess_cli
def test_smoke_run_writes_every_section(tmp_path):
  p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accelerator.py"), "--smoke", "--out",
                      str(tmp_path)], env=child_env(JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-4000:]
  report = json.load(open(tmp_path / "accelerator.json"))
  rows = report["rows"]
  assert {r["section"] for r in rows} == {"train", "moe", "attention", "decode"}
  assert len([r for r in rows if r["section"] == "train"]) == 2  # dropless and capacity 1.25
  assert len([r for r in rows if r["section"] == "decode"]) == 4  # bf16 / int8 x batch 1 / 8
  for r in rows:
    assert "error" not in r, r
    assert r["value"] > 0 and r["fraction_of_peak"] > 0, r
  for r in rows:
    if r["section"] == "attention":
      assert r["max_abs_diff_vs_blockwise"] < 0.05, r  # bf16 outputs of the same attention
  assert "measured on this machine" in report["peaks"]["source"]
  md = open(tmp_path / "accelerator.md").read()
  assert "| section | measurement | value | unit | fraction of peak | note |" in md
  assert md.count("\n| ") == len(rows) + 1
