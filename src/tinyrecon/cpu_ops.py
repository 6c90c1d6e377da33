"""The CPU backend: the torch references (``functions/``) with what reads and writes x in C++.

The kernels of ``csrc/kron_cpu.cpp`` replace ``base.TORCH_X_OPS``: ``kron_pass`` reads x once for
both ``U`` and ``V`` (torch reads it once per GEMM), ``kron_expand`` writes dx once; custom ops, so
``torch.compile`` traces them (eager calls skip the op machinery). float32 and float64 run in the
kernels, a bfloat16 x is read as is (``_bf16_x_as_is``), other half-precision inputs run in float32,
rounded once. Builds read no x: they are the references'. duplicated_padding's kron layout dots the
sum of x's q column blocks with B, read once for all batches (``kron_chain``). The random families
never hold an n x D W: masking's GEMMs read the cached bit-packed mask (``_masked_gemm``), the
hypernets form W by column blocks (``_linear_block``), each consumed by a GEMM at once.
"""
import functools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _random, cpu_lib, dispatch, ops
from ._clib import address as _ptr
from .base import _HALF, LAYOUTS, XOps, add_bias, reference, torch_expand, torch_passes
from .functions import hypernet as _hypernet_ref
from .functions import kron as _kron_ref
from .functions import lowrank as _lowrank_ref
from .functions import padding as _padding_ref

_DTYPES = {torch.float32: 0, torch.float64: 1}
_MAX_EXPAND_RANK = 64   # the kernel keeps the rank's coefficients of a tile on the stack (> _MAX_RANK)


def _check(name: str, *tensors: Tensor) -> None:
    if tensors[0].dtype not in _DTYPES or any(t.dtype != tensors[0].dtype for t in tensors):
        raise TypeError(f"{name} takes float32 or float64 tensors of one dtype, got {[t.dtype for t in tensors]}")


def _check_pass(name: str, x: Tensor, L: Tensor, R: Tensor) -> int:
    """The library's dtype code: a float32 or float64 x with factors of its dtype, or a bfloat16 x
    (read as is) with a float32 L and a float32 or (read as is) bfloat16 R. Checks the shapes too."""
    if x.dtype == torch.bfloat16 and L.dtype == torch.float32 and R.dtype in (torch.float32, torch.bfloat16):
        code = 2 if R.dtype == torch.float32 else 3
    else:
        _check("cpu_kron_pass", x, L, R)
        code = _DTYPES[x.dtype]
    N, M, K = x.shape
    if L.shape[1] != M or R.shape[1] != K:
        raise ValueError(f"{name}: L {tuple(L.shape)} and R {tuple(R.shape)} do not fit x {tuple(x.shape)}")
    return code


def _pass_shapes(x: Tensor, L: Tensor, R: Tensor, want_u: bool, want_v: bool):
    N, M, K = x.shape
    return (N, L.shape[0], K) if want_u else (0,), (R.shape[0], N * M) if want_v else (0,)


def _pass(x: Tensor, L: Tensor, R: Tensor, want_u: bool, want_v: bool) -> tuple[Tensor, Tensor]:
    """``U[b] = L @ X[b]`` (N, RA, K) and ``V = R @ x.reshape(N*M, K)^T`` (RB, N*M) in one read of
    x (N, M, K), in L's dtype; an unwanted one is returned empty."""
    code = _check_pass("cpu_kron_pass", x, L, R)
    if not (want_u or want_v):
        raise ValueError("cpu_kron_pass: ask for U, V or both")
    N, M, K = x.shape
    U, V = (L.new_empty(s) for s in _pass_shapes(x, L, R, want_u, want_v))
    if x.numel() == 0:   # nothing to read (and empty buffers have no address to pass)
        return U.zero_(), V.zero_()
    # R is read through its strides when rows or columns are contiguous (a transposed R, such as
    # random_matrix_adaption's B^T, is packed by the kernel a block at a time: no transposed copy).
    x, L = x.contiguous(), L.contiguous()
    if R.stride(1) != 1 and (R.stride(0) != 1 or R.shape[0] <= 1):
        R = R.contiguous()
    cpu_lib.call("tinyrecon_cpu_kron_pass", code, torch.get_num_threads(), x.data_ptr(), L.data_ptr(),
                 R.data_ptr(), U.data_ptr() if want_u else None, V.data_ptr() if want_v else None,
                 N, M, K, L.shape[0], R.shape[0], R.stride(0), R.stride(1))
    return U, V


kron_pass = dispatch.traced_op("cpu_kron_pass", _pass, lambda x, L, R, want_u, want_v: tuple(
    L.new_empty(s) for s in _pass_shapes(x, L, R, want_u, want_v)))


