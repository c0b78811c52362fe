"""Independent float64 re-computations of PAPERS.md, written plainly (per-channel
loops, sorting, explicit windows) and sharing no code with normswap."""
import math

import numpy as np
import torch


def _per_channel_values(x):
    """(N, C, *) -> list over channels of 1-D float64 arrays of all the channel's values."""
    x = x.detach().double()
    return [x.select(1, c).reshape(-1) for c in range(x.shape[1])]


def bn_stats(x, kind, k=None):
    """Per-channel (mean, scale statistic) as PAPERS.md defines them."""
    means, scales = [], []
    for vals in _per_channel_values(x):
        mu = vals.sum() / vals.numel()
        v = vals - mu
        n = vals.numel()
        if kind == "l1":
            s = v.abs().sum() / n
        elif kind == "l2":
            s = (v * v).sum() / n
        elif kind == "topk":
            top = torch.sort(v.abs(), descending=True).values[:k]
            s = top.sum() / k
        else:
            s = torch.tensor(0.0, dtype=torch.float64)
        means.append(mu)
        scales.append(s)
    return torch.stack(means), torch.stack(scales)


def c_l1():
    return math.sqrt(math.pi / 2)


def c_inf(n):
    return 0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n))


def _affine(y, gamma, beta):
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if gamma is not None:
        y = y * gamma.detach().double().view(shape)
    if beta is not None:
        y = y + beta.detach().double().view(shape)
    return y


def batch_norm_train(x, kind, gamma=None, beta=None, eps=1e-5, sigma=0.0, k=None):
    """Training-mode output, per PAPERS.md section 2 (l1, topk), section 1 (l2 with sigma),
    or mean-only batch norm."""
    x = x.detach().double()
    mu, s = bn_stats(x, kind, k)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    n = x.numel() // x.shape[1]
    if kind == "l1":
        d = c_l1() * s + eps
    elif kind == "topk":
        d = c_inf(n) * s + eps
    elif kind == "l2":
        d = torch.sqrt(sigma ** 2 + s + eps)
    else:
        d = torch.ones_like(mu)
    y = (x - mu.view(shape)) / d.view(shape)
    return _affine(y, gamma, beta)


def batch_norm_eval(x, kind, running_mean, running_stat, gamma=None, beta=None, eps=1e-5, sigma=0.0):
    x = x.detach().double()
    rm, rs = running_mean.double(), running_stat.double() if running_stat is not None else None
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if kind == "l1":
        d = c_l1() * rs + eps
    elif kind == "topk":            # normswap keeps C_inf(n) * s_k as the running statistic
        d = rs + eps
    elif kind == "l2":
        d = torch.sqrt(sigma ** 2 + rs + eps)
    else:
        d = torch.ones_like(rm)
    return _affine((x - rm.view(shape)) / d.view(shape), gamma, beta)


def layer_norm_star(x, ndim, sigma, eps=1e-5, gamma=None, beta=None):
    """Per example over the last ``ndim`` dims: v / sqrt(sigma^2 + mean(v^2) + eps)."""
    x = x.detach().double()
    flat = x.reshape(-1, int(np.prod(x.shape[-ndim:])))
    out = torch.empty_like(flat)
    for i in range(flat.shape[0]):
        v = flat[i] - flat[i].sum() / flat.shape[1]
        out[i] = v / math.sqrt(sigma ** 2 + float((v * v).sum()) / flat.shape[1] + eps)
    y = out.reshape(x.shape)
    if gamma is not None:
        y = y * gamma.detach().double()
    if beta is not None:
        y = y + beta.detach().double()
    return y


def _box_valid_2d(a, wh, ww):
    """Mean over valid positions of a (wh, ww) window centred at each pixel. a: (H, W) numpy."""
    H, W = a.shape
    out = np.empty_like(a)
    rh, rw = wh // 2, ww // 2
    for i in range(H):
        for j in range(W):
            win = a[max(0, i - rh):min(H, i + rh + 1), max(0, j - rw):min(W, j + rw + 1)]
            out[i, j] = win.mean()
    return out


def divisive_norm_2d(x, sum_window, sup_window, sigma, eps=1e-5):
    x = x.detach().double().numpy()
    N, C, H, W = x.shape
    y = np.empty_like(x)
    for n in range(N):
        m = _box_valid_2d(x[n].mean(0), *sum_window)
        v = x[n] - m[None]
        q = _box_valid_2d((v ** 2).mean(0), *sup_window)
        y[n] = v / np.sqrt(sigma ** 2 + q + eps)[None]
    return torch.from_numpy(y)


def divisive_norm_1d(x, radius, sup_radius, sigma, eps=1e-5):
    x = x.detach().double().numpy()
    flat = x.reshape(-1, x.shape[-1])
    H = flat.shape[1]
    out = np.empty_like(flat)
    for b in range(flat.shape[0]):
        row = flat[b]
        m = np.array([row[max(0, j - radius):j + radius + 1].mean() for j in range(H)])
        v = row - m
        q = np.array([(v[max(0, j - sup_radius):j + sup_radius + 1] ** 2).mean() for j in range(H)])
        out[b] = v / np.sqrt(sigma ** 2 + q + eps)
    return torch.from_numpy(out.reshape(x.shape))


