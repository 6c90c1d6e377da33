"""Benchmark shared by ``tinyrecon bench`` and ``pytest bench/``: one list, one check, one timer.

A case is (function, shape, op, backend), op one of ``build``, ``fwd`` (``apply``), ``fwdbwd``
(gradients for x, w and bias) and ``train`` (for w and bias: x is data). Each is first checked
against tinyBIG's algorithm (build W, then F.linear) in float64 (a wrong result is never timed),
then timed interleaved with three baselines, tinyBIG's algorithm, a dense ``nn.Linear`` and
``x.sum()`` (the floor of any apply), so that a noisy machine slows them alike; the median is reported.

Modules: :mod:`.cases` (catalogue, names, skip rules), :mod:`.check`, :mod:`.timing` (warm and cold,
traffic, environment), :mod:`.runner` (one case, a run), :mod:`.report` (tables, plot, files, comparison).
"""
