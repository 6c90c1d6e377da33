"""The CPU backend: the Kronecker apply with what reads and writes x in C++ (``csrc/kron_cpu.cpp``).

Everything else is the torch reference's own code (``functions/kron.py``): the kernels replace its
``TORCH_X_OPS``. ``kron_pass`` reads x once for both ``U`` and ``V`` (torch makes one GEMM, so
one read, for each); ``kron_expand`` writes dx once. Both are ``torch.library`` custom ops, so
``torch.compile`` traces them as ops, not graph breaks. float32 and float64 run in the kernels;
float16 and bfloat16 in float32, rounded once at the end (as the reference does). Building W
reads no x, so ``kron_build`` is the reference's. duplicated_padding (a Kronecker product with a
rank-1 left factor in the reference) runs through the same kernels.
"""
import torch
from torch import Tensor

from . import cpu_lib
from .base import reference
from .functions import kron as _kron_ref
from .functions import padding as _padding_ref

_DTYPES = {torch.float32: 0, torch.float64: 1}
_MAX_EXPAND_RANK = 64   # the kernel keeps the rank's coefficients of a tile on the stack


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
# enough that reading it dominates (below, torch's GEMMs run from cache with less overhead), and
# the factor rows of a K block fit the kernel's L2 budget in one block (duplicated_padding's
# 32 x 307,720 B does not: BLAS blocks a wide factor better than a per-batch stream of it).
_MIN_ELEMENTS = 1 << 20
_FACTOR_BYTES = 256 * 1024


def _worth_it(numel: int, itemsize: int, rank: int, K: int) -> bool:
    return numel >= _MIN_ELEMENTS and rank * K * itemsize <= _FACTOR_BYTES


def _passes(x, Ar, Br, want_u: bool, want_v: bool):
    if not _worth_it(x.numel(), x.element_size(), Ar.shape[0] * want_u + Br.shape[0] * want_v, x.shape[2]):
        return _kron_ref.torch_passes(x, Ar, Br, want_u, want_v)
    U, V = kron_pass(x, Ar, Br, want_u, want_v)
    return (U if want_u else None), (V if want_v else None)


def _expand(G, Ar):
    N, rA, t = G.shape
    if rA > _MAX_EXPAND_RANK or not _worth_it(N * Ar.shape[1] * t, G.element_size(), rA, t):
        return _kron_ref.torch_expand(G, Ar)
    return kron_expand(G, Ar)


X_OPS = _kron_ref.XOps(_passes, _expand)

kron_build = _kron_ref.kron_build
dup_pad_build = _padding_ref.dup_pad_build


@reference
def kron_apply(x, A1, A2, B1, B2, bias, layout: str):
    return _kron_ref.kron_apply(x, A1, A2, B1, B2, bias, layout, x_ops=X_OPS)


@reference
def dup_pad_apply(x, B, p: int, q: int, bias, layout: str):
    return _padding_ref.dup_pad_apply(x, B, p, q, bias, layout, x_ops=X_OPS)
