"""FLOPs and collective bytes of an optimised HLO module's text (XLA:CPU, XLA:GPU or the TPU compiler).

``hlo_stats(compiled.as_text())`` walks every computation, weights each by how often it runs (the
trip counts of the ``while`` loops around it), and sums:

* FLOPs of every ``dot`` (2 x output elements x contracted size) and every ``convolution`` (the TPU
  compiler writes most matmuls as convolutions inside fusions: 2 x the multiply-adds of the window,
  counting only kernel positions that land on real, non-padding input, as XLA's own cost analysis);
* bytes and count of ``all-to-all``; count and output-buffer bytes of ``ragged-all-to-all`` (its real
  traffic depends on the routing; the buffer is the worst case). An async collective is a
  ``-start``/``-done`` pair (XLA:GPU writes every all-to-all so); it is counted once, at its ``-done``,
  whose type is the output alone: the ``-start``'s type is a tuple of the input *and* output buffers,
  and summing it counted every GPU all-to-all twice (the "2x analytic" capacity figure of issue 18);
* custom calls by target (``tpu_custom_call`` is a Mosaic/Pallas kernel, whose FLOPs are not counted),
  the Mosaic kernels by name (``splash_mha_fwd_segmented_residuals``, ``ragged-dot-none``, ...), and
  ``kernels``: the fused kernels in words (cuDNN attention, Triton and Mosaic GPU kernels such as
  tokamax's grouped GEMM, TPU Mosaic kernels, ragged all-to-all).

Trip counts: XLA:CPU/GPU print ``known_trip_count`` in the loop's backend config. The TPU compiler
does not; there the count is read from the loop condition, ``counter < constant`` (JAX's scans and
``fori_loop``s start their counter at 0 and step by 1). A loop whose bound is data (the blocked
dropless kernel's ``while_loop``, blockwise attention's live key blocks) is counted once and reported
in ``unknown_trip_loops``, with the FLOPs of its body in ``unknown_trip_flops``; ``plan`` scales
blockwise attention's by the key blocks a causal (or windowed) query block visits on average.

Why not ``compiled.cost_analysis()["flops"]``: it counts each loop body once, so a scanned layer
stack of L layers is counted as one layer (and a gradient-accumulation scan as one microbatch).
"""

from __future__ import annotations

import math
import re

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# dtype[dims]; TPU layouts such as {2,1,0:T(8,128)(2,1)S(1)} follow in braces and are ignored.
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLEES = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]+)"')
# Collectives whose participants ``collectives`` records (an async pair is counted at its -start, which
# carries the groups). Replica groups are written {{0,1},{2,3}} or in iota form [2,2]<=[4] / [2,2]<=[2,2]T(1,0).
_GROUPED = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all")
# Multi-slice TPU programs: the compiled module is one slice's (partition ids local to a slice), and what
# crosses slices is a host-transfer send/recv pair that the Megascale runtime carries over DCN.
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')
_GROUPS = re.compile(r"(replica_groups|source_target_pairs)=(\{[{}0-9, ]*\}|\[[0-9,]+\]<=\[[0-9,]+\](?:T\([0-9,]+\))?)")
# Custom-call target prefix -> what the kernel is, for ``kernels``.
_KERNEL_KINDS = (("__cudnn$fmha", "cuDNN fused attention"), ("__gpu$xla.gpu.triton", "Triton kernel"),
                 ("mosaic_gpu", "Mosaic GPU kernel"), ("tpu_custom_call", "TPU Mosaic kernel"))


def kernel_kind(target: str) -> str | None:
  """'cuDNN fused attention' for ``__cudnn$fmhaSoftmax``, ...; None for a target that is not a fused kernel."""
  return next((kind for prefix, kind in _KERNEL_KINDS if target.startswith(prefix)), None)


def arrays(text: str):
  """(dtype, dims) of every array type written in ``text``."""
  return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(text)]


def nbytes(arrs) -> int:
  return sum(_DTYPE_BYTES.get(d, 1 if d.startswith("f8") else 4) * math.prod(dims) for d, dims in arrs)


