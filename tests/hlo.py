"""The collectives of a compiled HLO module, read structurally from its text (``compiled.as_text()``).

One ``Collective`` per all-gather / all-to-all / reduce-scatter / all-reduce / collective-permute
instruction, synchronous or the ``-start`` half of an asynchronous pair (whose result is a tuple:
operands first, then results), with its result arrays and its replica groups expanded to device
positions. XLA prints replica groups in three forms, all read here:

  {{0,1,2,3},{4,5,6,7}}                               explicit lists
  [2,4]<=[8]  /  [4,2]<=[2,4]T(1,0)                   iota: arange(8) reshaped [2,4], transposed, rows
  mesh['axis_0'=2,'axis_1'=4], device_ids=([2,4]T(1,0)) {'axis_1'}
                                                      a mesh of device ids (default arange), one group
                                                      per index of the axes not listed in {...}
"""

import dataclasses
import math
import re

import numpy as np

OPS = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce", "collective-permute")

_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # one of OPS (an async "-start" reported under its op's name)
    outputs: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each result array
    groups: frozenset[tuple[int, ...]]  # replica groups, device positions in the module's assignment
    text: str


def _closing(s: str, i: int) -> int:
    """Index just past the bracket group opening at s[i]."""
    pairs, depth = {"(": ")", "[": "]", "{": "}"}, []
    for j in range(i, len(s)):
        if s[j] in pairs:
            depth.append(pairs[s[j]])
        elif depth and s[j] == depth[-1]:
            depth.pop()
            if not depth:
                return j + 1
    raise ValueError(f"unbalanced brackets in HLO line: {s}")


def _top_level(s: str) -> list[str]:
    """Elements of a tuple shape "(a, (b, c), d)" -> ["a", "(b, c)", "d"]."""
    out, i, start = [], 1, 1
    while i < len(s) - 1:
        if s[i] in "([{":
            i = _closing(s, i)
            continue
        if s[i] == ",":
            out.append(s[start:i].strip())
            start = i + 1
        i += 1
    out.append(s[start : len(s) - 1].strip())
    return [e for e in out if e]


def _arrays(shape: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape))


def _iota(spec: str) -> np.ndarray:
    """ "[2,4]T(1,0)" or "[8]" -> the device ids laid out: arange(prod) reshaped, transposed."""
    m = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", spec.strip())
    if not m:
        raise ValueError(f"unknown iota device list {spec!r}")
    dims = [int(d) for d in m.group(1).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    return ids.transpose([int(p) for p in m.group(2).split(",")]) if m.group(2) else ids


def _groups(line: str, n_devices: int) -> frozenset[tuple[int, ...]]:
    i = line.find("replica_groups=")
    if i < 0:  # e.g. collective-permute: source_target_pairs instead
        return frozenset()
    s = line[i + len("replica_groups=") :]
    if s.startswith("{"):
        body = s[: _closing(s, 0)]
        groups = [tuple(int(v) for v in g.split(",") if v) for g in re.findall(r"\{([\d,]*)\}", body[1:-1])]
        return frozenset(groups) if groups else frozenset([tuple(range(n_devices))])
    m = re.match(r"\[(\d+),(\d+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", s)
    if m:
        return frozenset(map(tuple, _iota(m.group(3)).reshape(int(m.group(1)), int(m.group(2))).tolist()))
    m = re.match(r"mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))? \{([^}]*)\}", s)
    if m:
        names_sizes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [n for n, _ in names_sizes], [int(v) for _, v in names_sizes]
        ids = _iota(m.group(2)) if m.group(2) else np.arange(math.prod(sizes))
        ids = ids.reshape(sizes)
        inside = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(3))]
        outside = [a for a in range(len(names)) if a not in inside]
        size = math.prod(sizes[a] for a in inside)
        return frozenset(map(tuple, ids.transpose(outside + inside).reshape(-1, size).tolist()))
    raise ValueError(f"unknown replica_groups format: {s[:120]!r}")


def collectives(hlo_text: str, n_devices: int) -> list[Collective]:
    """Every collective instruction of ``hlo_text`` (all computations), in order."""
    found = []
    for line in hlo_text.splitlines():
        head = _HEAD.match(line)
        if not head:
            continue
        i = head.end()
        end = _closing(line, i) if line[i] == "(" else line.index(" ", i)
        shape, rest = line[i:end], line[end:].lstrip()
        m = re.match(r"([a-z][\w\-]*)\(", rest)
        if not m:
            continue
        op = m.group(1)
        base = op.removesuffix("-start")
        if base not in OPS:
            continue
        if op.endswith("-start") and shape.startswith("("):  # (operands, results[, context])
            shape = ",".join(_top_level(shape)[1:])
        found.append(Collective(base, _arrays(shape), _groups(rest, n_devices), line.strip()))
    return found


def axis_groups(mesh_shape: tuple[int, ...], axes: tuple[int, ...]) -> frozenset[tuple[int, ...]]:
    """Replica groups of a collective over mesh dimensions ``axes`` (device positions in mesh order)."""
    ids = np.arange(math.prod(mesh_shape)).reshape(mesh_shape)
    outside = [a for a in range(len(mesh_shape)) if a not in axes]
    size = math.prod(mesh_shape[a] for a in axes)
    return frozenset(map(tuple, ids.transpose(outside + list(axes)).reshape(-1, size).tolist()))
