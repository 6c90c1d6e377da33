"""layout="tinybig" reproduces tinyBIG 0.2.1 bit for bit, checked against tinyBIG's own code."""
import pytest
import torch
import torch.nn.functional as F

import tinyrecon as tr
from tinybig_ref import load

TB = load()
pytestmark = pytest.mark.skipif(TB is None, reason="tinybig not installed (pip install --no-deps tinybig==0.2.1)")

# (class name, constructor args, n, D): s != 1 and q != 1 where the layouts differ.
CASES = [
    ("hm_reconciliation", dict(p=2, q=3), 6, 12),
    ("hm_reconciliation", dict(), 12, 20),                 # p, q chosen by find_close_factors
    ("hm_reconciliation", dict(p=3, q=5), 6, 10),          # s=2 does not divide q=5: general gcd
    ("lphm_reconciliation", dict(p=2, q=4, r=2), 6, 12),
    ("lphm_reconciliation", dict(r=1), 6, 12),
    ("dual_lphm_reconciliation", dict(p=2, q=3, r=1), 6, 12),
    ("dual_lphm_reconciliation", dict(p=4, q=7, r=3), 8, 14),
    ("duplicated_padding_reconciliation", dict(p=2, q=3), 6, 12),
    ("duplicated_padding_reconciliation", dict(p=3), 9, 6),
    ("duplicated_diagonal_padding_reconciliation", dict(p=5, q=5), 5, 15),   # tinyBIG needs p = q = n
    ("lorr_reconciliation", dict(r=2), 7, 11),
    ("identity_reconciliation", dict(), 4, 9),
    ("constant_reconciliation", dict(c=2.5), 3, 4),
    ("zero_reconciliation", dict(), 3, 4),
    ("one_reconciliation", dict(), 3, 4),
    ("constant_eye_reconciliation", dict(), 3, 5),
]


def _layout_kwargs(name):
    return dict(layout="tinybig") if "hm" in name or "padding" in name else {}


@pytest.mark.parametrize("name,kw,n,D", CASES, ids=[f"{c[0]}-{c[2]}x{c[3]}" for c in CASES])
def test_build_is_bit_exact(name, kw, n, D):
    ours = getattr(tr, name)(**kw, **_layout_kwargs(name))
    theirs = getattr(TB, name)(**kw)
    l = ours.calculate_l(n, D)
    assert l == theirs.calculate_l(n, D)
    w = torch.randn(1, l)
    W_tb = theirs(n=n, D=D, w=w, device="cpu")
    W_tb = W_tb.to_dense() if W_tb.is_sparse else W_tb
    assert torch.equal(ours(n=n, D=D, w=w), W_tb)


@pytest.mark.parametrize("name,kw,n,D", CASES, ids=[f"{c[0]}-{c[2]}x{c[3]}" for c in CASES])
def test_apply_matches_tinybig_linear(name, kw, n, D):
    ours = getattr(tr, name)(**kw, **_layout_kwargs(name))
    theirs = getattr(TB, name)(**kw)
    l = ours.calculate_l(n, D)
    w = torch.randn(1, l, dtype=torch.float64)
    x, b = torch.randn(3, 2, D, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    W_tb = theirs(n=n, D=D, w=w, device="cpu")
    W_tb = W_tb.to_dense() if W_tb.is_sparse else W_tb
    torch.testing.assert_close(ours.apply(x, w, n=n, bias=b), F.linear(x, W_tb.to(x.dtype), b))


def test_kron_layout_differs_from_tinybig_when_s_and_q_exceed_one():
    # The documented math is the default; tinyBIG's flattened outer product is another matrix.
    w = torch.randn(1, 18)
    assert not torch.equal(tr.hm_reconciliation(p=2, q=3)(n=6, D=12, w=w),
                           TB.hm_reconciliation(p=2, q=3)(n=6, D=12, w=w))