def _split_type(rest: str) -> tuple[str, str]:
  """'f32[2,3]{1,0} dot(...)' or '(f32[2], s32[]) tuple(...)' -> (type text, the rest)."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _operands(rest: str) -> list[str]:
  """Top-level operand texts of 'op(a, b, /*index=5*/c), attrs...'."""
  start = rest.index("(") + 1
  depth, out, cur = 1, [], []
  for ch in rest[start:]:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        break
    if ch == "," and depth == 1:
      out.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  out.append("".join(cur))
  return [re.sub(r"/\*.*?\*/", "", o).strip() for o in out if o.strip()]


def _operand_shape(text: str, shapes: dict) -> tuple[int, ...] | None:
  inline = arrays(text)
  if inline:
    return inline[0][1]
  known = shapes.get(text.split()[-1].lstrip("%")) if text else None
  return known[0][1] if known else None


def _operand_bytes(text: str, shapes: dict) -> int:
  """Bytes of one operand, typed inline ('f32[8]{0} %x') or by name ('%x')."""
  inline = arrays(text)
  return nbytes(inline) if inline else nbytes(shapes.get(text.split()[-1].lstrip("%"), []) if text else [])


def _contracted(rest, shapes) -> int:
  """The contracted size of a dot (product of the lhs contracting dims; 0 when the lhs is unknown)."""
  lhs = _operand_shape(_operands(rest)[0], shapes)
  m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
  dims = [int(d) for d in m.group(1).split(",") if d] if m else []
  return math.prod(lhs[d] for d in dims) if lhs is not None else 0


def _dot_flops(type_text, rest, shapes) -> int:
  return 2 * math.prod(arrays(type_text)[0][1]) * _contracted(rest, shapes)


def _valid_pairs(in_size, out_size, size, stride, lo, lhs_dil, rhs_dil) -> int:
  """Number of (output position, kernel position) pairs of one spatial dimension whose input position
  is a real element (not padding, not a hole of the lhs dilation)."""
  last = (in_size - 1) * lhs_dil  # the last real element in dilated coordinates
  total = 0
  for k in range(size):
    # o * stride + c, c = k * rhs_dil - lo, must lie in [0, last] and be a multiple of lhs_dil.
    c = k * rhs_dil - lo
    o_min = (-c + stride - 1) // stride if c < 0 else 0
    o_max = min(out_size - 1, (last - c) // stride) if last - c >= 0 else -1
    if o_max < o_min:
      continue
    if lhs_dil == 1:
      total += o_max - o_min + 1
    else:
      total += sum(1 for o in range(o_min, o_max + 1) if (o * stride + c) % lhs_dil == 0)
  return total


def _conv_flops(type_text, rest, shapes) -> int:
  ops = _operands(rest)
  lhs, rhs = _operand_shape(ops[0], shapes), _operand_shape(ops[1], shapes)
  out = arrays(type_text)[0][1]
  labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", rest)
  if lhs is None or rhs is None or labels is None:
    return 0
  lhs_l, rhs_l, out_l = labels.groups()
  window = {}
  wm = re.search(r"window=\{([^}]*)\}", rest)
  for item in (wm.group(1).split() if wm else []):
    key, _, value = item.partition("=")
    window[key] = value.split("x")
  spatial = sorted(c for c in lhs_l if c.isdigit())
  fgc = int((re.search(r"feature_group_count=(\d+)", rest) or [None, 1])[1])
  bgc = int((re.search(r"batch_group_count=(\d+)", rest) or [None, 1])[1])
  pairs = 1
  for i, s in enumerate(spatial):
    get = lambda key, default, i=i: int(window[key][i]) if key in window else default
    pad = window["pad"][i].split("_") if "pad" in window else ("0", "0")
    pairs *= _valid_pairs(lhs[lhs_l.index(s)], out[out_l.index(s)], get("size", 1), get("stride", 1),
                          int(pad[0]), get("lhs_dilate", 1), get("rhs_dilate", 1))
  batch, in_feat, out_feat = lhs[lhs_l.index("b")], lhs[lhs_l.index("f")], rhs[rhs_l.index("o")]
  return 2 * (in_feat // fgc) * out_feat * (batch // bgc) * pairs


def _trip_from_condition(lines: list[str]) -> int | None:
  """``counter < N`` (or ``N > counter``) at the root of a loop condition -> N; else None."""
  consts = {}
  root = None
  for line in lines:
    m = _INSTR.match(line)
    if not m:
      continue
    c = re.search(r"\bconstant\((-?\d+)\)", line)
    if c:
      consts[m.group(1)] = int(c.group(1))
    if line.lstrip().startswith("ROOT"):
      root = line
  if root is None or " compare(" not in root:
    return None
  direction = re.search(r"direction=(\w+)", root)
  a, b = (o.split()[-1].lstrip("%") for o in _operands(root[root.index(" compare(") + 1:])[:2])
  d = direction.group(1) if direction else ""
  if b in consts and d in ("LT", "LE"):
    return consts[b] + (d == "LE")
  if a in consts and d in ("GT", "GE"):
    return consts[a] + (d == "GE")
  return None


def hlo_stats(hlo: str) -> dict:
  """Trip-count-weighted FLOPs and collective traffic of an optimised HLO module's text.

  Returns {flops, all_to_all_bytes, all_to_all_ops, ragged_all_to_all_ops, ragged_all_to_all_buffer_bytes,
  custom_calls: {target: count}, mosaic_kernels: {name: count}, kernels: {description: count},
  dot_contracted_sizes: {contracted size: count} (an expanded grouped matmul shows as a dot contracting
  groups x features), unknown_trip_loops, unknown_trip_flops (the FLOPs inside those loops, counted once),
  collectives: [{op, name, weight, groups (replica groups or source-target pairs as written), bytes (operand
  bytes per device)}] for ``dcn``, including multi-slice TPU's DCN sends as op ``dcn-all-reduce`` etc.,
  num_partitions (of the module header; a multi-slice TPU module counts one slice's)}. A computation's
  weight is the sum over its call
  sites of the caller's weight times the site's trip count (1 for fusions, calls and branches, so
  branches count as if all ran).
  """
  shapes, instrs, edges, bodies, comp_lines, entry = _parse(hlo)
  unknown_bodies = _add_loop_edges(bodies, comp_lines, edges)
  unknown = len(unknown_bodies)

  weights: dict[str, int] = {}

  def weight(c: str) -> int:
    if c not in weights:
      weights[c] = 1 if c == entry else 0  # 0 first: a cycle (none in HLO) cannot recurse forever
      weights[c] = (1 if c == entry else 0) + sum(weight(p) * n for p, n in edges.get(c, ()))
    return weights[c]

  inside: dict[str, bool] = {}

  def in_unknown_loop(c: str) -> bool:
    """Whether ``c`` runs inside the body of a loop whose trip count is data (counted once)."""
    if c not in inside:
      inside[c] = False  # first: a cycle (none in HLO) cannot recurse forever
      inside[c] = c in unknown_bodies or any(in_unknown_loop(p) for p, _ in edges.get(c, ()))
    return inside[c]

  out = _tally(instrs, shapes, weight, unknown, in_unknown_loop)
  parts = re.search(r"num_partitions=(\d+)", hlo.split("\n", 1)[0])
  out["num_partitions"] = int(parts.group(1)) if parts else None
  return out


def _parse(hlo: str):
  """One pass over the module's lines: (result shapes by instruction name, instructions as (computation,
  op, type text, the rest of the line, name), call edges {callee: [(caller, 1)]} of fusions, calls and
  branches, while loops as (caller, body, condition, trip count from the backend config or None), each
  computation's lines, the entry computation's name)."""
  shapes: dict[str, list] = {}
  instrs = []  # (computation, op, type text, the rest of the line, instruction name)
  edges: dict[str, list] = {}
  bodies: list[tuple[str, str, str, str | None]] = []  # (caller, body, condition, trip from backend config)
  comp_lines: dict[str, list[str]] = {}
  entry = comp = None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("(")[0]:
      comp = header.group(2)
      entry = comp if header.group(1) else entry
      comp_lines[comp] = []
      continue
    m = _INSTR.match(line)
    if not m or comp is None:
      continue
    comp_lines[comp].append(line)
    type_text, rest = _split_type(line[m.end():])
    op = rest.split("(", 1)[0].strip()
    shapes[m.group(1)] = arrays(type_text)
    instrs.append((comp, op, type_text, rest, m.group(1)))
    callees = _CALLEES.findall(rest)
    if op == "while":
      t = _TRIP.search(rest)
      named = dict(callees)
      bodies.append((comp, named.get("body"), named.get("condition"), t.group(1) if t else None))
      callees = [(k, c) for k, c in callees if k != "body"]
    for _, callee in callees:
      edges.setdefault(callee, []).append((comp, 1))
    for group in _BRANCHES.findall(rest):
      for callee in group.split(","):
        edges.setdefault(callee.strip().lstrip("%"), []).append((comp, 1))
  return shapes, instrs, edges, bodies, comp_lines, entry


def _add_loop_edges(bodies, comp_lines, edges) -> set:
  """Adds each while body's edge from its caller weighted by the trip count (from the backend config,
  else read from the loop condition, else 1); returns the bodies whose trip count is data."""
  unknown_bodies = set()
  for caller, body, cond, known in bodies:
    trip = int(known) if known is not None else _trip_from_condition(comp_lines.get(cond, []))
    if trip is None:
      unknown_bodies.add(body)
    edges.setdefault(body, []).append((caller, trip or 1))

  return unknown_bodies


def _tally(instrs, shapes, weight, unknown: int, in_unknown_loop) -> dict:
  """Sums FLOPs, collectives and kernels over ``instrs``, each instruction weighted by its computation's
  run count ``weight(computation)``; FLOPs inside loops of data-dependent trip count (counted once) are
  also summed apart, so a caller that knows the expected trips can scale them."""
  out = {"flops": 0, "all_to_all_bytes": 0, "all_to_all_ops": 0, "ragged_all_to_all_ops": 0,
         "ragged_all_to_all_buffer_bytes": 0, "custom_calls": {}, "mosaic_kernels": {}, "kernels": {},
         "dot_contracted_sizes": {}, "unknown_trip_loops": unknown, "unknown_trip_flops": 0, "collectives": []}
  for comp, op, type_text, rest, name in instrs:
    w = weight(comp)
    base = op.removesuffix("-start")
    groups = _GROUPS.search(rest) if base in _GROUPED else None
    megascale = _MEGASCALE.search(rest) if op == "send" else None
    if megascale:  # the buffer sent over DCN: the first element of the send's (buffer, context, token)
      out["collectives"].append({"op": "dcn-" + megascale.group(1).lower().replace("_", "-"), "name": name,
                                 "weight": w, "groups": "", "bytes": nbytes(arrays(type_text)[:1])})
    if groups:  # operand bytes per device: what this device puts into the collective
      out["collectives"].append({"op": base, "name": name, "weight": w, "groups": groups.group(2),
                                 "bytes": sum(_operand_bytes(t, shapes) for t in _operands(rest))})
    if op in ("dot", "convolution"):
      flops = w * (_dot_flops if op == "dot" else _conv_flops)(type_text, rest, shapes)
      out["flops"] += flops
      out["unknown_trip_flops"] += flops if in_unknown_loop(comp) else 0
    if op == "dot":
      size = _contracted(rest, shapes)
      out["dot_contracted_sizes"][size] = out["dot_contracted_sizes"].get(size, 0) + w
    elif op in ("all-to-all", "all-to-all-done"):  # not -start: its type holds the input buffers too
      out["all_to_all_bytes"] += w * nbytes(arrays(type_text))
      out["all_to_all_ops"] += w
    elif op in ("ragged-all-to-all", "ragged-all-to-all-done"):
      out["ragged_all_to_all_ops"] += w
      out["ragged_all_to_all_buffer_bytes"] += w * nbytes(arrays(type_text)[:1])
    elif op == "custom-call":
      target = _CUSTOM_TARGET.search(rest)
      if target:
        out["custom_calls"][target.group(1)] = out["custom_calls"].get(target.group(1), 0) + w
        kind = kernel_kind(target.group(1))
        if kind:
          label = f"{kind} ({target.group(1)})"
          out["kernels"][label] = out["kernels"].get(label, 0) + w
      if target and target.group(1) == "tpu_custom_call":
        kernel = re.sub(r"(\.\d+)+$", "", name)
        out["mosaic_kernels"][kernel] = out["mosaic_kernels"].get(kernel, 0) + w
  return out
