"""Small models for the study, written with ordinary torch layers (BatchNorm2d, timm's
LayerNorm2d, nn.LayerNorm) so that ``normswap.transform`` converts them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("none", "bn", "ln")


def norm2d(kind: str, channels: int) -> nn.Module:
    """``bn``: nn.BatchNorm2d; ``ln``: timm's LayerNorm2d (over channels at each position);
    ``none``: identity (the unnormalized baseline)."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        from timm.layers import LayerNorm2d
        return LayerNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class SmallCNN(nn.Module):
    """Three conv layers (5x5, 3x3, 3x3; each conv -> norm -> ReLU, max-pool after the first
    two), global average pool, linear classifier: the shape of Ren et al.'s CIFAR CNN."""

    def __init__(self, norm: str = "bn", widths=(32, 64, 64), num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        c1, c2, c3 = widths
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=2, bias=bias)
        self.norm1 = norm2d(norm, c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=bias)
        self.norm2 = norm2d(norm, c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=bias)
        self.norm3 = norm2d(norm, c3)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.norm2(self.conv2(x))), 2)
        x = F.relu(self.norm3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: stem conv, three stages of ``blocks`` basic blocks (widths
    16/32/64, stride 1/2/2), global pool, linear. ``blocks=1`` is ResNet-8."""

    def __init__(self, blocks: int = 1, widths=(16, 32, 64), num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class NormReLURNNCell(nn.Module):
    """``h' = relu(norm(W x + U h) + b)`` (Ren et al.'s normalized vanilla RNN: the summed
    input of each step is normalized over the hidden units)."""

    def __init__(self, n_in: int, hidden: int, norm: bool):
        super().__init__()
        self.ih = nn.Linear(n_in, hidden, bias=False)
        self.hh = nn.Linear(hidden, hidden, bias=False)
        nn.init.eye_(self.hh.weight)  # IRNN initialization (Le et al.): ReLU RNNs train from it
        self.hh.weight.data.mul_(0.5)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False) if norm else nn.Identity()
        self.bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, x, state):
        h = state[0]
        return (F.relu(self.norm(self.ih(x) + self.hh(h)) + self.bias),)


class NormLSTMCell(nn.Module):
    """Layer-normalized LSTM (Ba et al.): ``gates = norm_x(W x) + norm_h(U h) + b``,
    ``h' = o * tanh(norm_c(c'))``."""

    def __init__(self, n_in: int, hidden: int, norm: bool):
        super().__init__()
        self.ih = nn.Linear(n_in, 4 * hidden, bias=False)
        self.hh = nn.Linear(hidden, 4 * hidden, bias=False)
        self.bias = nn.Parameter(torch.zeros(4 * hidden))
        self.bias.data[hidden:2 * hidden] = 1.0  # forget gate
        mk = (lambda n: nn.LayerNorm(n)) if norm else (lambda n: nn.Identity())
        self.norm_x, self.norm_h, self.norm_c = mk(4 * hidden), mk(4 * hidden), mk(hidden)

    def forward(self, x, state):
        h, c = state
        i, f, g, o = (self.norm_x(self.ih(x)) + self.norm_h(self.hh(h)) + self.bias).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(self.norm_c(c)), c


class CharRNN(nn.Module):
    """Character language model: embedding, one recurrent layer (``cell`` = "relu" or
    "lstm"), linear decoder. ``forward(ids (N, T), state) -> logits (N, T, V), state``."""

    def __init__(self, vocab: int, cell: str = "lstm", hidden: int = 128, embed: int = 32, norm: bool = True):
        super().__init__()
        if cell not in ("relu", "lstm"):
            raise ValueError(f"cell must be 'relu' or 'lstm', got {cell!r}")
        self.cell_kind, self.hidden = cell, hidden
        self.embed = nn.Embedding(vocab, embed)
        self.cell = (NormReLURNNCell if cell == "relu" else NormLSTMCell)(embed, hidden, norm)
        self.decoder = nn.Linear(hidden, vocab)

    def init_state(self, n: int, device, dtype=torch.float32):
        z = torch.zeros(n, self.hidden, device=device, dtype=dtype)
        return (z,) if self.cell_kind == "relu" else (z, z.clone())

    def forward(self, ids, state):
        e = self.embed(ids)
        outs = []
        for t in range(ids.shape[1]):
            state = self.cell(e[:, t], state)
            outs.append(state[0])
        return self.decoder(torch.stack(outs, 1)), state