def _chain(x: Tensor, L: Tensor, R: Tensor) -> Tensor:
    """``core[b] = L @ X[b] @ R^T`` (N, RA, RB) for x (N, M, K), L (RA, M), R (RB, K), in L's
    dtype, from one read of x and one of R (all batches use each block of R while it is in L2)."""
    code = _check_pass("cpu_kron_chain", x, L, R)
    N, M, K = x.shape
    RA, RB = L.shape[0], R.shape[0]
    if x.numel() == 0 or RA == 0 or RB == 0:   # nothing to read or to dot (empty buffers have no address)
        return torch.matmul(torch.matmul(L, x.to(L.dtype)), R.T.to(L.dtype))
    x, L, R = x.contiguous(), L.contiguous(), R.contiguous()
    V = L.new_empty(RB, N * RA)
    cpu_lib.call("tinyrecon_cpu_kron_chain", code, torch.get_num_threads(), x.data_ptr(), L.data_ptr(), R.data_ptr(),
                 V.data_ptr(), N, M, K, RA, RB)
    return V.view(RB, N, RA).permute(1, 2, 0).contiguous()


kron_chain = dispatch.traced_op("cpu_kron_chain", _chain, lambda x, L, R: L.new_empty(x.shape[0], L.shape[0], R.shape[0]))


def _expand_x(G: Tensor, L: Tensor) -> Tensor:
    """``dX[b] = L^T @ G[b]`` for G (N, RA, K) and L (RA, M): (N, M, K), written once."""
    _check("cpu_kron_expand", G, L)
    N, RA, K = G.shape
    M = L.shape[1]
    if L.shape[0] != RA or RA > _MAX_EXPAND_RANK:
        raise ValueError(f"cpu_kron_expand: L {tuple(L.shape)} does not fit G {tuple(G.shape)} "
                         f"(or its rank is above {_MAX_EXPAND_RANK})")
    dx = G.new_empty(N, M, K)
    if dx.numel() == 0:
        return dx
    if RA == 0:
        return dx.zero_()
    G, L = G.contiguous(), L.contiguous()
    cpu_lib.call("tinyrecon_cpu_kron_expand", _DTYPES[G.dtype], torch.get_num_threads(), G.data_ptr(), L.data_ptr(),
                 dx.data_ptr(), N, M, K, RA)
    return dx


kron_expand = dispatch.traced_op("cpu_kron_expand", _expand_x, lambda G, L: G.new_empty(G.shape[0], L.shape[1], G.shape[2]))


# When the kernels pay, measured pass by pass against torch's GEMMs (bench/cpu_dispatch.py,
# bench/results/cpu-2core-2026-12-01-floor/dispatch.md; a shared 2-core machine, +-2x near the
# thresholds): x of at least 1M elements (at 262K torch's GEMMs run from cache 2x faster); up to 32
# factor rows (the most measured: 1.6-2.8x faster at rank 32); factor rows, streamed once per batch,
# that stay in L2 or are at most x's M rows per batch (lorr's B at rank 32, M = 64: 1.9-2.6x faster;
# duplicated_padding's B, 32 x 307,720, M = 2: 2.4-2.8x slower).
_MIN_ELEMENTS = 1 << 20
_MAX_RANK = 32
_FACTOR_BYTES = 256 * 1024


def _worth_it(numel: int, itemsize: int, rank: int, M: int, K: int) -> bool:
    return (numel >= _MIN_ELEMENTS and rank <= _MAX_RANK
            and (rank * K * itemsize <= _FACTOR_BYTES or rank <= M))


def _kernel_passes(x, Ar, Br, want_u: bool, want_v: bool):
    U, V = kron_pass(x, Ar, Br, want_u, want_v)
    return (U if want_u else None), (V if want_v else None)


def _passes(x, Ar, Br, want_u: bool, want_v: bool):
    N, M, K = x.shape
    if not _worth_it(x.numel(), Ar.element_size(), Ar.shape[0] * want_u + Br.shape[0] * want_v, M, K):
        return torch_passes(x, Ar, Br.to(Ar.dtype), want_u, want_v)   # (a bfloat16 Br: in Ar's float32)
    return _kernel_passes(x, Ar, Br, want_u, want_v)


def _expand(G, Ar):
    N, rA, K = G.shape
    M = Ar.shape[1]
    if not _worth_it(N * M * K, G.element_size(), rA, M, K):
        return torch_expand(G, Ar)
    return kron_expand(G, Ar)


