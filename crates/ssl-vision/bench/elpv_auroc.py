"""Image-level AUROC (normal vs defective) of `ssl detect score` outputs on the ELPV test split,
for every `score*` column of every scores file given: on the whole test split and on its two
halves, `select` and `report` (a seeded split stratified by label), so that settings can be
chosen on one half and reported on the other.

    /work/.venv-torch/bin/python crates/ssl-vision/bench/elpv_auroc.py SPLIT_DIR SCORES.parquet...
"""
import sys
import numpy as np
import pyarrow.parquet as pq


def auroc(y, s):
    """Mann-Whitney U / (n1 n0), ties counted one half."""
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


split = sys.argv[1]
t = pq.read_table(f"{split}/test.parquet", columns=["path", "label"])
label = dict(zip(t.column("path").to_pylist(), t.column("label").to_pylist()))
y_all = np.array(list(label.values()))
print(f"test: {int((y_all == 0).sum())} normal, {int((y_all == 1).sum())} defective")
paths = np.array(list(label.keys()))
rng = np.random.default_rng(1)
select = set()
for c in (0, 1):
    members = np.sort(paths[y_all == c])
    rng.shuffle(members)
    select.update(members[: len(members) // 2].tolist())
for sp in sys.argv[2:]:
    s = pq.read_table(sp)
    ids = s.column("id").to_pylist()
    y = [label[i] for i in ids]
    for c in s.column_names:
        if c.startswith("score"):
            v = s.column(c).to_numpy()
            sel = np.array([i in select for i in ids])
            ya = np.array(y)
            print(f"{sp}\t{c}\tAUROC {auroc(ya, v):.4f} (select {auroc(ya[sel], v[sel]):.4f}, "
                  f"report {auroc(ya[~sel], v[~sel]):.4f})")
    flags = s.column("flag").to_numpy(zero_copy_only=False)
    y = np.array(y)
    print(f"{sp}\tflag\tTPR {flags[y == 1].mean():.3f} FPR {flags[y == 0].mean():.3f}")
