r"""How a computed array depends on an svgp output: read off its jaxpr.

The ELBO may integrate an observed site's log density over :math:`q(f)` point by point
(closed form or Gauss–Hermite quadrature) only if that log density is a sum of terms
that each depend on a single :math:`f_n`. This module decides that from the jaxpr of
the computation, by abstract interpretation: every variable gets a :class:`Tag`,

- ``CONST``: does not depend on :math:`f` at all;
- ``POINTWISE(dims, shifted)``: element :math:`i` depends on :math:`f` only through the
  entry of :math:`f` at the same index along the axes ``dims`` (one per axis of
  :math:`f`); ``shifted`` when the value is :math:`f` moved by shape-only operations
  plus something that does not depend on :math:`f` (what the Gaussian closed form needs);
- ``SINGLE``: each element depends on one entry of :math:`f`, at an index not tracked;
- ``ADDITIVE``: each element is a sum of functions of one entry of :math:`f` each;
- ``ANY``: anything else (with the operation where the structure was lost).

The rules are conservative: an operation not listed below, a loop, or a branch on a
value that depends on :math:`f` gives ``ANY``, and the ELBO then uses Monte Carlo.
If a site's total log density is ``ADDITIVE`` in each svgp output separately, its
expectation under independent Gaussian marginals is exactly a product-rule quadrature
over those outputs.
"""

from typing import NamedTuple

from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var

__all__ = ["Tag", "CONST", "any_tag", "pointwise", "analyse", "prune"]


class Tag(NamedTuple):
    kind: str
    """``"const"``, ``"pointwise"``, ``"single"``, ``"additive"`` or ``"any"``."""
    dims: tuple = ()
    """For ``"pointwise"``: the axis of the value that carries each axis of :math:`f`."""
    shifted: bool = False
    """For ``"pointwise"``: :math:`f` moved by shape-only operations plus a constant."""
    reason: str = ""
    """For ``"single"``, ``"additive"`` and ``"any"``: the operation where the pointwise
    structure was lost (and, for ``"any"``, the one that made it unusable)."""


CONST = Tag("const")
_RANK = {"const": 0, "pointwise": 1, "single": 2, "additive": 3, "any": 4}


def any_tag(reason: str) -> Tag:
    return Tag("any", reason=reason)


def _origin(tags) -> str:
    return next((t.reason for t in tags if t.kind in ("single", "additive") and t.reason), "")


def _single(name, tags=()) -> Tag:
    """Each element depends on one entry of f: made by ``name`` (or earlier, by ``tags``)."""
    return Tag("single", reason=_origin(tags) or name)


def _additive(name, tags=()) -> Tag:
    return Tag("additive", reason=_origin(tags) or name)


def _lost(name, tags) -> Tag:
    """Structure lost at ``name``, applied to values made by an earlier operation."""
    origin = _origin(tags)
    return any_tag(f"{origin}` then `{name}" if origin and origin != name else name)


def pointwise(dims, shifted=False) -> Tag:
    return Tag("pointwise", tuple(dims), shifted)