KERNEL_X_OPS = XOps(_kernel_passes, kron_expand)   # always the kernels (tests)
X_OPS = XOps(_passes, _expand)                     # the kernels where they pay, else torch's GEMMs
# A bfloat16 x and a bfloat16 Br that nothing differentiates: Br read as is, Ar and the outputs in float32.
BF16_FACTOR_X_OPS = XOps(lambda x, Ar, Br, want_u, want_v: _passes(x, Ar.float(), Br, want_u, want_v), _expand)


def _bf16_x_as_is(ref, when, factors_as_is: bool = False):
    """``ref`` (a @reference apply) with a bfloat16 x left as is (the kernels widen it as they read
    it), the rest in float32, rounded once at the end. ``factors_as_is`` also leaves bfloat16 factors
    that need no gradient as is (``BF16_FACTOR_X_OPS``): a float32 copy of duplicated_padding's B cost
    as much as the apply at the MNIST shape. A gradient for x, torch.func, or ``when(args)`` false
    (another layout) take ``ref`` itself."""
    inner = ref.__wrapped__

    @functools.wraps(ref)
    def apply(x, *args, **kwargs):
        if (x.dtype != torch.bfloat16 or x.requires_grad or torch._C._are_functorch_transforms_active()
                or not when(args)):
            return ref(x, *args, **kwargs)
        if factors_as_is and not any(isinstance(a, Tensor) and a.requires_grad for a in args):
            if "x_ops" in kwargs:
                kwargs = dict(kwargs, x_ops=BF16_FACTOR_X_OPS)
            return inner(x, *args, **kwargs).to(x.dtype)
        up = [a.float() if isinstance(a, Tensor) and a.dtype == x.dtype else a for a in args]
        return inner(x, *up, **kwargs).to(x.dtype)
    return apply


