"""The PyTorch side of the cross-implementation suite (`bench/run`): the same five models as
`crates/ssl-cli/benches/suite.rs`, timed the same way (2 warm-up steps, then N timed steps,
median), printed as one JSON object per model plus the peak matmul line. Float32, CPU;
`--precision bf16` runs every model step (not the peak matmul) under
`torch.autocast("cpu", dtype=torch.bfloat16)`, the counterpart of our `--precision bf16`.
`--device cuda` runs on the first GPU (autocast on "cuda" under bf16), each step timed until
the GPU has finished it.

    python bench/torch_suite.py [--steps N] [--only a,b] [--threads T] [--precision f32|bf16]
                                [--device cpu|cuda]

`ts2vec_train` is ported from the official TS2Vec code (github.com/zhihanyue/ts2vec): its
TSEncoder, hierarchical_contrastive_loss and the crops of its fit loop; it times at least 20
steps (its crops are random, so the step's work varies).

Ports of the existing single-model scripts: crates/ssl-text/scripts/bench_step_torch.py
(transformers' BertForMaskedLM; a hand-written equivalent when transformers is missing),
crates/ssl-vision/bench/mae_step_torch.py, crates/ssl-timeseries/bench/train_step_torch.py
(PatchTST) and crates/ssl-multimodal/bench/train_step_torch.py, with the configurations listed
in suite.rs's documentation. Dropout is 0 everywhere.

FLOPs per step use the formulas of suite.rs (matmuls only, 2*m*n*k each, summed over the
forward pass; a training step is 3x its forward pass): a transformer layer over b sequences of
n tokens, width d, feed-forward f costs 2*b*n*(4*d*d + 2*d*f) + 4*b*n*n*d.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WARMUP = 2
MODELS = ["mlm_train", "mae_train", "series_train", "clip_train", "ts2vec_train", "mlm_embed"]


def layer_flops(b, n, d, f):
    return 2.0 * b * n * (4.0 * d * d + 2.0 * d * f) + 4.0 * b * n * n * d


def mm(m, k, n):
    return 2.0 * m * k * n


# Set by --precision bf16: model steps run under CPU autocast to bfloat16.
AUTOCAST = False
# Set by --device: "cuda" makes every tensor and module default to the first GPU
# (torch.set_default_device) and times each step until the GPU has finished it.
DEVICE = "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_steps(steps, step, autocast=None):
    autocast = AUTOCAST if autocast is None else autocast

    def run():
        if autocast:
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                step()
        else:
            step()

    for _ in range(WARMUP):
        run()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# ---- BERT (mlm_train, mlm_embed) ----
VOCAB, MLM_B, MLM_T, H, LAYERS, HEADS, FF = 8000, 16, 128, 256, 4, 4, 1024


def mlm_encoder_flops():
    return LAYERS * layer_flops(MLM_B, MLM_T, H, FF)


def mlm_forward_flops():
    masked = 0.15 * MLM_B * (MLM_T - 2)
    return mlm_encoder_flops() + mm(masked, H, H) + mm(masked, H, VOCAB)


class HandBert(nn.Module):
    """BERT (post-norm, GELU-erf, eps 1e-12) with the MLM head, for when transformers is missing:
    `bert(ids, mask)` gives the last hidden state, `cls(h)` the logits (tied decoder)."""

    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(VOCAB, H, padding_idx=0)
        self.position = nn.Embedding(512, H)
        self.token_type = nn.Embedding(2, H)
        self.norm = nn.LayerNorm(H, eps=1e-12)
        layer = nn.TransformerEncoderLayer(H, HEADS, FF, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=False, layer_norm_eps=1e-12)
        self.layers = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.dense = nn.Linear(H, H)
        self.hnorm = nn.LayerNorm(H, eps=1e-12)
        self.bias = nn.Parameter(torch.zeros(VOCAB))

    def bert(self, ids, mask):
        t = ids.shape[1]
        x = self.word(ids) + self.position.weight[:t] + self.token_type.weight[0]
        return self.layers(self.norm(x), src_key_padding_mask=mask == 0)

    def cls(self, h):
        return self.hnorm(F.gelu(self.dense(h))) @ self.word.weight.T + self.bias


def bert_model():
    """(model, bert(ids, mask) -> hidden, cls(hidden) -> logits, description)."""
    try:
        import transformers
        from transformers import BertConfig, BertForMaskedLM
    except ImportError:
        m = HandBert()
        return m, m.bert, m.cls, "hand-written BERT (transformers not installed)"
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=FF, hidden_act="gelu",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12)
    m = BertForMaskedLM(cfg)
    bert = lambda ids, mask: m.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    return m, bert, m.cls, "transformers %s BertForMaskedLM (attention %s)" % (
        transformers.__version__, m.config._attn_implementation)


def text_batch():
    ids = torch.randint(5, VOCAB, (MLM_B, MLM_T))
    ids[:, 0] = 2
    ids[:, -1] = 2
    return ids, torch.ones_like(ids)


def mlm_train(steps):
    model, bert, cls, desc = bert_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    ids, att = text_batch()

    def step():
        # Token masking as DataCollatorForLanguageModeling (15%, 80/10/10), on the fly like ours.
        prob = torch.full(ids.shape, 0.15)
        prob[:, 0] = 0
        prob[:, -1] = 0
        sel = torch.bernoulli(prob).bool()
        inp = ids.clone()
        rep = torch.bernoulli(torch.full(ids.shape, 0.8)).bool() & sel
        inp[rep] = 4
        rnd = torch.bernoulli(torch.full(ids.shape, 0.5)).bool() & sel & ~rep
        inp[rnd] = torch.randint(VOCAB, ids.shape)[rnd]
        # The head only on the masked positions, as ours (not on all B x T tokens).
        h = bert(inp, att)[sel]
        loss = F.cross_entropy(cls(h), ids[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return time_steps(steps, step), model, desc


def mlm_embed(steps):
    model, bert, _, desc = bert_model()
    model.eval()
    ids, att = text_batch()

    def step():
        with torch.no_grad():
            h = bert(ids, att)
            m = att.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        assert pooled.shape == (MLM_B, H)

    return time_steps(steps, step), model, desc


# ---- MAE (port of crates/ssl-vision/bench/mae_step_torch.py) ----
MB, MC, MS, MP = 32, 3, 32, 4
MD, MDEPTH, MHEADS = 192, 6, 3
MDD, MDDEPTH, MDHEADS = 128, 2, 4
ML = (MS // MP) ** 2


def mae_flops():
    keep = int(ML * 0.25)
    pix = MP * MP * MC
    return (mm(MB * ML, pix, MD) + MDEPTH * layer_flops(MB, keep + 1, MD, 4 * MD)
            + mm(MB * (keep + 1), MD, MDD) + MDDEPTH * layer_flops(MB, ML + 1, MDD, 4 * MDD)
            + mm(MB * (ML + 1), MDD, pix))


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
        self.patch = nn.Conv2d(MC, MD, MP, MP)
        self.cls = nn.Parameter(torch.zeros(1, 1, MD))
        self.register_buffer("pos", torch.zeros(1, ML + 1, MD))
        self.blocks = nn.ModuleList([Block(MD, MHEADS) for _ in range(MDEPTH)])
        self.norm = nn.LayerNorm(MD, eps=1e-6)
        self.dec_embed = nn.Linear(MD, MDD)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, MDD))
        self.register_buffer("dpos", torch.zeros(1, ML + 1, MDD))
        self.dblocks = nn.ModuleList([Block(MDD, MDHEADS) for _ in range(MDDEPTH)])
        self.dnorm = nn.LayerNorm(MDD, eps=1e-6)
        self.pred = nn.Linear(MDD, MP * MP * MC)

    def patchify(self, x):
        b = x.shape[0]
        x = x.reshape(b, MC, MS // MP, MP, MS // MP, MP)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, ML, MP * MP * MC)

    def forward(self, imgs, ratio=0.75):
        x = self.patch(imgs).flatten(2).transpose(1, 2) + self.pos[:, 1:]
        keep = int(ML * (1 - ratio))
        noise = torch.rand(x.shape[0], ML)
        ids_shuffle = torch.argsort(noise, 1)
        ids_restore = torch.argsort(ids_shuffle, 1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, MD))
        mask = torch.ones(x.shape[0], ML)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([(self.cls + self.pos[:, :1]).expand(x.shape[0], -1, -1), x], 1)
        for b in self.blocks:
            x = b(x)
        x = self.dec_embed(self.norm(x))
        m = self.mask_token.expand(x.shape[0], ML + 1 - x.shape[1], -1)
        y = torch.cat([x[:, 1:], m], 1)
        y = torch.gather(y, 1, ids_restore[:, :, None].expand(-1, -1, MDD))
        x = torch.cat([x[:, :1], y], 1) + self.dpos
        for b in self.dblocks:
            x = b(x)
        pred = self.pred(self.dnorm(x))[:, 1:]
        loss = ((pred - self.patchify(imgs)) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum()


def mae_train(steps):
    model = MAE()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    imgs = torch.rand(MB, MC, MS, MS)

    def step():
        opt.zero_grad(set_to_none=True)
        model(imgs).backward()
        opt.step()

    return time_steps(steps, step), model, "hand-written MAE (nn.MultiheadAttention)"


# ---- PatchTST masked patches (port of crates/ssl-timeseries/bench/train_step_torch.py) ----
SB, ST, SP = 32, 336, 12


def series_flops():
    n = ST // SP
    return mm(SB * n, SP, 64) + 3 * layer_flops(SB, n, 64, 128) + mm(SB * n, 64, SP)


def sincos(n, d):
    pos = torch.arange(n).float()[:, None]
    i = torch.arange(d // 2).float()[None, :]
    a = pos / (10000 ** (2 * i / d))
    out = torch.zeros(n, d)
    out[:, 0::2], out[:, 1::2] = torch.sin(a), torch.cos(a)
    return out


class PatchTst(nn.Module):
    def __init__(self, p=SP, d=64, depth=3, heads=4, mlp=128):
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


def series_data(n, t, seed):
    g = np.random.default_rng(seed)
    f = 1 + 4 * g.random((n, 1))
    s = np.sin(np.arange(t)[None, :] * f / t * 6.28) + 0.1 * g.standard_normal((n, t))
    return torch.tensor(s, dtype=torch.float32).unsqueeze(-1)


def series_train(steps):
    model = PatchTst()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    data = series_data(256, ST, 2)
    rng = np.random.default_rng(0)

    def step():
        idx = rng.choice(len(data), SB, replace=False)
        loss = model(data[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return time_steps(steps, step), model, "hand-written PatchTST (nn.TransformerEncoderLayer)"


# ---- TS2Vec (port of the official reference, github.com/zhihanyue/ts2vec: models/encoder.py,
# models/dilated_conv.py, models/losses.py and the crops of ts2vec.py's fit loop) ----
TSB, TSLEN, TSH, TSO, TSDEPTH, TSMIN_STEPS = 8, 256, 64, 320, 10, 20


def ts2vec_flops():
    """Expected forward matmul FLOPs over the reference's crop draw (suite.rs's formula): the
    encoder on both views (E[l1 + l2] = 2 c + (T - c) / 2 for a crop of c steps) and the
    hierarchical loss's similarity products on the overlap, averaged over c uniform in [2, T]."""
    k = 3
    row = (mm(1, 1, TSH) + TSDEPTH * 2 * mm(1, k * TSH, TSH)
           + mm(1, k * TSH, TSO) + mm(1, k * TSO, TSO) + mm(1, TSH, TSO))
    total = 0.0
    for c in range(2, TSLEN + 1):
        f = TSB * (2 * c + (TSLEN - c) / 2) * row
        n = c
        while n > 1:
            f += n * mm(2 * TSB, TSO, 2 * TSB) + TSB * mm(2 * n, TSO, 2 * n)
            n //= 2
        if n == 1:
            f += mm(2 * TSB, TSO, 2 * TSB)
        total += f
    return total / (TSLEN - 1)


