"""``ReconciledLinear``: an ``nn.Linear`` whose weight is ``psi(w)``, applied without building it."""
from __future__ import annotations

import torch
from torch import nn

from .base import Reconciliation, check_dims, positive_int
from .config import from_config, resolve

FUSIONS = ("mean", "sum")


class ReconciledLinear(nn.Module):
    """``y = x @ fuse_c(psi(w_c))^T + bias``: a drop-in for ``nn.Linear(in_features, out_features)``.

    ``reconciliation``: a function instance, a short name (``"dual_lphm"``) or a tinyBIG config
    dict / YAML path. It owns ``w`` of shape ``(channels, l)``; channels are fused by ``"mean"``
    (tinyBIG's default) or ``"sum"``, and the bias is added once, after fusion. Training calls the
    function's structured ``apply``, so the ``out_features x in_features`` matrix is never built;
    ``weight`` builds it on demand. Initialised like a tinyBIG head: xavier-uniform over
    ``(channels, l)``, and over ``(1, out_features)`` for the bias.
    """

    def __init__(self, in_features: int, out_features: int, reconciliation, bias: bool = True,
                 channels: int = 1, channel_fusion: str = "mean", backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        out_features, in_features = check_dims(out_features, in_features)
        channels = positive_int("channels", channels)
        if channel_fusion not in FUSIONS:
            raise ValueError(f"channel_fusion must be one of {FUSIONS}, got {channel_fusion!r}")
        self.in_features, self.out_features = in_features, out_features
        self.channel_fusion, self.backend = channel_fusion, backend
        # A submodule: seeds of frozen matrices and a trainable hypernet go into state_dict.
        self.reconciliation: Reconciliation = resolve(reconciliation)
        # Trainable state that depends on (n, D) must exist before the optimizer is built.
        self.reconciliation.setup(out_features, in_features)
        if device is not None or dtype is not None:
            self.reconciliation.to(device=device, dtype=dtype)
        self.l = self.reconciliation.calculate_l(out_features, in_features)
        factory = dict(device=device, dtype=dtype)
        self.w = nn.Parameter(torch.empty(channels, self.l, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @classmethod
    def from_tinybig(cls, config, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                     in_features: int, out_features: int, backend: str | None = None) -> "ReconciledLinear":
        """The layer equal to a trained tinyBIG 0.2.1 head's ``x -> mean_c F.linear(x, psi(w_c), b)``.

        ``config``: the head's reconciliation config (dict or YAML path, see ``tinyrecon.config``);
        ``w``: its ``w`` of shape ``(channel_num, l)`` (e.g. ``state['layers.0.heads.0.w']``);
        ``bias``: its ``b``; ``in_features``: D, the width after the head's data expansion;
        ``out_features``: n. Built with ``layout="tinybig"`` so its outputs equal tinyBIG's.
        """
        rec = from_config(config, layout="tinybig")
        w = w.detach()
        w = w[None] if w.dim() == 1 else w
        if w.dim() != 2:
            raise ValueError(f"tinyBIG's w has shape (channel_num, l), got {tuple(w.shape)}")
        layer = cls(in_features, out_features, rec, bias=bias is not None, channels=w.shape[0],
                    backend=backend, device=w.device, dtype=w.dtype)
        if w.shape[1] != layer.l:
            raise ValueError(f"{type(rec).__name__} with n={out_features}, D={in_features} has "
                             f"l = {rec.l_formula(out_features, in_features)}; tinyBIG's w has shape {tuple(w.shape)}")
        with torch.no_grad():
            layer.w.copy_(w)
            if bias is not None:
                layer.bias.copy_(bias.reshape(out_features))
        return layer

    def reset_parameters(self) -> None:
        if self.l:
            nn.init.xavier_uniform_(self.w)
        if self.bias is not None:
            nn.init.xavier_uniform_(self.bias.view(1, -1))

    def _fuse(self, y: torch.Tensor) -> torch.Tensor:
        return y.mean(0) if self.channel_fusion == "mean" else y.sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w.shape[0] == 1:   # one channel: the op adds the bias itself (fused in the kernels)
            return self.reconciliation.apply(x, self.w, n=self.out_features, bias=self.bias,
                                             backend=self.backend, D=self.in_features)
        y = self._fuse(self.reconciliation.apply(x, self.w, n=self.out_features, backend=self.backend,
                                                 D=self.in_features))
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """The fused ``(out_features, in_features)`` matrix ``fuse_c(psi(w_c))``, built now (differentiable)."""
        W = self.reconciliation(n=self.out_features, D=self.in_features, w=self.w, backend=self.backend)
        return self._fuse(W) if self.w.shape[0] > 1 else W

    def extra_repr(self) -> str:
        n, D, C = self.out_features, self.in_features, self.w.shape[0]
        ratio = f"{n * D / self.l:.3g}" if self.l else "inf"
        fusion = f", channel_fusion={self.channel_fusion!r}" if C > 1 else ""
        return (f"in_features={D}, out_features={n}, bias={self.bias is not None}, "
                f"function={type(self.reconciliation).__name__}, l={self.l}, compression={ratio} (n*D/l), "
                f"channels={C}{fusion}")


__all__ = ["ReconciledLinear"]
