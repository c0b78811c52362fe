"""Small models importable by name, so that a subprocess can unpickle them."""
import torch
import torch.nn.functional as F
from torch import nn


class FunctionalBlock(nn.Module):
    """A block whose forward calls F.layer_norm on parameters of its own."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.dim = dim
        self.fc = nn.Linear(dim, dim)
        self.ln_weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.ln_bias = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x):
        return F.layer_norm(self.fc(x), (self.dim,), self.ln_weight, self.ln_bias, 1e-5) + x


def functional_model():
    torch.manual_seed(0)
    return nn.Sequential(FunctionalBlock(), nn.ReLU(), FunctionalBlock())


class TwoNames(nn.Module):
    """One BatchNorm reachable as ``a`` and ``b``, used by two different paths."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.a = self.b = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(self.conv2(self.a(self.conv(x))))


class ChannelsFirstLN(nn.LayerNorm):
    """A LayerNorm subclass normalizing the channels of an NCHW tensor by permuting
    (the pattern of transformers' ConvNextLayerNorm(data_format="channels_first"))."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class Mystery(nn.LayerNorm):
    """A LayerNorm subclass that does something else: must be skipped, not mis-converted."""

    def forward(self, x):
        return x * 2
