"""Every dispatch op, declared once: name, signature, output shape, and which inputs get gradients.

A backend registers what it computes for an op with one call::

    ops.implement("kron_apply", "triton", forward=..., backward=...)

and gets the rest from the declaration: the ``torch.library`` custom op ``tinyrecon::<backend>_<op>``
(one op to ``torch.compile``), its fake (the declared shape function), its autograd wiring (the
bias gradient included) and its entry in the dispatch table. ``backward(dy, needs, *inputs)``
returns the gradients of the declared inputs other than ``bias``, in order (None where not needed).
Traced, it runs inside a generated op ``tinyrecon::<backend>_<op>_backward``, so it may launch
kernels that autograd cannot follow, and the op refuses double backward by name (eager calls run the
same forward and backward in an autograd.Function, without the op machinery); ``first_order=False`` says
the backward is made of differentiable ops, which then run as they are. An implementation without a
backward (the torch reference, or code composed of ops autograd already follows) is registered as
it is. Applies with a ``layout`` run ``layout="tinybig"`` as their build and one GEMM unless the
implementation says it computes that layout itself (``tinybig=True``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .base import add_bias, bias_grad, first_order_only
from .dispatch import eager


class Op(NamedTuple):
    name: str
    family: str       # functions/<family>.py, kernels/<family>.py
    schema: str       # torch.library schema: "(Tensor x, ...) -> Tensor"
    fake: Callable    # the inputs -> an empty output of the right shape
    grads: tuple      # the inputs that get gradients
    params: tuple     # (name, type) of every input, from the schema
    impls: dict       # backend -> the function the dispatch table calls


OPS: dict[str, Op] = {}


def declare(name: str, family: str, schema: str, fake: Callable, grads: tuple) -> None:
    args = schema[schema.index("(") + 1: schema.index(") ->")]
    params = tuple((a.split()[1], a.split()[0]) for a in args.split(", "))
    OPS[name] = Op(name, family, schema, fake, tuple(grads), params, {})


def implement(name: str, backend: str, forward: Callable, backward: Callable | None = None,
              first_order: bool = True, tinybig: bool = False) -> Callable:
    """Register ``backend``'s ``forward`` (and ``backward``) for op ``name``; returns its dispatch entry."""
    op = OPS[name]
    if backward is None:
        entry = forward
    else:
        custom = torch.library.custom_op(f"tinyrecon::{backend}_{name}", forward, mutates_args=(), schema=op.schema)
        custom.register_fake(op.fake)
        entry = _with_autograd(op, custom, forward, backend, backward, first_order)
    if not tinybig and name.endswith("_apply") and any(p == "layout" for p, _ in op.params):
        entry = _tinybig_as_build(op, backend, entry)
    op.impls[backend] = entry
    return entry


def _with_autograd(op: Op, custom, forward: Callable, backend: str, backward: Callable, first_order: bool):
    """The dispatch entry of a custom op with a backward: the custom op, autograd registered, for
    tracers; for eager calls the same forward and backward in an autograd.Function, which skips the
    op machinery (a dispatch per call, and an import of torch._dynamo at an op's first call)."""
    names = [p for p, _ in op.params]
    tensors = [i for i, (_, t) in enumerate(op.params) if t.startswith("Tensor")]
    computed = [names.index(g) for g in op.grads if g != "bias"]
    bias = names.index("bias") if "bias" in op.grads else None

    if first_order:   # the backward is an op of its own when traced: it may launch kernels
        def impl(dy, *rest):
            *args, needs = rest
            return [g.to(args[i].dtype).contiguous() if need else dy.new_empty(0)
                    for i, need, g in zip(computed, needs, backward(dy, needs, *args))]

        def fake(dy, *rest):
            *args, needs = rest
            return [args[i].new_empty(args[i].shape) if need else dy.new_empty(0) for i, need in zip(computed, needs)]

        bwd = torch.library.custom_op(f"tinyrecon::{backend}_{op.name}_backward", impl, mutates_args=(),
                                      schema=f"(Tensor dy, {op.schema[1: op.schema.index(') ->')]}, bool[] needs)"
                                             " -> Tensor[]")
        bwd.register_fake(fake)
        traced, plain = (lambda dy, needs, args: bwd(dy, *args, needs)), (lambda dy, needs, args: impl(dy, *args, needs))
    else:
        traced = plain = (lambda dy, needs, args: backward(dy, needs, *args))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in tensors))
        ctx.inputs = [None if i in tensors else v for i, v in enumerate(inputs)]

    def autograd_backward(run):
        def autograd_backward(ctx, dy):
            args = list(ctx.inputs)
            for i, t in zip(tensors, ctx.saved_tensors):
                args[i] = t
            needs = [bool(ctx.needs_input_grad[i]) and args[i] is not None for i in computed]
            grads = [None] * len(args)
            if any(needs):
                for i, need, g in zip(computed, needs, run(dy, needs, args)):
                    grads[i] = g.to(args[i].dtype) if need else None
            if bias is not None and ctx.needs_input_grad[bias]:
                grads[bias] = bias_grad(dy, args[bias])
            return tuple(grads)
        return first_order_only(autograd_backward, custom._qualname, backend) if first_order else autograd_backward

    custom.register_autograd(autograd_backward(traced), setup_context=setup_context)
    eager_apply = type(f"{backend}_{op.name}", (torch.autograd.Function,), dict(
        forward=staticmethod(forward), setup_context=staticmethod(setup_context),
        backward=staticmethod(autograd_backward(plain)))).apply

    def entry(*args):
        return (eager_apply if eager(*(a for a in args if isinstance(a, torch.Tensor))) else custom)(*args)
    return entry


