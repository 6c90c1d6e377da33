"""Every dispatch op, declared once: name, signature, output shape, and which inputs get gradients.

A backend registers what it computes with one call, ``ops.implement("kron_apply", "triton",
forward=..., backward=...)``, and gets the rest from the declaration: the custom op
``tinyrecon::<backend>_<op>``, its fake (the declared shape), its autograd wiring (the bias gradient
included) and its dispatch entry. ``backward(dy, needs, *inputs)`` returns the gradients of the
declared inputs other than ``bias``, in order (None where not needed); traced, it runs as an op of its
own (so it may launch kernels) that refuses double backward by name. ``first_order=False`` says it is
made of differentiable ops, which then run as they are; an implementation without a backward (the
reference, or ops autograd follows) is registered as it is. Applies with a ``layout`` run
``layout="tinybig"`` as their build and one GEMM unless the implementation computes it (``tinybig=True``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .base import add_bias, bias_grad
from .dispatch import eager


class Op(NamedTuple):
    name: str
    family: str       # functions/<family>.py, kernels/<family>.py
    schema: str       # torch.library schema: "(Tensor x, ...) -> Tensor"
    fake: Callable    # the inputs -> an empty output of the right shape (an apply's: from its build's)
    grads: tuple      # the inputs that get gradients
    params: tuple     # (name, type) of every input, from the schema
    impls: dict       # backend -> the function the dispatch table calls


OPS: dict[str, Op] = {}


def declare(name: str, family: str, schema: str, grads: tuple, fake: Callable | None = None) -> None:
    """Declare op ``name``; only builds give a fake: an apply's, ``(C, N, n)``, comes from its build's."""
    args = schema[schema.index("(") + 1: schema.index(") ->")]
    params = tuple((a.split()[1], a.split()[0]) for a in args.split(", "))
    if fake is None:
        def fake(x, *args):
            W = OPS[name.replace("_apply", "_build")].fake(*_build_args(OPS[name], (x, *args)))
            return x.new_empty(W.shape[0], x.shape[0], W.shape[1])
    OPS[name] = Op(name, family, schema, fake, tuple(grads), params, {})


def _build_args(apply: Op, args) -> list:
    """The arguments of an apply's build, from the apply's own by name (``D``: x's width)."""
    named = dict(zip((p for p, _ in apply.params), args), D=args[0].shape[1])
    return [named[p] for p, _ in OPS[apply.name.replace("_apply", "_build")].params]


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
    """The dispatch entry of a custom op with a backward: the op, autograd registered, for tracers; for
    eager calls the same functions in an autograd.Function, which skips the op machinery."""
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
            # Only create_graph=True turns grad mode on in a backward: refused here by name, not an inner op.
            if first_order and torch.is_grad_enabled():
                raise RuntimeError(
                    f"{custom._qualname} (the {backend} backend) has a first-order backward only: it cannot be "
                    f"differentiated again (create_graph=True, double backward). Use backend='torch' for "
                    f"higher-order gradients")
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
        return autograd_backward

    custom.register_autograd(autograd_backward(traced), setup_context=setup_context)
    eager_apply = type(f"{backend}_{op.name}", (torch.autograd.Function,), dict(
        forward=staticmethod(forward), setup_context=staticmethod(setup_context),
        backward=staticmethod(autograd_backward(plain)))).apply

    def entry(*args):
        return (eager_apply if eager(*(a for a in args if isinstance(a, torch.Tensor))) else custom)(*args)
    return entry


def _tinybig_as_build(op: Op, backend: str, structured: Callable) -> Callable:
    """``layout="tinybig"``: ``x @ W^T`` with W from the same backend's build; else the structured apply."""
    build = OPS[op.name.replace("_apply", "_build")]
    b = [p for p, _ in op.params].index("bias")

    def apply(*args):
        if args[-1] != "tinybig":
            return structured(*args)
        W = build.impls[backend](*_build_args(op, args))
        return add_bias(torch.matmul(args[0], W.transpose(1, 2)), args[b])
    return apply


# ---- the declarations: one per op ---------------------------------------------------------------
def _kron_build_fake(A1, A2, B1, B2, layout):
    """(C, p*s, q*t) for ``A = A1 @ A2`` (p x q) and ``B = B1 @ B2`` (s x t), or A1, B1 when A2, B2 are None."""
    q, t = (A1 if A2 is None else A2).shape[2], (B1 if B2 is None else B2).shape[2]
    return A1.new_empty(A1.shape[0], A1.shape[1] * B1.shape[1], q * t)


def _padding_build_fake(B, p, q, *layout):
    return B.new_empty(B.shape[0], p * B.shape[1], q * B.shape[2])


_FACTORS = "Tensor A1, Tensor? A2, Tensor B1, Tensor? B2"
declare("kron_build", "kron", f"({_FACTORS}, str layout) -> Tensor", ("A1", "A2", "B1", "B2"), _kron_build_fake)
declare("kron_apply", "kron", f"(Tensor x, {_FACTORS}, Tensor? bias, str layout) -> Tensor",
        ("x", "A1", "A2", "B1", "B2", "bias"))
declare("duplicated_padding_build", "padding", "(Tensor B, SymInt p, SymInt q, str layout) -> Tensor", ("B",),
        _padding_build_fake)
declare("duplicated_padding_apply", "padding",
        "(Tensor x, Tensor B, SymInt p, SymInt q, Tensor? bias, str layout) -> Tensor", ("x", "B", "bias"))
declare("duplicated_diagonal_padding_build", "padding", "(Tensor B, SymInt p, SymInt q) -> Tensor", ("B",),
        _padding_build_fake)
declare("duplicated_diagonal_padding_apply", "padding", "(Tensor x, Tensor B, SymInt p, SymInt q, Tensor? bias) -> Tensor",
        ("x", "B", "bias"))
declare("lorr_build", "lowrank", "(Tensor A, Tensor B) -> Tensor", ("A", "B"),
        lambda A, B: A.new_empty(A.shape[0], A.shape[1], B.shape[2]))
declare("lorr_apply", "lowrank", "(Tensor x, Tensor A, Tensor B, Tensor? bias) -> Tensor", ("x", "A", "B", "bias"))
declare("random_matrix_adaption_build", "lowrank",
        "(Tensor l1, Tensor l2, SymInt seed_a, SymInt seed_b, SymInt D) -> Tensor", ("l1", "l2"),
        lambda l1, l2, seed_a, seed_b, D: l1.new_empty(l1.shape[0], l1.shape[1], D))
declare("random_matrix_adaption_apply", "lowrank",
        "(Tensor x, Tensor l1, Tensor l2, SymInt seed_a, SymInt seed_b, Tensor? bias) -> Tensor",
        ("x", "l1", "l2", "bias"))
declare("masking_build", "masking", "(Tensor w, SymInt seed, float p) -> Tensor", ("w",),
        lambda w, seed, p: w.new_empty(w.shape))
declare("masking_apply", "masking", "(Tensor x, Tensor w, SymInt seed, float p, Tensor? bias) -> Tensor",
        ("x", "w", "bias"))
declare("hypernet_build", "hypernet", "(Tensor hvec, SymInt seed_w2, SymInt seed_b2, SymInt n, SymInt D) -> Tensor",
        ("hvec",), lambda hvec, seed_w2, seed_b2, n, D: hvec.new_empty(hvec.shape[0], n, D))
declare("hypernet_apply", "hypernet",
        "(Tensor x, Tensor hvec, SymInt seed_w2, SymInt seed_b2, SymInt n, Tensor? bias) -> Tensor",
        ("x", "hvec", "bias"))
declare("random_matrix_hypernet_build", "hypernet", "(Tensor z, SymInt seed_t, SymInt n, SymInt D) -> Tensor", ("z",),
        lambda z, seed_t, n, D: z.new_empty(z.shape[0], n, D))
declare("random_matrix_hypernet_apply", "hypernet",
        "(Tensor x, Tensor z, SymInt seed_t, SymInt n, Tensor? bias) -> Tensor", ("x", "z", "bias"))
