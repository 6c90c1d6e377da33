"""``ReconciledLinear``: an ``nn.Linear`` whose weight is ``psi(w)``, applied without building it."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Reconciliation, check_dims, positive_int
from .config import from_config, resolve

FUSIONS = ("mean", "sum")
INITS = ("linear", "tinybig")


class ReconciledLinear(nn.Module):
    """``y = x @ fuse_c(psi(w_c))^T + bias``: a drop-in for ``nn.Linear(in_features, out_features)``.

    ``reconciliation``: a function instance, a short name (``"dual_lphm"``) or a tinyBIG config dict /
    YAML path. It owns ``w`` (channels, l); channels are fused by ``"mean"`` (tinyBIG's default) or
    ``"sum"``, then the bias is added. Training calls the structured ``apply``; ``weight`` builds W.

    ``init="linear"`` (the default) starts at nn.Linear's scale: its bias init, and ``w`` xavier-uniform
    times the factor that makes the output's RMS on N(0, 1) inputs nn.Linear's (``1/sqrt(3)``, measured
    on a probe batch); for the hypernets, whose W's scale w does not set, a fixed ``output_scale``
    buffer multiplies the output instead. ``init="tinybig"`` is a tinyBIG head's: xavier-uniform over
    ``(channels, l)`` and ``(1, out_features)``. The function itself is unchanged either way.
    """

    def __init__(self, in_features: int, out_features: int, reconciliation, bias: bool = True,
                 channels: int = 1, channel_fusion: str = "mean", backend: str | None = None,
                 device=None, dtype=None, init: str = "linear"):
        super().__init__()
        out_features, in_features = check_dims(out_features, in_features)
        channels = positive_int("channels", channels)
        if channel_fusion not in FUSIONS:
            raise ValueError(f"channel_fusion must be one of {FUSIONS}, got {channel_fusion!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init
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
        # Set by init="linear" for the hypernets only; a None buffer is not in state_dict.
        self.register_buffer("output_scale", None)
        self.reset_parameters()

    @classmethod
    def from_tinybig(cls, config, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                     in_features: int, out_features: int, backend: str | None = None) -> "ReconciledLinear":
        """The layer equal to a trained tinyBIG 0.2.1 head's ``x -> mean_c F.linear(x, psi(w_c), b)``
        (``layout="tinybig"``): ``config``, the head's reconciliation config (dict or YAML path); ``w``,
        its ``(channel_num, l)`` w; ``bias``, its ``b``; ``in_features``: D after the data expansion.
        """
        rec = from_config(config, layout="tinybig")
        w = w.detach()
        w = w[None] if w.dim() == 1 else w
        if w.dim() != 2:
            raise ValueError(f"tinyBIG's w has shape (channel_num, l), got {tuple(w.shape)}")
        layer = cls(in_features, out_features, rec, bias=bias is not None, channels=w.shape[0],
                    backend=backend, device=w.device, dtype=w.dtype, init="tinybig")
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
            if self.init == "tinybig":
                nn.init.xavier_uniform_(self.bias.view(1, -1))
            else:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)
        # A meta layer (deferred init, as FSDP does) gets its scale when reset_parameters runs on a real device.
        if self.init == "linear" and self.l and self.w.device.type != "meta":
            self._match_linear_scale()

    @torch.no_grad()
    def _match_linear_scale(self) -> None:
        """Scale w (or the output) so that the output's RMS on N(0, 1) inputs is nn.Linear's, 1/sqrt(3)."""
        self.output_scale = None
        probe = torch.randn(16, self.in_features, device=self.w.device, dtype=self.w.dtype)
        rms = self._fused(probe).float().square().mean().sqrt().item()
        if not rms > 0 or not math.isfinite(rms):
            return
        gain = 1 / math.sqrt(3) / rms
        if self.reconciliation.degree:   # scale w so that W gets the gain
            self.w.mul_(gain ** (1 / self.reconciliation.degree))
        else:
            self.output_scale = torch.tensor(gain, dtype=self.w.dtype, device=self.w.device)

    def _fuse(self, y: torch.Tensor) -> torch.Tensor:
        return y.mean(0) if self.channel_fusion == "mean" else y.sum(0)

    def _fused(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ fuse_c(psi(w_c))^T + bias``, without the output scale."""
        if self.w.shape[0] == 1:   # one channel: the op adds the bias itself (fused in the kernels)
            return self.reconciliation.apply(x, self.w, n=self.out_features, bias=bias,
                                             backend=self.backend, D=self.in_features)
        y = self._fuse(self.reconciliation.apply(x, self.w, n=self.out_features, backend=self.backend,
                                                 D=self.in_features))
        # y is in the autocast dtype under torch.autocast (apply casts as F.linear does): so is the bias
        return y if bias is None else y + bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_scale is None:
            return self._fused(x, self.bias)
        y = self._fused(x) * self.output_scale
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The fused (out_features, in_features) matrix (times ``output_scale`` if set), built now, differentiable."""
        W = self.reconciliation(n=self.out_features, D=self.in_features, w=self.w, backend=self.backend)
        W = self._fuse(W) if self.w.shape[0] > 1 else W
        return W if self.output_scale is None else W * self.output_scale

    def extra_repr(self) -> str:
        n, D, C = self.out_features, self.in_features, self.w.shape[0]
        ratio = f"{n * D / self.l:.3g}" if self.l else "inf"
        fusion = f", channel_fusion={self.channel_fusion!r}" if C > 1 else ""
        return (f"in_features={D}, out_features={n}, bias={self.bias is not None}, "
                f"function={type(self.reconciliation).__name__}, l={self.l}, compression={ratio} (n*D/l), "
                f"channels={C}{fusion}")


__all__ = ["ReconciledLinear"]
