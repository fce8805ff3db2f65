r"""Which LAPACK calls of a compiled XLA:CPU program could run at the same time.

XLA:CPU runs the operations of a program concurrently wherever no data dependence orders
them. A batched LAPACK call (a ``custom-call`` to ``lapack_*`` with batch dimensions)
spreads its batch over XLA's intra-op thread pool and blocks until its share is done;
two of them at once can each hold the workers the other waits for, and the program
then hangs for ever. :func:`concurrent_lapack_calls` reads the optimised HLO
(``jax.jit(f).lower(*args).compile().as_text()``) and lists every pair of batched LAPACK
calls that nothing orders: in the same computation, neither reaches the other through
operands or control dependences. A ``while``, ``call`` or ``conditional`` that contains
one counts as one at the level where it sits (the calls inside run while it runs); the
branches of a ``conditional`` never run together, and the iterations of a loop run one
after another.
"""

import dataclasses
import math
import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_NAME = re.compile(r"%([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="(lapack_[\w]+)"')
_BATCH_DIMS = re.compile(r'num_batch_dims="(\d+)"')
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class LapackCall:
    """One LAPACK custom-call: its instruction, computation, target and batch size."""

    name: str
    computation: str
    target: str
    batch: int


@dataclasses.dataclass
class _Computation:
    name: str
    operands: dict[str, set[str]]  # instruction -> instructions it reads or waits for
    calls: dict[str, set[str]]  # instruction -> computations it runs (not fusions)
    lapack: dict[str, LapackCall]


def _parse(hlo: str) -> tuple[dict[str, _Computation], str]:
    computations: dict[str, _Computation] = {}
    entry = ""
    current: _Computation | None = None
    lines: list[tuple[str, str]] = []
    for line in hlo.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and "->" in line:
                current = _Computation(header.group(1), {}, {}, {})
                if line.startswith("ENTRY"):
                    entry = current.name
                lines = []
            continue
        if line.strip() == "}":
            computations[current.name] = current
            current.operands = {name: set() for name, _ in lines}
            for name, rest in lines:
                current.operands[name] = {n for n in _NAME.findall(rest) if n in current.operands}
                current.calls[name] = {n for n in _NAME.findall(rest) if n not in current.operands}
                target = _TARGET.search(rest)
                if target:
                    current.lapack[name] = LapackCall(
                        name, current.name, target.group(1), _batch_size(rest)
                    )
            current = None
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction:
            lines.append((instruction.group(1), instruction.group(2)))
    for computation in computations.values():
        for name, called in computation.calls.items():
            # a fusion's computation holds no custom-calls; only these run computations
            computation.calls[name] = {c for c in called if c in computations}
    return computations, entry


def _batch_size(instruction: str) -> int:
    shape = _SHAPE.search(instruction)
    dims = [int(d) for d in shape.group(1).split(",") if d] if shape else []
    batch_dims = _BATCH_DIMS.search(instruction)
    count = int(batch_dims.group(1)) if batch_dims else max(len(dims) - 2, 0)
    return math.prod(dims[:count])


def _ancestors(operands: dict[str, set[str]]) -> dict[str, set[str]]:
    memo: dict[str, set[str]] = {}
    for start in operands:
        stack = [(start, iter(operands[start]))]
        if start in memo:
            continue
        memo[start] = set()
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                if stack:
                    memo[stack[-1][0]] |= memo[node] | {node}
            elif child in memo:
                memo[node] |= memo[child] | {child}
            else:
                memo[child] = set()
                stack.append((child, iter(operands[child])))
    return memo


def lapack_calls(hlo: str) -> list[LapackCall]:
    """Every LAPACK custom-call of the program, with its batch size."""
    computations, _ = _parse(hlo)
    return [call for c in computations.values() for call in c.lapack.values()]


def concurrent_lapack_calls(
    hlo: str, min_batch: int = 2
) -> list[tuple[list[LapackCall], list[LapackCall]]]:
    """Pairs of groups of LAPACK calls (batch at least ``min_batch``) that nothing orders.

    Each pair is two instructions of one computation, neither of which reaches the
    other, each a LAPACK call or a loop, call or conditional containing some; the
    groups are the calls each stands for.
    """
    computations, entry = _parse(hlo)
    contained: dict[str, list[LapackCall]] = {}

    def inside(name: str) -> list[LapackCall]:
        if name not in contained:
            contained[name] = []
            computation = computations[name]
            found = [c for c in computation.lapack.values() if c.batch >= min_batch]
            for called in computation.calls.values():
                for c in called:
                    found += inside(c)
            contained[name] = found
        return contained[name]

    pairs = []
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        computation = computations[name]
        holders: dict[str, list[LapackCall]] = {}
        for instruction, called in computation.calls.items():
            group = [c for c in called for c in inside(c)]
            call = computation.lapack.get(instruction)
            if call is not None and call.batch >= min_batch:
                group.append(call)
            if group:
                holders[instruction] = group
            todo += called
        ancestors = _ancestors(computation.operands)
        names = sorted(holders)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if a not in ancestors[b] and b not in ancestors[a]:
                    pairs.append((holders[a], holders[b]))
    return pairs


def describe(pairs) -> str:
    """The pairs, one a line, for an assertion message or a report."""

    def group(calls):
        return ", ".join(
            f"{c.name} ({c.target}, batch {c.batch}, in {c.computation})" for c in calls
        )

    return "\n".join(f"{group(a)}  ||  {group(b)}" for a, b in pairs)
