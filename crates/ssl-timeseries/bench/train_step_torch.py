"""The PyTorch side of `cargo bench -p ssl-timeseries --bench train_step`: the same two models
and steps (forward, backward, clip 1.0, AdamW), timed the same way. Not run in CI.

    python bench/train_step_torch.py [--steps N]
"""
import argparse
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class SamePadConv(nn.Module):
    def __init__(self, c_in, c_out, k, d):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, k, padding=(k - 1) * d // 2, dilation=d)

    def forward(self, x):
        return self.conv(x)


class ConvBlock(nn.Module):
    def __init__(self, c_in, c_out, k, d, final):
        super().__init__()
        self.conv1 = SamePadConv(c_in, c_out, k, d)
        self.conv2 = SamePadConv(c_out, c_out, k, d)
        self.projector = nn.Conv1d(c_in, c_out, 1) if (c_in != c_out or final) else None

    def forward(self, x):
        res = x if self.projector is None else self.projector(x)
        x = self.conv2(F.gelu(self.conv1(F.gelu(x))))
        return x + res


class Tcn(nn.Module):
    def __init__(self, c=1, hidden=64, out=320, depth=10):
        super().__init__()
        self.input_fc = nn.Linear(c, hidden)
        widths = [hidden] * depth + [out]
        self.blocks = nn.ModuleList(
            ConvBlock(widths[i - 1] if i else hidden, widths[i], 3, 2 ** i, i == len(widths) - 1)
            for i in range(len(widths)))
        self.drop = nn.Dropout(0.1)

    def forward(self, x, keep):
        h = self.input_fc(x) * keep.unsqueeze(-1)
        h = h.transpose(1, 2)
        for b in self.blocks:
            h = b(h)
        return self.drop(h.transpose(1, 2))


def contrast(sim, partner):
    n = sim.shape[-1]
    eye = torch.eye(n, dtype=torch.bool)
    logp = F.log_softmax(sim.masked_fill(eye, -1e9), dim=-1)
    return -logp[..., torch.arange(n), partner].mean()


def hierarchical(z1, z2, alpha=0.5):
    loss, d = 0.0, 0
    while z1.size(1) > 1:
        b, t = z1.size(0), z1.size(1)
        z = torch.cat([z1, z2], 0).transpose(0, 1)
        loss = loss + alpha * contrast(z @ z.transpose(1, 2), (torch.arange(2 * b) + b) % (2 * b))
        z = torch.cat([z1, z2], 1)
        loss = loss + (1 - alpha) * contrast(z @ z.transpose(1, 2), (torch.arange(2 * t) + t) % (2 * t))
        d += 1
        z1 = F.max_pool1d(z1.transpose(1, 2), 2).transpose(1, 2)
        z2 = F.max_pool1d(z2.transpose(1, 2), 2).transpose(1, 2)
    if z1.size(1) == 1:
        b = z1.size(0)
        z = torch.cat([z1, z2], 0).transpose(0, 1)
        loss = loss + alpha * contrast(z @ z.transpose(1, 2), (torch.arange(2 * b) + b) % (2 * b))
        d += 1
    return loss / d


def ts2vec_step(model, x, rng):
    b, t, _ = x.shape
    crop_l = rng.integers(2, t + 1)
    left = rng.integers(t - crop_l + 1)
    right = left + crop_l
    eleft = rng.integers(left + 1)
    eright = rng.integers(right, t + 1)
    off = rng.integers(-eleft, t - eright + 1, size=b)

    def view(s, e):
        idx = torch.as_tensor(off[:, None] + np.arange(s, e)[None, :])
        ok = (idx >= 0) & (idx < t)
        v = torch.gather(x, 1, idx.clamp(0, t - 1).unsqueeze(-1)) * ok.unsqueeze(-1)
        keep = ok.float() * (torch.rand(ok.shape) > 0.5).float()
        return v, keep

    v1, k1 = view(eleft, right)
    v2, k2 = view(left, eright)
    o1 = model(v1, k1)[:, -crop_l:]
    o2 = model(v2, k2)[:, :crop_l]
    return hierarchical(o1, o2)


def sincos(n, d):
    pos = torch.arange(n).float()[:, None]
    i = torch.arange(d // 2).float()[None, :]
    a = pos / (10000 ** (2 * i / d))
    out = torch.zeros(n, d)
    out[:, 0::2], out[:, 1::2] = torch.sin(a), torch.cos(a)
    return out


class PatchTst(nn.Module):
    def __init__(self, p=12, d=64, depth=3, heads=4, mlp=128):
        super().__init__()
        self.p = p
        self.embed = nn.Linear(p, d)
        layer = nn.TransformerEncoderLayer(d, heads, mlp, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, p)

    def forward(self, x, ratio=0.4):
        patches = x.squeeze(-1).unfold(1, self.p, self.p)  # (B, N, P)
        b, n, _ = patches.shape
        k = round(ratio * n)
        order = torch.rand(b, n).argsort(1)
        mask = torch.zeros(b, n)
        mask.scatter_(1, order[:, :k], 1.0)
        h = self.embed(patches * (1 - mask).unsqueeze(-1)) + sincos(n, self.embed.out_features)
        pred = self.head(self.norm(self.enc(h)))
        return (((pred - patches) ** 2) * mask.unsqueeze(-1)).sum() / (mask.sum() * self.p)


def time_steps(name, model, loss_fn, data, batch, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)

    def run(n):
        t0 = time.perf_counter()
        for s in range(n):
            idx = rng.choice(len(data), batch, replace=False)
            loss = loss_fn(model, data[idx], rng)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return time.perf_counter() - t0

    run(3)
    secs = run(steps)
    print(f"{name}: {1e3 * secs / steps:.2f} ms/step over {steps} steps")


def series(n, t, seed):
    g = np.random.default_rng(seed)
    f = 1 + 4 * g.random((n, 1))
    s = np.sin(np.arange(t)[None, :] * f / t * 6.28) + 0.1 * g.standard_normal((n, t))
    return torch.tensor(s, dtype=torch.float32).unsqueeze(-1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    time_steps("ts2vec_tcn b8x150", Tcn(), ts2vec_step, series(64, 150, 1), 8, args.steps)
    time_steps("patchtst_masked b32x336", PatchTst(), lambda m, x, rng: m(x),
               series(256, 336, 2), 32, args.steps)