class SamePadConv(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, dilation=1):
        super().__init__()
        self.receptive_field = (kernel_size - 1) * dilation + 1
        padding = self.receptive_field // 2
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding,
                              dilation=dilation)
        self.remove = 1 if self.receptive_field % 2 == 0 else 0

    def forward(self, x):
        out = self.conv(x)
        if self.remove > 0:
            out = out[:, :, :-self.remove]
        return out


class ConvBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, dilation, final=False):
        super().__init__()
        self.conv1 = SamePadConv(in_channels, out_channels, kernel_size, dilation=dilation)
        self.conv2 = SamePadConv(out_channels, out_channels, kernel_size, dilation=dilation)
        self.projector = (nn.Conv1d(in_channels, out_channels, 1)
                          if in_channels != out_channels or final else None)

    def forward(self, x):
        residual = x if self.projector is None else self.projector(x)
        x = F.gelu(x)
        x = self.conv1(x)
        x = F.gelu(x)
        x = self.conv2(x)
        return x + residual


class TSEncoder(nn.Module):
    """The reference's TSEncoder (binomial timestamp masking in training); dropout 0 as every
    model of the suite (the reference's repr_dropout is 0.1)."""

    def __init__(self, input_dims=1, output_dims=TSO, hidden_dims=TSH, depth=TSDEPTH):
        super().__init__()
        self.input_fc = nn.Linear(input_dims, hidden_dims)
        channels = [hidden_dims] * depth + [output_dims]
        self.feature_extractor = nn.Sequential(*[
            ConvBlock(channels[i - 1] if i > 0 else hidden_dims, channels[i], 3, 2 ** i,
                      final=(i == len(channels) - 1))
            for i in range(len(channels))])
        self.repr_dropout = nn.Dropout(p=0.0)

    def forward(self, x):
        nan_mask = ~x.isnan().any(axis=-1)
        x = x.masked_fill(~nan_mask.unsqueeze(-1), 0)
        x = self.input_fc(x)
        mask = torch.from_numpy(np.random.binomial(1, 0.5, size=(x.size(0), x.size(1)))).to(
            torch.bool)
        mask &= nan_mask
        x = x.masked_fill(~mask.unsqueeze(-1), 0)
        x = x.transpose(1, 2)
        x = self.repr_dropout(self.feature_extractor(x))
        return x.transpose(1, 2)