def centered_mean_abs_batch(x):
    """mean|x - mu| with mu the per-channel batch mean (BN-type penalty)."""
    mu, _ = bn_stats(x, "none")
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x.detach().double() - mu.view(shape)).abs().mean()


# -- every operation on every area (PAPERS.md section 5) ------------------------------
def _vec_stats(vals, kind, sigma=0.0, eps=1e-5, k=None):
    """One area's values (1-D float64): (normalized values, mean, tracked statistic).

    The tracked statistic is what a running statistic averages: the biased variance
    (l2), mean|v| (l1), C_inf(n) * s_k (topk)."""
    n = vals.numel()
    mu = vals.sum() / n
    v = vals - mu
    if kind == "l2":
        s = (v * v).sum() / n
        d = torch.sqrt(sigma ** 2 + s + eps)
    elif kind == "l1":
        s = v.abs().sum() / n
        d = c_l1() * s + eps
    elif kind == "topk":
        top = torch.sort(v.abs(), descending=True).values[:k]
        s = c_inf(n) * top.sum() / k
        d = s + eps
    else:
        s = torch.tensor(0.0, dtype=torch.float64)
        d = torch.tensor(1.0, dtype=torch.float64)
    return v / d, mu, s


def _area_slices(shape, area, num_groups=None, ndim=1):
    """Index tuples, one per set of values that share statistics, for an input shape."""
    N, C = shape[0], shape[1] if len(shape) > 1 else None
    out = []
    if area == "layer":
        lead = int(np.prod(shape[:len(shape) - ndim]))
        for i in range(lead):
            out.append(np.unravel_index(i, shape[:len(shape) - ndim]) + (Ellipsis,))
    elif area == "channels":
        for n in range(N):
            for pos in np.ndindex(*shape[2:]):
                out.append((n, slice(None)) + pos)
    elif area == "group":
        cg = C // num_groups
        for n in range(N):
            for g in range(num_groups):
                out.append((n, slice(g * cg, (g + 1) * cg)))
    elif area == "instance":
        for n in range(N):
            for c in range(C):
                out.append((n, c))
    elif area == "batch":
        for c in range(C):
            out.append((slice(None), c))
    return out


def area_norm(x, area, kind, sigma=0.0, eps=1e-5, k=None, gamma=None, beta=None, num_groups=None,
              ndim=1):
    """Normalize ``x`` with statistics per set of the area; then the recovery: per
    element of the trailing ``ndim`` dims for the layer area, per channel otherwise.
    Returns (y, means, tracked statistics) with one mean / statistic per set."""
    x = x.detach().double()
    y = torch.empty_like(x)
    means, stats = [], []
    for idx in _area_slices(tuple(x.shape), area, num_groups, ndim):
        vals = x[idx]
        out, mu, s = _vec_stats(vals.reshape(-1), kind, sigma, eps, k)
        y[idx] = out.reshape(vals.shape)
        means.append(mu)
        stats.append(s)
    if area == "layer":
        if gamma is not None:
            y = y * gamma.detach().double()
        if beta is not None:
            y = y + beta.detach().double()
    else:
        y = _affine(y, gamma, beta)
    return y, torch.stack(means), torch.stack(stats)


def area_mean_abs_centered(x, area, num_groups=None, ndim=1):
    """mean|x - mu| with mu the mean of each value's own area set (the L1 penalty)."""
    x = x.detach().double()
    total, count = 0.0, 0
    for idx in _area_slices(tuple(x.shape), area, num_groups, ndim):
        vals = x[idx].reshape(-1)
        total += float((vals - vals.sum() / vals.numel()).abs().sum())
        count += vals.numel()
    return total / count


def iter_norm(x, group_size, T, eps, running_mean=None, running_wm=None, gamma=None, beta=None):
    """IterNorm (PAPERS.md section 6) per group of channels with plain numpy matrices.

    Training (``running_mean`` None): returns (y, mean, whitening matrices per group);
    eval: uses the given mean and per-group matrices."""
    x = x.detach().double()
    N, C = x.shape[0], x.shape[1]
    X = x.transpose(0, 1).reshape(C, -1).numpy()
    m = X.shape[1]
    d = min(group_size, C)
    starts = list(range(0, C, d))
    Y = np.empty_like(X)
    mu = X.mean(axis=1) if running_mean is None else running_mean.double().numpy()
    wms = []
    for gi, s in enumerate(starts):
        e = min(s + d, C)
        V = X[s:e] - mu[s:e, None]
        if running_mean is None:
            sigma = V @ V.T / m + eps * np.eye(e - s)
            tr = np.trace(sigma)
            sigma_n = sigma / tr
            P = np.eye(e - s)
            for _ in range(T):
                P = (3 * P - P @ P @ P @ sigma_n) / 2
            wm = P / np.sqrt(tr)
        else:
            wm = running_wm[gi].double().numpy()
        wms.append(wm)
        Y[s:e] = wm @ V
    y = torch.from_numpy(Y).reshape((C, N) + tuple(x.shape[2:])).transpose(0, 1)
    return _affine(y, gamma, beta), torch.from_numpy(mu), wms
