"""The CPU backend: structured applies with what reads and writes x in C++ (``csrc/kron_cpu.cpp``).

Everything else is the torch reference's own code (``functions/``): the kernels replace its
``base.TORCH_X_OPS``. ``kron_pass`` reads x once for both ``U`` and ``V`` (torch makes one GEMM, so
one read, for each); ``kron_expand`` writes dx once. Both are ``torch.library`` custom ops, so
``torch.compile`` traces them as ops, not graph breaks. float32 and float64 run in the kernels;
float16 and bfloat16 in float32, rounded once at the end (as the reference does). Building W
reads no x, so the builds are the reference's. The Kronecker family and duplicated_padding (a
Kronecker product with a rank-1 left factor) use both halves of the pass per batch; lorr,
random_matrix_adaption and duplicated_diagonal_padding fold x into one matrix (``factor_pass``),
which the kernels split over threads by columns.
"""
import functools

import torch
from torch import Tensor

from . import cpu_lib
from .base import XOps, torch_expand, torch_passes
from .functions import kron as _kron_ref
from .functions import lowrank as _lowrank_ref
from .functions import padding as _padding_ref

_DTYPES = {torch.float32: 0, torch.float64: 1}
_MAX_EXPAND_RANK = 64   # the kernel keeps the rank's coefficients of a tile on the stack (> _MAX_RANK)


def _check(name: str, *tensors: Tensor) -> None:
    if tensors[0].dtype not in _DTYPES or any(t.dtype != tensors[0].dtype for t in tensors):
        raise TypeError(f"{name} takes float32 or float64 tensors of one dtype, got {[t.dtype for t in tensors]}")


def _pass_shapes(x: Tensor, L: Tensor, R: Tensor, want_u: bool, want_v: bool):
    N, M, K = x.shape
    return (N, L.shape[0], K) if want_u else (0,), (R.shape[0], N * M) if want_v else (0,)


@torch.library.custom_op("tinyrecon::cpu_kron_pass", mutates_args=())
def kron_pass(x: Tensor, L: Tensor, R: Tensor, want_u: bool, want_v: bool) -> tuple[Tensor, Tensor]:
    """``U[b] = L @ X[b]`` (N, RA, K) and ``V = R @ x.reshape(N*M, K)^T`` (RB, N*M) in one read of
    x (N, M, K); an unwanted one is returned empty."""
    _check("cpu_kron_pass", x, L, R)
    if not (want_u or want_v):
        raise ValueError("cpu_kron_pass: ask for U, V or both")
    N, M, K = x.shape
    if L.shape[1] != M or R.shape[1] != K:
        raise ValueError(f"cpu_kron_pass: L {tuple(L.shape)} and R {tuple(R.shape)} do not fit x {tuple(x.shape)}")
    U, V = (x.new_empty(s) for s in _pass_shapes(x, L, R, want_u, want_v))
    if x.numel() == 0:   # nothing to read (and empty buffers have no address to pass)
        return U.zero_(), V.zero_()
    x, L, R = x.contiguous(), L.contiguous(), R.contiguous()
    cpu_lib.call("tinyrecon_cpu_kron_pass", _DTYPES[x.dtype], torch.get_num_threads(), x.data_ptr(), L.data_ptr(),
                 R.data_ptr(), U.data_ptr() if want_u else None, V.data_ptr() if want_v else None,
                 N, M, K, L.shape[0], R.shape[0])
    return U, V


@kron_pass.register_fake
def _(x, L, R, want_u, want_v):
    return tuple(x.new_empty(s) for s in _pass_shapes(x, L, R, want_u, want_v))


@torch.library.custom_op("tinyrecon::cpu_kron_expand", mutates_args=())
def kron_expand(G: Tensor, L: Tensor) -> Tensor:
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


@kron_expand.register_fake
def _(G, L):
    return G.new_empty(G.shape[0], L.shape[1], G.shape[2])


# When the kernels pay (measured on the MNIST, tall and square shapes of the benchmark): x is big
# enough that reading it dominates (below, torch's GEMMs run from cache with less overhead); the
# factors are thin (from about 16 rows on, BLAS runs a real GEMM as fast); and their rows, which
# the kernels stream once per batch, either stay in L2 or are few next to x's M rows per batch
# (duplicated_padding's B, 32 x 307,720 against M = 2, is neither).
_MIN_ELEMENTS = 1 << 20
_MAX_RANK = 16
_FACTOR_BYTES = 256 * 1024


def _worth_it(numel: int, itemsize: int, rank: int, M: int, K: int) -> bool:
    return (numel >= _MIN_ELEMENTS and rank <= _MAX_RANK
            and (rank * K * itemsize <= _FACTOR_BYTES or 4 * rank <= M))


def _kernel_passes(x, Ar, Br, want_u: bool, want_v: bool):
    U, V = kron_pass(x, Ar, Br, want_u, want_v)
    return (U if want_u else None), (V if want_v else None)


def _passes(x, Ar, Br, want_u: bool, want_v: bool):
    N, M, K = x.shape
    if not _worth_it(x.numel(), x.element_size(), Ar.shape[0] * want_u + Br.shape[0] * want_v, M, K):
        return torch_passes(x, Ar, Br, want_u, want_v)
    return _kernel_passes(x, Ar, Br, want_u, want_v)


def _expand(G, Ar):
    N, rA, K = G.shape
    M = Ar.shape[1]
    if not _worth_it(N * M * K, G.element_size(), rA, M, K):
        return torch_expand(G, Ar)
    return kron_expand(G, Ar)


KERNEL_X_OPS = XOps(_kernel_passes, kron_expand)   # always the kernels (tests)
X_OPS = XOps(_passes, _expand)                     # the kernels where they pay, else torch's GEMMs

# The applies are the references with the kernels' XOps; builds read no x and are the references.
# (The references already compute fp16/bf16 in fp32, so the kernels only ever see fp32 and fp64.)
kron_build = _kron_ref.kron_build
dup_pad_build = _padding_ref.dup_pad_build
block_diag_build = _padding_ref.block_diag_build
lowrank_build = _lowrank_ref.lowrank_build
rma_build = _lowrank_ref.rma_build
kron_apply = functools.partial(_kron_ref.kron_apply, x_ops=X_OPS)
dup_pad_apply = functools.partial(_padding_ref.dup_pad_apply, x_ops=X_OPS)
block_diag_apply = functools.partial(_padding_ref.block_diag_apply, x_ops=X_OPS)
lowrank_apply = functools.partial(_lowrank_ref.lowrank_apply, x_ops=X_OPS)
rma_apply = functools.partial(_lowrank_ref.rma_apply, x_ops=X_OPS)