def instance_contrastive_loss(z1, z2):
    B = z1.size(0)
    if B == 1:
        return z1.new_tensor(0.)
    z = torch.cat([z1, z2], dim=0).transpose(0, 1)  # T x 2B x C
    sim = torch.matmul(z, z.transpose(1, 2))
    logits = torch.tril(sim, diagonal=-1)[:, :, :-1]
    logits += torch.triu(sim, diagonal=1)[:, :, 1:]
    logits = -F.log_softmax(logits, dim=-1)
    i = torch.arange(B)
    return (logits[:, i, B + i - 1].mean() + logits[:, B + i, i].mean()) / 2


def temporal_contrastive_loss(z1, z2):
    T = z1.size(1)
    if T == 1:
        return z1.new_tensor(0.)
    z = torch.cat([z1, z2], dim=1)  # B x 2T x C
    sim = torch.matmul(z, z.transpose(1, 2))
    logits = torch.tril(sim, diagonal=-1)[:, :, :-1]
    logits += torch.triu(sim, diagonal=1)[:, :, 1:]
    logits = -F.log_softmax(logits, dim=-1)
    t = torch.arange(T)
    return (logits[:, t, T + t - 1].mean() + logits[:, T + t, t].mean()) / 2


def hierarchical_contrastive_loss(z1, z2, alpha=0.5, temporal_unit=0):
    loss = torch.tensor(0.)
    d = 0
    while z1.size(1) > 1:
        if alpha != 0:
            loss = loss + alpha * instance_contrastive_loss(z1, z2)
        if d >= temporal_unit and 1 - alpha != 0:
            loss = loss + (1 - alpha) * temporal_contrastive_loss(z1, z2)
        d += 1
        z1 = F.max_pool1d(z1.transpose(1, 2), kernel_size=2).transpose(1, 2)
        z2 = F.max_pool1d(z2.transpose(1, 2), kernel_size=2).transpose(1, 2)
    if z1.size(1) == 1:
        if alpha != 0:
            loss = loss + alpha * instance_contrastive_loss(z1, z2)
        d += 1
    return loss / d