class _Chain(torch.autograd.Function):
    """``core[b] = L @ X[b] @ R^T`` for a constant L: the chain kernel, one read of x and of R. The
    backward reads x once more for dR, in the pass (x folded to (N*M, K): faster than keeping
    ``L @ X[b]`` from the forward), and writes dX once. A double backward and torch.func take
    torch's ops (as the reference's ``_KronCore``)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, L, R):
        if torch._C._are_functorch_transforms_active():
            return torch.matmul(torch.matmul(L, x.to(L.dtype)), R.T.to(L.dtype))
        return kron_chain(x, L, R)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dcore):
        x, L, R = ctx.saved_tensors
        N, M, K = x.shape
        plain = torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
        dx = dR = None
        if ctx.needs_input_grad[2]:
            if plain:
                U = torch.matmul(L, x.to(dcore.dtype))   # (N, RA, K)
                dR = torch.mm(dcore.reshape(-1, R.shape[0]).T, U.reshape(-1, K))
            else:   # dcore[b]^T @ L as one (RB, N*M) factor of x folded to one batch
                F = torch.matmul(dcore.transpose(1, 2), L).permute(1, 0, 2).reshape(R.shape[0], N * M)
                dR = _passes(x.reshape(1, N * M, K), F, R.new_empty(0, K), True, False)[0][0]
        if ctx.needs_input_grad[0]:
            G = torch.matmul(dcore, R.to(dcore.dtype))   # (N, RA, K), small next to dx when RA < M
            dx = torch.matmul(L.T, G) if plain else _expand(G, L)
        return dx, None, dR


def _chain_pays(x: Tensor, q: int, rows: int) -> bool:
    """Where the chain beats the reference's kron path, which dots x's q blocks with B one by one, at
    the MNIST shape (bench/results/cpu-2core-2026-12-01-kron-bf16): a big x, q > 1, few rows of B."""
    return x.numel() >= _MIN_ELEMENTS and q > 1 and rows <= _MAX_RANK


@reference
def duplicated_padding_apply(x, B, p: int, q: int, bias, layout: str):
    """The reference's, but with layout="kron" at kernel sizes: ``W = ones(p, q) kron B``, so
    ``y[n]`` is p copies of ``B @ (sum of x[n]'s q column blocks)``, the chain with L = ones(1, q)."""
    C, s, t = B.shape
    if layout != "kron" or not _chain_pays(x, q, C * s):
        return _padding_ref.duplicated_padding_apply.__wrapped__(x, B, p, q, bias, layout, x_ops=X_OPS)
    N = x.shape[0]
    ones = torch.ones(1, q, dtype=torch.promote_types(B.dtype, torch.float32), device=B.device)   # (B may be bfloat16)
    core = _Chain.apply(x.reshape(N, q, t), ones, B.reshape(C * s, t))
    Y = core.reshape(N, C, 1, s).permute(1, 0, 2, 3).expand(C, N, p, s)
    return add_bias(Y.reshape(C, N, p * s), bias)


# The applies: the references with the kernels' XOps; the builds fall back to them (dispatch.FALLBACK).
for _ref, _bf16, _factors in ((_kron_ref.kron_apply, lambda args: args[5] == "kron", False),
                              (_padding_ref.duplicated_diagonal_padding_apply, lambda args: True, True),
                              (_lowrank_ref.lorr_apply, lambda args: True, False),
                              (_lowrank_ref.random_matrix_adaption_apply, lambda args: True, False)):
    ops.implement(_ref.__name__, "cpu", functools.partial(_bf16_x_as_is(_ref, _bf16, _factors), x_ops=X_OPS),
                  tinybig=True)
# layout="tinybig" (and kron below kernel sizes) in the reference's own code: a float32 copy of a bfloat16 x
ops.implement("duplicated_padding_apply", "cpu",
              _bf16_x_as_is(duplicated_padding_apply, lambda args: args[4] == "kron", True), tinybig=True)


# Small W (n*D < base.BUILD_BELOW): a training step's apply as one autograd node, W and the gradient
# of w each made by one library call (csrc/build_cpu.cpp), where the build's own autograd graph cost
# 2-3x a dense layer's step. Every build below is the library's one form, from the build op's
# arguments: (layout, A1, A2, row, col, B1, B2) with W = A kron B, A = diag(row) A1 diag(col) [@ A2],
# B = B1 [@ B2] (each (1, rows, cols); None: absent).
def _rma_form(l1, l2, seed_a, seed_b, D):
    A, B = _lowrank_ref.random_matrix_adaption_matrices(seed_a, seed_b, l1.shape[1], D, l2.shape[1], l1)
    return "kron", A[None], B.T.contiguous()[None], l1, l2, l1.new_ones(1, 1, 1), None


_SMALL_FORMS = {
    "kron_build": lambda A1, A2, B1, B2, layout: (layout, A1, A2, None, None, B1, B2),
    "duplicated_padding_build": lambda B, p, q, layout: (layout, B.new_ones(1, p, q), None, None, None, B, None),
    "duplicated_diagonal_padding_build": lambda B, p, q: (
        "kron", torch.eye(p, q, dtype=B.dtype)[None], None, None, None, B, None),
    "lorr_build": lambda A, B: ("kron", A, B, None, None, A.new_ones(1, 1, 1), None),
    "random_matrix_adaption_build": _rma_form,
}


# Up to this many multiply-adds (N*n*D) the library's plain loops beat a torch GEMM's call
# (bench/small_gemm_sweep.py, bench/results/cpu-2core-2026-12-02-fused/threshold.txt).
_SMALL_GEMM = 1 << 16
_FORWARD, _BACKWARD = "tinyrecon_cpu_small_linear", "tinyrecon_cpu_small_linear_vjp"


class _SmallPlan:
    """One (function, n, D, dtype)'s form: each factor a constant tensor or a byte offset into w."""

    def __init__(self, rec, n: int, D: int, w: Tensor, form):
        probe = w.detach().clone().requires_grad_()
        with torch.enable_grad():
            call = rec._op_call("build", rec._op_args(n, D, probe.reshape(1, -1)), D=D)
        layout, *factors = form(*call)
        self.n, self.D, self.code, self.layout = n, D, _DTYPES[w.dtype], LAYOUTS.index(layout)
        self.constants = [f.detach() if f is not None and not f.requires_grad else None for f in factors]
        # A factor from w is a contiguous view of it (else no plan): its gradient lies at the same place.
        self.offsets = [None if f is None or not f.requires_grad else f.data_ptr() - probe.data_ptr()
                        for f in factors]
        self.ok = all(f is None or not f.requires_grad or (f._base is probe and f.is_contiguous()) for f in factors)
        A1, A2, _, _, B1, B2 = factors
        self.dims = (A1.shape[1], (A2 if A2 is not None else A1).shape[2], A2.shape[1] if A2 is not None else 0,
                     B1.shape[1], (B2 if B2 is not None else B1).shape[2], B2.shape[1] if B2 is not None else 0)
        self.reference = weakref.WeakMethod(rec._build)
        self.forward_fn, self.backward_fn = cpu_lib.function(_FORWARD), cpu_lib.function(_BACKWARD)
        self.last = (None, None)

    def factors(self, w: Tensor) -> list:
        """The factors' addresses for this w (kept for the last w's address: a parameter keeps it)."""
        base = w.data_ptr()
        last = self.last
        if last[0] == base:
            return last[1]
        factors = [c.data_ptr() if c is not None else None if o is None else base + o
                   for c, o in zip(self.constants, self.offsets)]
        self.last = (base, factors)   # one assignment: threads read a consistent pair
        return factors

    def __call__(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return _SmallLinear.apply(x, w, bias, self)


def _rows(t: Tensor) -> Tensor:
    """``t`` as (rows, width); a reshape costs ~2 us, a fifth of this path's own time per call."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


class _SmallLinear(torch.autograd.Function):
    """``F.linear(x, W, bias)`` with W from the plan's factors of w: W, and y where the GEMM is small
    (``_SMALL_GEMM``), in one library call; the backward takes every gradient in one more (dW = dy^T
    x formed inside), or for bigger GEMMs dW, dx and the bias gradient in torch and the rest in the
    library. A double backward differentiates the reference's graph instead."""

    @staticmethod
    def forward(ctx, x, w, bias, plan):
        x2 = _rows(x)
        small = x2.shape[0] * plan.n * plan.D <= _SMALL_GEMM
        W = w.new_empty(plan.n, plan.D)
        if small:
            x2, b = x2.contiguous(), None if bias is None else bias.contiguous()
            y = x.new_empty(*x.shape[:-1], plan.n)
            cpu_lib.check(plan.forward_fn(plan.code, plan.layout, *plan.factors(w), x2.data_ptr(), _ptr(b),
                                          W.data_ptr(), y.data_ptr(), x2.shape[0], *plan.dims), _FORWARD)
        else:
            cpu_lib.check(plan.forward_fn(plan.code, plan.layout, *plan.factors(w), None, None, W.data_ptr(), None,
                                          0, *plan.dims), _FORWARD)
            y = F.linear(x, W, bias)
        ctx.save_for_backward(x, w, bias, W, x2)   # x2: x as rows (contiguous for the library), x for a recompute
        ctx.plan, ctx.small = plan, small
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, bias, W, x2 = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():   # create_graph=True: the reference's graph, recorded
            with torch.enable_grad():
                y = F.linear(x, plan.reference()(plan.n, plan.D, w.reshape(1, -1), "torch")[0], bias)
            wanted = [t for t, need in zip((x, w, bias), (need_x, need_w, need_b)) if need]
            grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True))
            return *(next(grads) if need else None for need in (need_x, need_w, need_b)), None
        dy2 = _rows(dy)
        dw = torch.zeros_like(w) if need_w else None
        grads = [None if o is None or dw is None else dw.data_ptr() + o for o in plan.offsets]
        if ctx.small:
            dy2 = dy2.contiguous()
            dx = x2.new_empty(x2.shape) if need_x else None
            db = bias.new_empty(plan.n) if need_b else None
            cpu_lib.check(plan.backward_fn(plan.code, plan.layout, *plan.factors(w), x2.data_ptr(), dy2.data_ptr(),
                                           W.data_ptr(), None, _ptr(dx), _ptr(db), *grads, x2.shape[0], *plan.dims),
                          _BACKWARD)
        else:
            dx = torch.mm(dy2, W) if need_x else None
            db = dy2.sum(0) if need_b else None
            if need_w:
                gW = torch.mm(dy2.T, x2)
                cpu_lib.check(plan.backward_fn(plan.code, plan.layout, *plan.factors(w), None, None, W.data_ptr(),
                                               gW.data_ptr(), None, None, *grads, 0, *plan.dims), _BACKWARD)
        return None if dx is None else dx.view(x.shape), dw, db, None


