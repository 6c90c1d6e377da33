"""The random families against tinyBIG 0.2.1's own formulas, with tinyBIG's frozen matrices (plain
attributes there, drawn with torch.randn) set to ours (drawn from the seed)."""
import pytest
import torch
import torch.nn.functional as F

import tinyrecon as tr
from tinyrecon import _random

from conftest import assert_close
from tinybig_ref import load

TB = load()
pytestmark = pytest.mark.skipif(TB is None, reason="tinybig not installed (pip install --no-deps tinybig==0.2.1)")

n, D = 6, 10


def _random_matrix_adaption():
    ours = tr.random_matrix_adaption_reconciliation(r=3, seed=11)
    theirs = TB.random_matrix_adaption_reconciliation(r=3)
    theirs.A, theirs.B = ours.matrices(n, D)
    return ours, theirs


def _random_matrix_hypernet():
    ours = tr.random_matrix_hypernet_reconciliation(r=3, l=5, hidden_dim=7, seed=11)
    theirs = TB.random_matrix_hypernet_reconciliation(r=3, l=5, hidden_dim=7)
    theirs.P, theirs.Q, theirs.S = ours.small_matrices(torch.empty(0))
    theirs.T = _random.randn(ours.stream_seed(3), (n * D, 3))   # the big matrix the kernels draw
    return ours, theirs


def _hypernet():
    ours = tr.hypernet_reconciliation(l=5, hidden_dim=7, seed=11)
    with pytest.warns(UserWarning):   # tinyBIG warns about l and hidden_dim on every construction
        theirs = TB.hypernet_reconciliation(l=5, hidden_dim=7)
    W1, b1 = ours.first_layer(torch.empty(0))
    theirs.net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Sigmoid(), torch.nn.Linear(7, n * D))
    with torch.no_grad():   # the second layer the kernels draw: (n*D, hidden_dim) and its bias
        for param, value in zip(theirs.net.parameters(), (W1, b1, _random.randn(ours.stream_seed(2), (n * D, 7)),
                                                          _random.randn(ours.stream_seed(3), (n * D,)))):
            param.copy_(value)
    return ours, theirs


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("pair", [_random_matrix_adaption, _random_matrix_hypernet, _hypernet],
                         ids=["random_matrix_adaption", "random_matrix_hypernet", "hypernet"])
def test_formula_matches_tinybig(pair, backend):
    ours, theirs = pair()
    w = torch.randn(1, ours.calculate_l(n, D))
    W = theirs(n=n, D=D, w=w, device="cpu")
    assert_close(ours(n, D, w, backend=backend), W)
    x, b = torch.randn(4, D), torch.randn(n)
    assert_close(ours.apply(x, w, n=n, bias=b, backend=backend), F.linear(x, W, b))
