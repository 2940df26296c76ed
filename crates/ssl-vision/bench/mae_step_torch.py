"""One MAE training step in PyTorch, same configuration as examples/bench_mae_step.rs.

Written from MAE's models_mae.py structure (patch embed, per-sample argsort masking, visible-only
pre-norm encoder, decoder with mask tokens + unshuffle + its own fixed positions, masked MSE);
positions are zeros here since fixed embeddings do not change the cost.

    /work/.venv-torch/bin/python crates/ssl-vision/bench/mae_step_torch.py [STEPS]
"""
import json, sys, time
import torch
import torch.nn as nn

torch.manual_seed(0)
B, C, S, P = 64, 1, 28, 4
D, DEPTH, HEADS = 128, 4, 4
DD, DDEPTH, DHEADS = 64, 2, 4
L = (S // P) ** 2


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        y = self.n1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.n2(x))


class MAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(C, D, P, P)
        self.cls = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos", torch.zeros(1, L + 1, D))
        self.blocks = nn.ModuleList([Block(D, HEADS) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.dec_embed = nn.Linear(D, DD)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DD))
        self.register_buffer("dpos", torch.zeros(1, L + 1, DD))
        self.dblocks = nn.ModuleList([Block(DD, DHEADS) for _ in range(DDEPTH)])
        self.dnorm = nn.LayerNorm(DD, eps=1e-6)
        self.pred = nn.Linear(DD, P * P * C)

    def patchify(self, x):
        b = x.shape[0]
        x = x.reshape(b, C, S // P, P, S // P, P)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, L, P * P * C)

    def forward(self, imgs, ratio=0.75):
        x = self.patch(imgs).flatten(2).transpose(1, 2) + self.pos[:, 1:]
        keep = int(L * (1 - ratio))
        noise = torch.rand(x.shape[0], L)
        ids_shuffle = torch.argsort(noise, 1)
        ids_restore = torch.argsort(ids_shuffle, 1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
        mask = torch.ones(x.shape[0], L)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([(self.cls + self.pos[:, :1]).expand(x.shape[0], -1, -1), x], 1)
        for b in self.blocks:
            x = b(x)
        x = self.dec_embed(self.norm(x))
        m = self.mask_token.expand(x.shape[0], L + 1 - x.shape[1], -1)
        y = torch.cat([x[:, 1:], m], 1)
        y = torch.gather(y, 1, ids_restore[:, :, None].expand(-1, -1, DD))
        x = torch.cat([x[:, :1], y], 1) + self.dpos
        for b in self.dblocks:
            x = b(x)
        pred = self.pred(self.dnorm(x))[:, 1:]
        loss = ((pred - self.patchify(imgs)) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum()


steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
model = MAE()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
imgs = torch.rand(B, C, S, S)
times = []
for i in range(steps + 3):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    model(imgs).backward()
    opt.step()
    if i >= 3:
        times.append((time.perf_counter() - t0) * 1e3)
times.sort()
print(json.dumps({"impl": "pytorch " + torch.__version__, "threads": torch.get_num_threads(),
                  "params": sum(p.numel() for p in model.parameters()), "batch": B, "steps": steps,
                  "median_ms": round(times[len(times) // 2], 2), "min_ms": round(times[0], 2)}))