def small_linear(rec, n: int, D: int, w: Tensor):
    """The fused small apply for ``rec`` at (n, D) with w like ``w`` (float32 or float64), or None."""
    form = _SMALL_FORMS.get(f"{rec.op}_build")
    if form is None or w.dtype not in _DTYPES or cpu_lib.load_error():
        return None
    plan = _SmallPlan(rec, n, D, w, form)
    return plan if plan.ok else None


# Random families. A column block of W (all n rows, columns [j0, j1)) is ~_BLOCK_NUMBERS random
# numbers (16 MB): small enough to stay near the cores, big enough for the GEMM x[:, j0:j1] @ W_blk^T
# to run at speed. x is read once per pass, W generated once per pass and never stored.
_BLOCK_NUMBERS = 1 << 22


def _column_blocks(n: int, D: int, k: int):
    step = max(16, _BLOCK_NUMBERS // max(1, n * k))
    return [(j0, min(D, j0 + step)) for j0 in range(0, D, step)]


def _mask_block(seed: int, p: float, n: int, D: int, j0: int, j1: int, dtype) -> Tensor:
    """Columns [j0, j1) of the reference's mask (functions/masking.py)."""
    u = _random.block(seed, j0, n, j1 - j0, D, "rand")
    return (u < torch.tensor(p, dtype=torch.float32)).to(dtype)


def _masked(src: Tensor, seed: int, p: float, D: int, j0: int, out: Tensor | None = None,
            bits: Tensor | None = None) -> Tensor:
    """``src * mask[:, j0:j0 + cols]`` for src (C, n, cols), written into ``out`` when given: from the
    cached bit-packed mask (``bits``, float32 and float64), else drawn as it is applied (float32 in
    one pass of the library, float64 in torch)."""
    C, n, cols = src.shape
    if bits is None and src.dtype != torch.float32:
        return torch.mul(src, _mask_block(seed, p, n, D, j0, j0 + cols, src.dtype), out=out)
    out = torch.empty_like(src, memory_format=torch.contiguous_format) if out is None else out
    if src.stride(2) != 1:
        src = src.contiguous()
    if src.numel():
        for c in range(C):
            if bits is not None:
                cpu_lib.call("tinyrecon_cpu_mask_apply", _DTYPES[src.dtype], torch.get_num_threads(), bits.data_ptr(),
                             bits.shape[1], j0, n, cols, src[c].data_ptr(), src.stride(1), out[c].data_ptr(),
                             out.stride(1))
            else:
                cpu_lib.call("tinyrecon_cpu_philox_mask", torch.get_num_threads(), seed, j0, n, cols, D, p,
                             src[c].data_ptr(), src.stride(1), out[c].data_ptr(), out.stride(1))
    return out


def _masked_gemm(op: int, bits: Tensor | None, x, w, g, out: Tensor, accumulate: bool = False) -> None:
    """The library's GEMMs with the masking mask (``bits``, whole) or none (None): op 0
    ``out (+)= x @ (w * M)^T``, 1 ``out (+)= g @ (w * M)``, 2 ``out = (g^T @ x) * M``; float32,
    x, w and out 2-d with unit column stride, g contiguous; (+)= when ``accumulate``."""
    if op == 2:
        (n, D), N = out.shape, g.shape[0]
    else:
        (N, n), D = (out.shape, w.shape[1]) if op == 0 else ((out.shape[0], w.shape[0]), out.shape[1])
    cpu_lib.call("tinyrecon_cpu_masked_gemm", op, torch.get_num_threads(), _ptr(bits),
                 bits.shape[1] if bits is not None else 0, 0, N, n, D, _ptr(x), x.stride(0) if x is not None else 0,
                 _ptr(w), w.stride(0) if w is not None else 0, _ptr(g), _ptr(out), out.stride(0), int(accumulate))


def _unit_columns(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def masking_forward(x: Tensor, w: Tensor, seed: int, p: float) -> Tensor:
    """``x @ (w * M)^T`` for x (N, D), w (C, n, D). float32 with the mask in the cache: the library's
    masked GEMM (the mask applied to w's tiles as the GEMM reads them); otherwise by column blocks,
    each masked (from the cached bits, or drawn there) right before its GEMM."""
    C, n, D = w.shape
    bits = _random.mask_bits(seed, n, D, p) if w.numel() else None
    if bits is not None and w.dtype == torch.float32:
        y = x.new_empty(C, x.shape[0], n)
        x = _unit_columns(x)
        for c in range(C):
            _masked_gemm(0, bits, x, _unit_columns(w[c]), None, y[c])
        return y
    y = x.new_zeros(C, x.shape[0], n)
    buf = None
    for j0, j1 in _column_blocks(n, D, 1):
        buf = _masked(w[:, :, j0:j1], seed, p, D, j0, bits=bits,
                      out=None if buf is None or buf.shape[2] != j1 - j0 else buf)
        for c in range(C):
            y[c].addmm_(x[:, j0:j1], buf[c].T)
    return y


def masking_backward(g: Tensor, x: Tensor, w: Tensor, seed: int, p: float, want_dx: bool,
                     want_dw: bool) -> tuple[Tensor, Tensor]:
    """(dx, dw) for the upstream g (C, N, n), the mask regenerated once; an unwanted one is empty."""
    C, n, D = w.shape
    dx = x.new_empty(x.shape if want_dx else (0,))
    dw = w.new_empty(w.shape if want_dw else (0,))
    if want_dx and C == 0:
        dx.zero_()
    bits = _random.mask_bits(seed, n, D, p) if w.numel() else None
    if bits is not None and w.dtype == torch.float32:   # the library's masked GEMMs, as in the forward
        x, g = _unit_columns(x), g.contiguous()
        for c in range(C):
            if want_dx:
                _masked_gemm(1, bits, None, _unit_columns(w[c]), g[c], dx, accumulate=c > 0)
            if want_dw:
                _masked_gemm(2, bits, x, None, g[c], dw[c])
        return dx, dw
    for j0, j1 in _column_blocks(n, D, 1):
        if want_dx and C:   # dx = sum_c g[c] @ (w[c] * M), written once
            Wm = _masked(w[:, :, j0:j1], seed, p, D, j0, bits=bits)
            torch.mm(g[0], Wm[0], out=dx[:, j0:j1])
            for c in range(1, C):
                dx[:, j0:j1].addmm_(g[c], Wm[c])
        if want_dw:   # dw = (g^T x) * M, masked where it is written
            dW = dw[:, :, j0:j1]
            for c in range(C):
                torch.mm(g[c].T, x[:, j0:j1], out=dW[c])
            _masked(dW, seed, p, D, j0, out=dW, bits=bits)
    return dx, dw


def _up(t: Tensor) -> Tensor:
    """fp16/bf16 in fp32, as the reference computes them (the kernels take fp32 and fp64)."""
    return t.float() if t.dtype in _HALF else t


ops.implement("masking_apply", "cpu", reference(lambda x, w, seed, p, bias: add_bias(masking_forward(x, w, seed, p), bias)),
              lambda g, needs, x, w, seed, p, bias: masking_backward(_up(g).contiguous(), _up(x), _up(w), seed, p, *needs))


def _frozen(seed_m: int, seed_c, n: int, D: int, k: int):
    """(M rows, b rows): int64 tensors of the row addresses of the frozen matrices in the cache (the
    reference's slices, shared, read only), with the tensors that hold them; each None where they do
    not fit the budget (then drawn block by block)."""
    step = _hypernet_ref._rows_per_slice(D, k)

    def rows(seed, width):
        if seed is None or not n * D:
            return None
        kept = _random.kept_slices(seed, [(i0 * D * width, (min(n, i0 + step) - i0) * D * width)
                                          for i0 in range(0, n, step)], "randn")
        if kept is None:
            return None
        addresses = [t.data_ptr() + 4 * r * D * width for t in kept for r in range(t.numel() // (D * width))]
        return torch.tensor(addresses, dtype=torch.int64), kept
    return rows(seed_m, k), rows(seed_c, 1)


def _linear_block(v: Tensor, seed_m: int, seed_c, n: int, D: int, j0: int, j1: int, frozen, want_W: bool = True,
                  dW: Tensor | None = None, dv: Tensor | None = None) -> Tensor | None:
    """Columns [j0, j1) of the reference's ``reshape(M @ v^T (+ b), C, n, D)`` when ``want_W``, and
    ``dv[c] += sum_ij dW[c, i, j] M[i, j, :]`` for a block dW when given: one library pass reads M's
    block (``frozen``) or draws it, once for both."""
    C, k = v.shape
    W = v.new_empty(C, n, j1 - j0) if want_W else None
    m_rows, c_rows = (None if f is None else f[0] for f in frozen)
    cpu_lib.call("tinyrecon_cpu_random_linear", _DTYPES[v.dtype], torch.get_num_threads(), seed_m,
                 int(seed_c is not None), seed_c or 0, n, D, j0, j1 - j0, k, C, v.data_ptr(), _ptr(W), _ptr(dW), _ptr(dv),
                 _ptr(m_rows), _ptr(c_rows))
    return W


# The library's fused GEMMs take float32 and ranks up to this; others form W by blocks for torch's GEMMs.
_FUSED_MAX_RANK = 8


def _random_gemm(op: int, v: Tensor, x: Tensor, seed_m: int, seed_c, n: int, g: Tensor | None = None,
                 out: Tensor | None = None, dv: Tensor | None = None) -> None:
    """The library's GEMMs with W = reshape(M @ v^T (+ b), C, n, D) formed inside them (M from
    ``_frozen`` or drawn): op 0 ``out (C, N, n) = x @ W^T``; op 1 ``out (N, D) = sum_c g[c] @ W[c]``
    and/or ``dv += sum_ij (g[c]^T x)_ij M[i, j, :]``. float32, x unit column stride, v and g contiguous."""
    (C, k), D = v.shape, x.shape[1]
    m_rows, c_rows = (None if f is None else f[0] for f in _frozen(seed_m, seed_c, n, D, k))
    cpu_lib.call("tinyrecon_cpu_random_gemm", op, torch.get_num_threads(), seed_m, int(seed_c is not None),
                 seed_c or 0, x.shape[0], n, D, k, C, _ptr(v), _ptr(x), x.stride(0), _ptr(g), _ptr(out),
                 out.stride(0) if op == 1 and out is not None else 0, _ptr(dv), _ptr(m_rows), _ptr(c_rows))


def random_linear_forward(x: Tensor, v: Tensor, seed_m: int, seed_c: int | None, n: int) -> Tensor:
    """``x @ W^T`` for ``W = reshape(M @ v^T (+ b), C, n, D)``, M (n*D x k) and b frozen N(0, 1)."""
    (C, k), D = v.shape, x.shape[1]
    v = v.contiguous()
    fp32 = x.dtype == torch.float32
    if fp32:
        x = _unit_columns(x)
        if k <= _FUSED_MAX_RANK:
            y = x.new_empty(C, x.shape[0], n)
            _random_gemm(0, v, x, seed_m, seed_c, n, out=y)
            return y
    frozen = _frozen(seed_m, seed_c, n, D, k)
    y = x.new_zeros(C, x.shape[0], n)
    for j0, j1 in _column_blocks(n, D, C):
        W = _linear_block(v, seed_m, seed_c, n, D, j0, j1, frozen)
        for c in range(C):
            if fp32:   # the library's GEMM (torch's batched one is slower at these shapes)
                _masked_gemm(0, None, x[:, j0:j1], W[c], None, y[c], accumulate=True)
            else:
                y[c].addmm_(x[:, j0:j1], W[c].T)
    return y


def random_linear_backward(g: Tensor, x: Tensor, v: Tensor, seed_m: int, seed_c: int | None, n: int,
                           want_dx: bool, want_dv: bool) -> tuple[Tensor, Tensor]:
    """(dx, dv) for the upstream g (C, N, n), M's blocks drawn once for both; an unwanted one is empty."""
    D, C = x.shape[1], v.shape[0]
    dx = x.new_empty(x.shape if want_dx else (0,))
    dv = v.new_zeros(v.shape if want_dv else (0,))
    if want_dx and C == 0:
        dx.zero_()
    v = v.contiguous()
    fp32 = x.dtype == torch.float32
    if fp32:
        x, g = _unit_columns(x), g.contiguous()
        if v.shape[1] <= _FUSED_MAX_RANK:   # dx and dv in one pass, each tile of M read once for both
            if want_dx or want_dv:
                _random_gemm(1, v, x, seed_m, seed_c if want_dx else None, n, g=g, out=dx if want_dx else None,
                             dv=dv if want_dv else None)
            return dx, dv
    frozen = _frozen(seed_m, seed_c if want_dx else None, n, D, v.shape[1])
    for j0, j1 in _column_blocks(n, D, C):
        # dv[c] = sum_ij dW[c, i, j] M[i, j, :] with dW = g^T @ x
        dW = None
        if want_dv:
            dW = x.new_empty(C, n, j1 - j0)
            for c in range(C):
                if fp32:
                    _masked_gemm(2, None, x[:, j0:j1], None, g[c], dW[c])
                else:
                    torch.mm(g[c].T, x[:, j0:j1], out=dW[c])
        W = _linear_block(v, seed_m, seed_c, n, D, j0, j1, frozen, want_dx, dW, dv if want_dv else None)
        for c in range(C if want_dx else 0):
            if fp32:
                _masked_gemm(1, None, None, W[c], g[c], dx[:, j0:j1], accumulate=c > 0)
            elif c == 0:
                torch.mm(g[0], W[0], out=dx[:, j0:j1])
            else:
                dx[:, j0:j1].addmm_(g[c], W[c])
    return dx, dv


def _linear_backward(seed_c):
    """Backward of an apply whose inputs are (x, v, seed_m[, seed_c], n, bias)."""
    def backward(g, needs, x, v, seed_m, *rest):
        c, n = (rest[0] if seed_c else None), rest[-2]
        return random_linear_backward(_up(g).contiguous(), _up(x), _up(v), seed_m, c, n, *needs)
    return backward


ops.implement("hypernet_apply", "cpu", reference(
    lambda x, hvec, seed_w2, seed_b2, n, bias: add_bias(random_linear_forward(x, hvec, seed_w2, seed_b2, n), bias)),
    _linear_backward(True))
ops.implement("random_matrix_hypernet_apply", "cpu", reference(
    lambda x, z, seed_t, n, bias: add_bias(random_linear_forward(x, z, seed_t, None, n), bias)),
    _linear_backward(False))