def take_per_row(A, indx, num_elem):
    all_indx = indx[:, None] + np.arange(num_elem)
    return A[torch.arange(all_indx.shape[0])[:, None], all_indx]


def ts2vec_train(steps):
    model = TSEncoder()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    data = series_data(64, TSLEN, 3)
    rng = np.random.default_rng(0)
    temporal_unit = 0

    def step():
        x = data[rng.choice(len(data), TSB, replace=False)]
        # The reference's crops (ts2vec.py, TS2Vec.fit).
        ts_l = x.size(1)
        crop_l = np.random.randint(low=2 ** (temporal_unit + 1), high=ts_l + 1)
        crop_left = np.random.randint(ts_l - crop_l + 1)
        crop_right = crop_left + crop_l
        crop_eleft = np.random.randint(crop_left + 1)
        crop_eright = np.random.randint(low=crop_right, high=ts_l + 1)
        crop_offset = np.random.randint(low=-crop_eleft, high=ts_l - crop_eright + 1,
                                        size=x.size(0))
        opt.zero_grad(set_to_none=True)
        out1 = model(take_per_row(x, crop_offset + crop_eleft, crop_right - crop_eleft))
        out1 = out1[:, -crop_l:]
        out2 = model(take_per_row(x, crop_offset + crop_left, crop_eright - crop_left))
        out2 = out2[:, :crop_l]
        loss = hierarchical_contrastive_loss(out1, out2, temporal_unit=temporal_unit)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    np.random.seed(0)
    return (time_steps(max(steps, TSMIN_STEPS), step), model,
            "TS2Vec reference TSEncoder (nn.Conv1d) + hierarchical_contrastive_loss")


