"""Benchmark shared by ``tinyrecon bench`` and ``pytest bench/``: one list, one check, one timer.

A case is (function, shape, op, backend) with op one of ``build`` (W = psi(w)), ``fwd``
(``apply``), ``fwdbwd`` (``apply`` then gradients for x, w and bias) and ``train`` (``apply`` then
gradients for w and bias only: x is data, as ``kappa(x)`` is in an RPN's first layer). Every case is first
checked against the torch reference in float64 (tinyBIG's algorithm: build W, then F.linear);
a wrong result is reported as ``wrong`` and never timed. Then the candidate and three baselines,
tinyBIG's algorithm, a dense ``nn.Linear`` of the same n x D and ``x.sum()`` (one read of x, the
floor of any apply), are timed interleaved (A B C D A B C D ...) so that a noisy machine slows
them alike; the median is reported.

Modules, one concern each:
- :mod:`.cases`: the catalogue (functions, shapes, ops), name parsing, selection, skip rules;
- :mod:`.check`: the callables timed and their check against the float64 reference;
- :mod:`.timing`: interleaved and cold (fresh-process) timing, traffic, environment probes;
- :mod:`.runner`: one case (check, then time) and a run of many;
- :mod:`.report`: table, markdown, plot, save/load, comparison of two runs.
"""
