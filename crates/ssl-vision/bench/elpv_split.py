"""Split ELPV (CC BY-NC-SA: never commit it or anything derived from it) for defect detection.

Normal cells (defect_prob = 0) are shuffled (seed 0); FIT_FRACTION of them go to
normal_fit.parquet (MAE pretraining and `ssl detect fit`, which holds out its own calibration
split); the rest plus every defective cell (defect_prob >= 2/3) go to test.parquet with a
`label` column (0 normal, 1 defect). Cells with defect_prob = 1/3 are left out, as the issue says.

    /work/.venv-torch/bin/python crates/ssl-vision/bench/elpv_split.py ELPV.parquet OUT_DIR
"""
import sys, os
import numpy as np
import pyarrow as pa, pyarrow.parquet as pq

FIT_FRACTION = 0.6
src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
t = pq.read_table(src)
p = t.column("defect_prob").to_numpy()
normal = np.flatnonzero(p == 0)
defect = np.flatnonzero(p >= 2 / 3 - 1e-9)
rng = np.random.default_rng(0)
rng.shuffle(normal)
n_fit = int(FIT_FRACTION * len(normal))
fit, test_normal = np.sort(normal[:n_fit]), normal[n_fit:]
pq.write_table(t.take(pa.array(fit)).select(["image", "path"]), f"{out}/normal_fit.parquet")
test_idx = np.concatenate([test_normal, defect])
test = t.take(pa.array(test_idx)).select(["image", "path"])
labels = np.concatenate([np.zeros(len(test_normal), np.int64), np.ones(len(defect), np.int64)])
test = test.append_column("label", pa.array(labels))
pq.write_table(test, f"{out}/test.parquet")
print(f"fit {len(fit)} normal; test {len(test_normal)} normal + {len(defect)} defective")
