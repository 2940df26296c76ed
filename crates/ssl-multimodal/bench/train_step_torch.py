"""The PyTorch side of `cargo bench -p ssl-multimodal --bench train_step`: the same CLIP model
(ViT pre-norm image tower with a class token and fixed 2-D sin-cos positions; BERT post-norm
text tower with mean pooling; bias-free projections; learnable logit_scale clamped to ln 100)
and the same step (forward, symmetric cross-entropy, backward, clip 1.0, AdamW), timed the same
way: 3 warm-up steps, then N steps. Not run in CI.

    OMP_NUM_THREADS=2 python bench/train_step_torch.py [--steps N]
"""
import argparse
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

B, SEQ, VOCAB, D, E = 64, 16, 1000, 64, 64


def sincos_2d(d, gh, gw):
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gy, gx = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one(d // 2, gy), one(d // 2, gx)], axis=1)
    emb = np.concatenate([np.zeros((1, d)), emb], axis=0)
    return torch.tensor(emb, dtype=torch.float32).unsqueeze(0)


def layer(norm_first, eps):
    return nn.TransformerEncoderLayer(D, 4, 2 * D, dropout=0.0, activation="gelu",
                                      batch_first=True, norm_first=norm_first, layer_norm_eps=eps)


class ViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, D, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.register_buffer("pos", sincos_2d(D, 4, 4))
        self.layers = nn.ModuleList(layer(True, 1e-6) for _ in range(2))
        self.norm = nn.LayerNorm(D, eps=1e-6)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos[:, 1:]
        x = torch.cat([(self.cls + self.pos[:, :1]).expand(x.shape[0], -1, -1), x], 1)
        for blk in self.layers:
            x = blk(x)
        return self.norm(x)[:, 0]


class Bert(nn.Module):
    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(VOCAB, D)
        self.position = nn.Embedding(32, D)
        self.token_type = nn.Embedding(2, D)
        self.norm = nn.LayerNorm(D, eps=1e-12)
        self.layers = nn.ModuleList(layer(False, 1e-12) for _ in range(2))

    def forward(self, ids, mask):
        t = ids.shape[1]
        x = self.word(ids) + self.position.weight[:t] + self.token_type.weight[0]
        x = self.norm(x)
        pad = mask == 0
        for blk in self.layers:
            x = blk(x, src_key_padding_mask=pad)
        m = mask.unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


class Clip(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision, self.text = ViT(), Bert()
        self.vproj = nn.Linear(D, E, bias=False)
        self.tproj = nn.Linear(D, E, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, px, ids, mask):
        i = F.normalize(self.vproj(self.vision(px)), dim=-1)
        t = F.normalize(self.tproj(self.text(ids, mask)), dim=-1)
        logits = self.logit_scale.exp() * i @ t.T
        y = torch.arange(len(px))
        return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    steps = ap.parse_args().steps
    torch.manual_seed(0)
    model = Clip()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    px = torch.rand(B, 3, 32, 32)
    ids = torch.randint(5, VOCAB, (B, SEQ))
    mask = torch.ones(B, SEQ)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(px, ids, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    print(f"torch clip b64: {1e3 * dt / steps:.2f} ms/step over {steps} steps "
          f"(threads {torch.get_num_threads()}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
