"""Image-level AUROC of `ssl detect score` outputs on the ELPV test split, per score column,
plus a raw-pixel baseline: each test cell's distance to its nearest fit cell in pixel space
(images resized to SIZE x SIZE, scaled to [0, 1]) and the same with PatchCore-style raw
pixel patches (P x P patches, 3x3 neighbourhood mean, nearest fit patch, image score = max).

    /work/.venv-torch/bin/python crates/ssl-vision/bench/elpv_auroc.py SPLIT_DIR SIZE P SCORES.parquet...
"""
import io, sys
import numpy as np
import pyarrow.parquet as pq
from PIL import Image
import torch


def auroc(y, s):
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s)); ranks[order] = np.arange(1, len(s) + 1)
    # average ranks for ties
    for v in np.unique(s):
        m = s == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    pos = y == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return (ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def load(path, size):
    t = pq.read_table(path)
    imgs = [np.asarray(Image.open(io.BytesIO(b)).convert("L").resize((size, size), Image.BILINEAR), np.float32) / 255
            for b in t.column("image").to_pylist()]
    return np.stack(imgs), t


split, size, P = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fit, _ = load(f"{split}/normal_fit.parquet", size)
test, tt = load(f"{split}/test.parquet", size)
y = tt.column("label").to_numpy()
paths = tt.column("path").to_pylist()
res = {}
f = torch.from_numpy(fit.reshape(len(fit), -1)); q = torch.from_numpy(test.reshape(len(test), -1))
res["raw_pixels_image_knn"] = auroc(y, torch.cdist(q, f).min(1).values.numpy())


def patches(x):
    t = torch.from_numpy(x)[:, None]
    g = size // P
    p = t.reshape(len(x), 1, g, P, g, P).permute(0, 2, 4, 1, 3, 5).reshape(len(x), g, g, P * P)
    p = torch.nn.functional.avg_pool2d(p.permute(0, 3, 1, 2), 3, 1, 1, count_include_pad=False).permute(0, 2, 3, 1)
    return p.reshape(len(x), g * g, P * P)


fp = patches(fit).reshape(-1, P * P)
qp = patches(test)
scores = []
for i in range(len(test)):
    scores.append(torch.cdist(qp[i], fp).min(1).values.max().item())
res["raw_pixels_patch_knn"] = auroc(y, scores)
for sp in sys.argv[4:]:
    s = pq.read_table(sp)
    by_id = {}
    cols = [c for c in s.column_names if c.startswith("score")]
    for row in s.to_pylist():
        by_id[row["id"]] = row
    for c in cols:
        res[f"{sp}:{c}"] = auroc(y, [by_id[p][c] for p in paths])
print(f"n_test_normal={int((y == 0).sum())} n_test_defect={int((y == 1).sum())}")
for k, v in res.items():
    print(f"{k}\t{v:.4f}")
