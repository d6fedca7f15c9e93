"""Route CPU 3D convolutions through oneDNN.

PyTorch hands a batch-of-one 3x3x3 convolution to oneDNN only when N*C*D*H > 20480, a size heuristic written
for 2D images that ignores the last dimension; below it (all of the models' convolutions at half resolution and
coarser) it takes a native path that measured 4-9x slower forward on this project's 2-core CPU (16 channels at
32x40x64: 0.118 s vs 0.018 s). Same arithmetic, same weights: outputs agree to float32 rounding.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not _cpu_autocast_enabled())  # autocast (bf16 hosts) keeps PyTorch's own dispatch


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding=(0, 0, 0)) -> torch.Tensor:
    """``F.conv3d`` (stride 1, integer padding) through oneDNN where it applies."""
    padding = tuple(padding) if not isinstance(padding, int) else (padding,) * 3
    if _onednn_applies(x, weight):
        return torch.mkldnn_convolution(x, weight, bias, padding, (1, 1, 1), (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, padding=padding)


def _onednn_forward(self: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if _onednn_applies(x, self.weight) and self.padding_mode == "zeros" and not isinstance(self.padding, str):
        return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                        self.groups)
    return nn.Conv3d.forward(self, x)


def route_convolutions_to_onednn(module: nn.Module) -> nn.Module:
    """Make every ``nn.Conv3d`` in ``module`` use oneDNN on CPU float32, and every 4-tap stride-2 transposed
    convolution a phase convolution there when no gradient is asked for (:func:`conv_transpose_k4s2`); other
    devices and dtypes unchanged. Returns ``module``."""
    for child in module.modules():
        if type(child) is nn.Conv3d:
            child.forward = types.MethodType(_onednn_forward, child)
        elif _is_k4s2(child):
            child.forward = types.MethodType(_phase_forward, child)
    return module


# A stride-2 transposed convolution with a 4-tap kernel and padding 1 (the dose prior's upsampling) as one 2x2x2
# convolution of the input padded by one, with 8 output channels per output channel (one per output phase: even or
# odd along each axis), each phase then read at its own offset. Along one axis the output is y[2i] = x[i-1] w[3] +
# x[i] w[1] and y[2i+1] = x[i] w[2] + x[i+1] w[0]: 2-tap windows over the padded x starting at i ([w3, w1]) and
# at i + 1 ([w2, w0]). PyTorch's CPU path for these (slow_conv_transpose3d) measured 43 ms for the 16 -> 1
# channel upsampling to the 128 x 80 x 128 model grid on the 2-core CPU; this form runs through oneDNN. The same
# products summed in another order: equal to float32 rounding.
_PHASE_TAPS = ((3, 1), (2, 0))  # per phase: the kernel tap read at window offsets 0 and 1


def _phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_in, C_out, 4, 4, 4) transposed-convolution weights -> (8 C_out, C_in, 2, 2, 2) phase weights."""
    c_in, c_out = weight.shape[:2]
    phases = weight.new_empty((2, 2, 2, c_out, c_in, 2, 2, 2))
    for a in range(2):
        for b in range(2):
            for c in range(2):
                for dz, kz in enumerate(_PHASE_TAPS[a]):
                    for dy, ky in enumerate(_PHASE_TAPS[b]):
                        for dx, kx in enumerate(_PHASE_TAPS[c]):
                            phases[a, b, c, :, :, dz, dy, dx] = weight[:, :, kz, ky, kx].t()
    return phases.reshape(8 * c_out, c_in, 2, 2, 2)


def conv_transpose_k4s2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv_transpose3d(x, weight, bias, stride=2, padding=1)`` for a 4 x 4 x 4 kernel, via a phase convolution
    (see above)."""
    c_out = weight.shape[1]
    phase_bias = None if bias is None else bias.repeat(8)
    phases = conv3d(x, _phase_weight(weight), phase_bias, padding=(1, 1, 1))  # (n, 8 C_out, d + 1, h + 1, w + 1)
    n, _, d, h, w = x.shape
    phases = phases.view(n, 2, 2, 2, c_out, d + 1, h + 1, w + 1)
    out = x.new_empty((n, c_out, 2 * d, 2 * h, 2 * w))
    for a in range(2):
        for b in range(2):
            for c in range(2):
                out[:, :, a::2, b::2, c::2] = phases[:, a, b, c, :, a:a + d, b:b + h, c:c + w]
    return out


def _phase_forward(self: nn.ConvTranspose3d, x: torch.Tensor, output_size=None) -> torch.Tensor:
    if output_size is None and not torch.is_grad_enabled() and _onednn_applies(x, self.weight):
        return conv_transpose_k4s2(x, self.weight, self.bias)
    return nn.ConvTranspose3d.forward(self, x, output_size)


def _is_k4s2(module: nn.Module) -> bool:
    return (type(module) is nn.ConvTranspose3d and module.kernel_size == (4, 4, 4) and module.stride == (2, 2, 2)
            and module.padding == (1, 1, 1) and module.output_padding == (0, 0, 0) and module.groups == 1
            and module.dilation == (1, 1, 1) and module.padding_mode == "zeros")