# ---- CLIP (port of crates/ssl-multimodal/bench/train_step_torch.py) ----
CB, CSEQ, CVOCAB, CD, CE = 64, 16, 1000, 64, 64


def clip_flops():
    return (mm(CB * 16, 3 * 8 * 8, CD) + 2 * layer_flops(CB, 17, CD, 2 * CD)
            + 2 * layer_flops(CB, CSEQ, CD, 2 * CD) + 2 * mm(CB, CD, CE) + mm(CB, CE, CB))


def sincos_2d(d, gh, gw):
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gy, gx = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64),
                         indexing="ij")
    emb = np.concatenate([one(d // 2, gy), one(d // 2, gx)], axis=1)
    emb = np.concatenate([np.zeros((1, d)), emb], axis=0)
    return torch.tensor(emb, dtype=torch.float32).unsqueeze(0)


def clip_layer(norm_first, eps):
    return nn.TransformerEncoderLayer(CD, 4, 2 * CD, dropout=0.0, activation="gelu",
                                      batch_first=True, norm_first=norm_first, layer_norm_eps=eps)


class ClipViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, CD, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, CD) * 0.02)
        self.register_buffer("pos", sincos_2d(CD, 4, 4))
        self.layers = nn.ModuleList(clip_layer(True, 1e-6) for _ in range(2))
        self.norm = nn.LayerNorm(CD, eps=1e-6)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos[:, 1:]
        x = torch.cat([(self.cls + self.pos[:, :1]).expand(x.shape[0], -1, -1), x], 1)
        for blk in self.layers:
            x = blk(x)
        return self.norm(x)[:, 0]


class ClipBert(nn.Module):
    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(CVOCAB, CD)
        self.position = nn.Embedding(32, CD)
        self.token_type = nn.Embedding(2, CD)
        self.norm = nn.LayerNorm(CD, eps=1e-12)
        self.layers = nn.ModuleList(clip_layer(False, 1e-12) for _ in range(2))

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
        self.vision, self.text = ClipViT(), ClipBert()
        self.vproj = nn.Linear(CD, CE, bias=False)
        self.tproj = nn.Linear(CD, CE, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, px, ids, mask):
        i = F.normalize(self.vproj(self.vision(px)), dim=-1)
        t = F.normalize(self.tproj(self.text(ids, mask)), dim=-1)
        logits = self.logit_scale.exp() * i @ t.T
        y = torch.arange(len(px))
        return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


def clip_train(steps):
    model = Clip()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    px = torch.rand(CB, 3, 32, 32)
    ids = torch.randint(5, CVOCAB, (CB, CSEQ))
    mask = torch.ones(CB, CSEQ)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(px, ids, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return time_steps(steps, step), model, "hand-written CLIP (nn.TransformerEncoderLayer)"


# ---- peak matmul ----
PEAK_N = 1024


def peak_matmul(reps):
    a = torch.randn(PEAK_N, PEAK_N)
    b = torch.randn(PEAK_N, PEAK_N)
    return time_steps(reps, lambda: torch.mm(a, b), autocast=False)


def report(name, times, flops, model=None, desc=None):
    med = statistics.median(times)
    o = {"side": "pytorch", "name": name, "median_ms": round(med, 3), "min_ms": round(min(times), 3),
         "steps": len(times), "flops": flops, "gflops": round(flops / (med * 1e-3) / 1e9, 2),
         "threads": torch.get_num_threads()}
    if model is not None:
        o["params"] = sum(p.numel() for p in model.parameters())
    if desc is not None:
        o["impl"] = desc
    print(json.dumps(o), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", default="")
    ap.add_argument("--threads", type=int,
                    default=int(os.environ.get("RAYON_NUM_THREADS", "0") or 0) or 2)
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    global AUTOCAST, DEVICE
    AUTOCAST = args.precision == "bf16"
    DEVICE = args.device
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: this PyTorch sees no CUDA GPU")
        torch.set_default_device("cuda")
    if args.steps < 1:
        sys.exit("--steps must be at least 1")
    only = [s for s in args.only.split(",") if s]
    bad = [s for s in only if s not in MODELS]
    if bad:
        sys.exit("unknown model(s) %s (one of %s)" % (bad, MODELS))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(json.dumps({"side": "pytorch", "name": "versions", "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "precision": args.precision,
                      "device": DEVICE,
                      "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else None}),
          flush=True)
    report("peak_matmul", peak_matmul(max(args.steps, 10)), mm(PEAK_N, PEAK_N, PEAK_N),
           desc="torch.mm")
    runs = {
        "mlm_train": (mlm_train, lambda: 3 * mlm_forward_flops()),
        "mae_train": (mae_train, lambda: 3 * mae_flops()),
        "series_train": (series_train, lambda: 3 * series_flops()),
        "clip_train": (clip_train, lambda: 3 * clip_flops()),
        "ts2vec_train": (ts2vec_train, lambda: 3 * ts2vec_flops()),
        "mlm_embed": (mlm_embed, mlm_encoder_flops),
    }
    for name in MODELS:
        if only and name not in only:
            continue
        fn, flops = runs[name]
        torch.manual_seed(0)
        times, model, desc = fn(args.steps)
        report(name, times, flops(), model, desc)


if __name__ == "__main__":
    main()