# elementwise primitives (operands of one shape, or rank-0)
_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt ceil
    clamp conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc
    exp exp2 expm1 floor ge gt igamma igamma_grad_a igammac imag integer_pow is_finite le
    lgamma log log1p logistic lt max min mul ne neg nextafter not or polygamma pow
    random_gamma_grad real reduce_precision regularized_incomplete_beta rem round rsqrt
    select_n sign sin sinh sqrt square stop_gradient sub tan tanh xor zeta""".split()
)
# elementwise primitives that are linear in their operands (under the conditions below)
_LINEAR = frozenset(
    "add sub neg convert_element_type copy copy_p reduce_precision real imag".split()
)
_SHAPE_ONLY = frozenset("convert_element_type copy copy_p reduce_precision".split())
_CALLS = frozenset(
    "jit pjit closed_call core_call custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr "
    "checkpoint remat custom_lin".split()
)
_NONLINEAR_REDUCTIONS = frozenset(
    "reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin".split()
)
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())


def _join(tags) -> Tag:
    """The least tag above all of ``tags`` (pointwise tags on other axes meet at SINGLE)."""
    tags = [t for t in tags if t.kind != "const"]
    if not tags:
        return CONST
    worst = max(tags, key=lambda t: _RANK[t.kind])
    if worst.kind == "pointwise" and any(t.dims != worst.dims for t in tags):
        return _single("cond")
    if worst.kind == "pointwise":
        return pointwise(worst.dims, all(t.shifted for t in tags))
    return worst


def _elementwise(name, in_tags, eqn) -> Tag:
    live = [(i, t) for i, t in enumerate(in_tags) if t.kind != "const"]
    if not live:
        return CONST
    if any(t.kind == "any" for _, t in live):
        return next(t for _, t in live if t.kind == "any")
    linear = (
        name in _LINEAR
        or (name == "mul" and len(live) == 1)
        or (name == "div" and [i for i, _ in live] == [0])
        or (name == "select_n" and in_tags[0].kind == "const")
    )
    tags = [t for _, t in live]
    if any(t.kind == "additive" for t in tags):
        return _additive(name, tags) if linear else _lost(name, tags)
    out_ndim = len(eqn.outvars[0].aval.shape)
    kinds = {t.kind for _, t in live}
    if kinds == {"pointwise"} and len({t.dims for _, t in live}) == 1:
        (first_index, first), *rest = live
        ranks_ok = all(len(eqn.invars[i].aval.shape) == out_ndim for i, _ in live)
        if ranks_ok:
            shifted = (
                not rest
                and first.shifted
                and (
                    name in _SHAPE_ONLY
                    or (name in ("add", "sub") and first_index == 0)
                    or (name == "add" and first_index == 1)
                )
            )
            return pointwise(first.dims, shifted)
    if len(live) == 1:
        return _single(name, tags)
    return _additive(name, tags) if name in ("add", "sub") else _lost(name, tags)


def _map_dims(tag: Tag, mapping, name="reshape") -> Tag:
    """``tag`` with each pointwise axis ``d`` moved to ``mapping(d)`` (None: lost)."""
    if tag.kind != "pointwise":
        return tag
    dims = tuple(mapping(d) for d in tag.dims)
    if any(d is None for d in dims):
        return _single(name)
    return pointwise(dims, tag.shifted)


def _reshape_mapping(old_shape, new_shape):
    """Axis map for a reshape that only inserts or removes axes of size 1, else None."""
    old = [(i, s) for i, s in enumerate(old_shape) if s != 1]
    new = [(i, s) for i, s in enumerate(new_shape) if s != 1]
    if [s for _, s in old] != [s for _, s in new]:
        return None
    table = {i: j for (i, _), (j, _) in zip(old, new, strict=True)}
    return table.get


def _reduced_axes_mapping(ndim, axes):
    kept = [d for d in range(ndim) if d not in axes]
    return {d: kept.index(d) for d in kept}.get


def _structural(name, eqn, in_tags) -> Tag | None:
    """Rules for shape operations, reductions and contractions; None if not one."""
    params = eqn.params
    shapes = [tuple(v.aval.shape) for v in eqn.invars]
    out_shape = tuple(eqn.outvars[0].aval.shape)
    tag = in_tags[0] if in_tags else CONST
    if name == "broadcast_in_dim":
        bd = params["broadcast_dimensions"]
        return _map_dims(tag, lambda d: bd[d] if shapes[0][d] == out_shape[bd[d]] else None, name)
    if name == "reshape":
        if params.get("dimensions") is not None:
            return _map_dims(tag, lambda d: None)
        mapping = _reshape_mapping(shapes[0], out_shape)
        if mapping is None:
            return _map_dims(tag, lambda d: None)
        return _map_dims(tag, lambda d: mapping(d) if shapes[0][d] != 1 else None)
    if name == "squeeze":
        return _map_dims(tag, _reduced_axes_mapping(len(shapes[0]), set(params["dimensions"])))
    if name == "expand_dims":
        mapping = _reshape_mapping(shapes[0], out_shape)
        return _map_dims(tag, mapping if mapping else (lambda d: None))
    if name == "transpose":
        perm = list(params["permutation"])
        return _map_dims(tag, perm.index)
    if name == "reduce_sum" or name in _NONLINEAR_REDUCTIONS:
        axes = set(params["axes"])
        if tag.kind == "pointwise" and not axes & set(tag.dims):
            mapped = _map_dims(tag, _reduced_axes_mapping(len(shapes[0]), axes))
            return pointwise(mapped.dims) if mapped.kind == "pointwise" else mapped
        if tag.kind in ("const", "any"):
            return tag
        # a sum over the points is additive; a maximum or product over them is not
        return _additive(name, [tag]) if name == "reduce_sum" else _lost(name, [tag])
    if name in _CUMULATIVE:
        if tag.kind == "pointwise" and params["axis"] not in tag.dims:
            return pointwise(tag.dims)
        if name == "cumsum" and tag.kind != "any":
            return _additive(name, [tag])
        return tag if tag.kind == "any" else _lost(name, [tag])
    if name in ("slice", "dynamic_slice", "gather", "rev", "pad", "sort"):
        if any(t.kind != "const" for t in in_tags[1:]):
            return any_tag(name)  # indices or padding that depend on f
        if name == "sort":
            dimension = params["dimension"]
            if len(in_tags) == 1 and tag.kind == "pointwise" and dimension not in tag.dims:
                return pointwise(tag.dims)
            return tag if tag.kind in ("const", "any") else _lost(name, [tag])
        if name == "slice" and tag.kind == "pointwise":
            starts, limits = params["start_indices"], params["limit_indices"]
            strides = params["strides"] or (1,) * len(starts)
            whole = all(
                starts[d] == 0 and limits[d] == shapes[0][d] and strides[d] == 1 for d in tag.dims
            )
            return pointwise(tag.dims, tag.shifted) if whole else _single(name)
        return _single(name) if tag.kind == "pointwise" else tag
    if name in ("concatenate", "stack"):
        axis = params["dimension"] if name == "concatenate" else params["axis"]
        joined = _join(in_tags)
        if joined.kind == "pointwise" and name == "concatenate" and axis not in joined.dims:
            return pointwise(joined.dims)
        if joined.kind == "pointwise" and name == "stack":
            return pointwise(tuple(d if d < axis else d + 1 for d in joined.dims))
        if joined.kind == "pointwise":
            return _single(name)
        return joined
    if name == "dot_general":
        return _dot_general(eqn, in_tags)
    return None


def _dot_general(eqn, in_tags) -> Tag:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs_ndim, rhs_ndim = (len(v.aval.shape) for v in eqn.invars)
    lhs_free = [d for d in range(lhs_ndim) if d not in lc and d not in lb]
    rhs_free = [d for d in range(rhs_ndim) if d not in rc and d not in rb]

    def out_axis(side, d):
        batch, free, contracting = (lb, lhs_free, lc) if side == 0 else (rb, rhs_free, rc)
        if d in contracting:
            return None
        if d in batch:
            return list(batch).index(d)
        offset = len(lb) + (0 if side == 0 else len(lhs_free))
        return offset + free.index(d)

    lhs, rhs = in_tags
    if lhs.kind == "const" and rhs.kind == "const":
        return CONST
    if "any" in (lhs.kind, rhs.kind):
        return lhs if lhs.kind == "any" else rhs
    if lhs.kind == "const" or rhs.kind == "const":
        side, tag = (0, lhs) if rhs.kind == "const" else (1, rhs)
        if tag.kind == "pointwise":
            dims = tuple(out_axis(side, d) for d in tag.dims)
            return _additive("dot_general") if None in dims else pointwise(dims)
        return _additive("dot_general", [tag])
    if lhs.kind == "pointwise" and rhs.kind == "pointwise":
        left = tuple(out_axis(0, d) for d in lhs.dims)
        right = tuple(out_axis(1, d) for d in rhs.dims)
        batch_only = all(d in lb for d in lhs.dims) and all(d in rb for d in rhs.dims)
        if batch_only and left == right:
            return pointwise(left)
    return _lost("dot_general", [lhs, rhs])


def _inner_jaxpr(eqn):
    for value in eqn.params.values():
        if isinstance(value, ClosedJaxpr) and len(value.jaxpr.invars) == len(eqn.invars):
            return value.jaxpr
        if isinstance(value, Jaxpr) and len(value.invars) == len(eqn.invars):
            return value
    return None


def _eqn(eqn, in_tags) -> list[Tag]:
    name = eqn.primitive.name
    num_out = len(eqn.outvars)
    if all(t.kind == "const" for t in in_tags):
        return [CONST] * num_out
    if name in _CALLS:
        inner = _inner_jaxpr(eqn)
        if inner is not None:
            return analyse(inner, in_tags)
    if name == "cond" and in_tags[0].kind == "const":
        branches = [analyse(b.jaxpr, in_tags[1:]) for b in eqn.params["branches"]]
        return [_join(tags) for tags in zip(*branches, strict=False)]
    if num_out == 1:
        if name in _ELEMENTWISE:
            return [_elementwise(name, in_tags, eqn)]
        tag = _structural(name, eqn, in_tags)
        if tag is not None:
            return [tag]
    live = [t for t in in_tags if t.kind == "any"]
    return [live[0] if live else any_tag(name)] * num_out


def analyse(jaxpr: Jaxpr, in_tags) -> list[Tag]:
    """The :class:`Tag` of each output of ``jaxpr`` given those of its inputs
    (its constvars are ``CONST``)."""
    env: dict = {}

    def read(v):
        return CONST if isinstance(v, Literal) else env.get(v, CONST)

    for v, tag in zip(jaxpr.invars, in_tags, strict=False):
        env[v] = tag
    for eqn in jaxpr.eqns:
        out = _eqn(eqn, [read(v) for v in eqn.invars])
        for v, tag in zip(eqn.outvars, out, strict=False):
            env[v] = tag
    return [read(v) for v in jaxpr.outvars]


def prune(closed: ClosedJaxpr, outputs) -> ClosedJaxpr:
    """``closed`` with only the outputs at indices ``outputs`` and the equations they
    need (the others, checks included, already ran where the values were first made)."""
    jaxpr = closed.jaxpr
    outvars = [jaxpr.outvars[i] for i in outputs]
    live = {v for v in outvars if isinstance(v, Var)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            kept.append(eqn)
            live.update(v for v in eqn.invars if isinstance(v, Var))
    kept.reverse()
    effects = set()
    for eqn in kept:
        effects |= set(eqn.effects)
    return ClosedJaxpr(jaxpr.replace(eqns=kept, outvars=outvars, effects=effects), closed.consts)