def _tinybig_as_build(op: Op, backend: str, structured: Callable) -> Callable:
    """``layout="tinybig"``: ``x @ W^T`` with W from the same backend's build (build args: the apply's
    without x and bias); the structured apply for the other layouts."""
    build = OPS[op.name.replace("_apply", "_build")]
    b = [p for p, _ in op.params].index("bias")

    def apply(*args):
        if args[-1] != "tinybig":
            return structured(*args)
        W = build.impls[backend](*args[1:b], *args[b + 1:])
        return add_bias(torch.matmul(args[0], W.transpose(1, 2)), args[b])
    return apply


# ---- the declarations: one per op ---------------------------------------------------------------
def _square(F1, F2):
    """(rows, columns) of ``F = F1 @ F2``, or of F1 when F2 is None."""
    return F1.shape[1], (F1 if F2 is None else F2).shape[2]


def _kron_build_fake(A1, A2, B1, B2, layout):
    (p, q), (s, t) = _square(A1, A2), _square(B1, B2)
    return A1.new_empty(A1.shape[0], p * s, q * t)


def _kron_apply_fake(x, A1, A2, B1, B2, bias, layout):
    return x.new_empty(A1.shape[0], x.shape[0], A1.shape[1] * B1.shape[1])


def _padding_build_fake(B, p, q, *layout):
    return B.new_empty(B.shape[0], p * B.shape[1], q * B.shape[2])


def _padding_apply_fake(x, B, p, q, bias, *layout):
    return x.new_empty(B.shape[0], x.shape[0], p * B.shape[1])


def _apply_fake(x, v, n):
    """(C, N, n) for C channels of v."""
    return x.new_empty(v.shape[0], x.shape[0], n)


_FACTORS = "Tensor A1, Tensor? A2, Tensor B1, Tensor? B2"
declare("kron_build", "kron", f"({_FACTORS}, str layout) -> Tensor", _kron_build_fake, ("A1", "A2", "B1", "B2"))
declare("kron_apply", "kron", f"(Tensor x, {_FACTORS}, Tensor? bias, str layout) -> Tensor", _kron_apply_fake,
        ("x", "A1", "A2", "B1", "B2", "bias"))
declare("duplicated_padding_build", "padding", "(Tensor B, SymInt p, SymInt q, str layout) -> Tensor",
        _padding_build_fake, ("B",))
declare("duplicated_padding_apply", "padding",
        "(Tensor x, Tensor B, SymInt p, SymInt q, Tensor? bias, str layout) -> Tensor", _padding_apply_fake,
        ("x", "B", "bias"))
declare("duplicated_diagonal_padding_build", "padding", "(Tensor B, SymInt p, SymInt q) -> Tensor",
        _padding_build_fake, ("B",))
declare("duplicated_diagonal_padding_apply", "padding", "(Tensor x, Tensor B, SymInt p, SymInt q, Tensor? bias) -> Tensor",
        _padding_apply_fake, ("x", "B", "bias"))
declare("lorr_build", "lowrank", "(Tensor A, Tensor B) -> Tensor",
        lambda A, B: A.new_empty(A.shape[0], A.shape[1], B.shape[2]), ("A", "B"))
declare("lorr_apply", "lowrank", "(Tensor x, Tensor A, Tensor B, Tensor? bias) -> Tensor",
        lambda x, A, B, bias: _apply_fake(x, A, A.shape[1]), ("x", "A", "B", "bias"))
declare("random_matrix_adaption_build", "lowrank",
        "(Tensor l1, Tensor l2, SymInt seed_a, SymInt seed_b, SymInt D) -> Tensor",
        lambda l1, l2, seed_a, seed_b, D: l1.new_empty(l1.shape[0], l1.shape[1], D), ("l1", "l2"))
declare("random_matrix_adaption_apply", "lowrank",
        "(Tensor x, Tensor l1, Tensor l2, SymInt seed_a, SymInt seed_b, Tensor? bias) -> Tensor",
        lambda x, l1, l2, seed_a, seed_b, bias: _apply_fake(x, l1, l1.shape[1]), ("x", "l1", "l2", "bias"))
declare("masking_build", "masking", "(Tensor w, SymInt seed, float p) -> Tensor",
        lambda w, seed, p: w.new_empty(w.shape), ("w",))
declare("masking_apply", "masking", "(Tensor x, Tensor w, SymInt seed, float p, Tensor? bias) -> Tensor",
        lambda x, w, seed, p, bias: _apply_fake(x, w, w.shape[1]), ("x", "w", "bias"))
declare("hypernet_build", "hypernet", "(Tensor hvec, SymInt seed_w2, SymInt seed_b2, SymInt n, SymInt D) -> Tensor",
        lambda hvec, seed_w2, seed_b2, n, D: hvec.new_empty(hvec.shape[0], n, D), ("hvec",))
declare("hypernet_apply", "hypernet",
        "(Tensor x, Tensor hvec, SymInt seed_w2, SymInt seed_b2, SymInt n, Tensor? bias) -> Tensor",
        lambda x, hvec, seed_w2, seed_b2, n, bias: _apply_fake(x, hvec, n), ("x", "hvec", "bias"))
declare("random_matrix_hypernet_build", "hypernet", "(Tensor z, SymInt seed_t, SymInt n, SymInt D) -> Tensor",
        lambda z, seed_t, n, D: z.new_empty(z.shape[0], n, D), ("z",))
declare("random_matrix_hypernet_apply", "hypernet",
        "(Tensor x, Tensor z, SymInt seed_t, SymInt n, Tensor? bias) -> Tensor",
        lambda x, z, seed_t, n, bias: _apply_fake(x, z, n), ("x", "z", "bias"))
