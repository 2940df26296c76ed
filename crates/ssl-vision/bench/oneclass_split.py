"""One-class anomaly-detection splits (the protocol of anomaly-detection papers: one class is
normal, the detector trains on a sample of its training images, the test set is that class's
test images plus images of the other classes as anomalies), written for `ssl detect`.

Each set gets OUT_DIR/NAME/normal_fit.parquet (image, id) and test.parquet (image, id, label:
0 normal, 1 anomaly), the layout `detect_auroc.py` and `elpv_auroc.py` read.

    bench/.venv/bin/python crates/ssl-vision/bench/oneclass_split.py fmnist TRAIN.parquet TEST.parquet OUT_DIR
    bench/.venv/bin/python crates/ssl-vision/bench/oneclass_split.py emoji EMOJI.parquet OUT_DIR

fmnist: 3 normal classes drawn by numpy default_rng(0).choice(10, 3, replace=False); per class
N_FIT training images of the class (seeded sample), test = the class's 1,000 test images plus
N_ANOMALY test images of the other nine classes (seeded sample).
emoji: the category Flags and one more drawn by default_rng(0) among the categories with at
least 150 images; per category FIT_FRACTION of its images (shuffled, seed 0) to fit, the rest
plus N_ANOMALY images of the other categories (seeded sample) to test.
"""
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

N_FIT = 1000
N_ANOMALY = 1000
EMOJI_FIT_FRACTION = 0.6
EMOJI_N_ANOMALY = 600
EMOJI_MIN_IMAGES = 150


def write(out, name, fit_table, fit_ids, test_table, test_ids, labels):
    """Writes NAME/normal_fit.parquet and NAME/test.parquet (small row groups for the loader)."""
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    fit = fit_table.select(["image"]).append_column("id", pa.array(fit_ids))
    test = test_table.select(["image"]).append_column("id", pa.array(test_ids))
    test = test.append_column("label", pa.array(np.asarray(labels, np.int64)))
    pq.write_table(fit, f"{d}/normal_fit.parquet", row_group_size=256)
    pq.write_table(test, f"{d}/test.parquet", row_group_size=256)
    n_norm = int((np.asarray(labels) == 0).sum())
    print(f"{name}: fit {fit.num_rows} normal; test {n_norm} normal + {test.num_rows - n_norm} anomalous")


def fmnist(train_path, test_path, out):
    train, test = pq.read_table(train_path), pq.read_table(test_path)
    ytr = train.column("label").to_numpy()
    yte = test.column("label").to_numpy()
    classes = np.random.default_rng(0).choice(10, 3, replace=False)
    for c in classes:
        rng = np.random.default_rng(1000 + int(c))
        fit = np.sort(rng.choice(np.flatnonzero(ytr == c), N_FIT, replace=False))
        normal = np.flatnonzero(yte == c)
        anomal = np.sort(rng.choice(np.flatnonzero(yte != c), N_ANOMALY, replace=False))
        idx = np.concatenate([normal, anomal])
        write(out, f"fmnist_{c}", train.take(pa.array(fit)), [f"train:{i}" for i in fit],
              test.take(pa.array(idx)), [f"test:{i}" for i in idx],
              np.concatenate([np.zeros(len(normal)), np.ones(len(anomal))]))


def emoji(path, out):
    t = pq.read_table(path)
    cat = np.array(t.column("category").to_pylist())
    names, counts = np.unique(cat, return_counts=True)
    pool = sorted(n for n, k in zip(names, counts) if k >= EMOJI_MIN_IMAGES and n != "Flags")
    other = str(np.random.default_rng(0).choice(pool))
    for name in ["Flags", other]:
        rng = np.random.default_rng(0)
        members = np.flatnonzero(cat == name)
        rng.shuffle(members)
        n_fit = int(EMOJI_FIT_FRACTION * len(members))
        fit, normal = np.sort(members[:n_fit]), np.sort(members[n_fit:])
        anomal = np.sort(rng.choice(np.flatnonzero(cat != name), EMOJI_N_ANOMALY, replace=False))
        idx = np.concatenate([normal, anomal])
        slug = name.split(" ")[0].lower()
        write(out, f"emoji_{slug}", t.take(pa.array(fit)), [f"emoji:{i}" for i in fit],
              t.take(pa.array(idx)), [f"emoji:{i}" for i in idx],
              np.concatenate([np.zeros(len(normal)), np.ones(len(anomal))]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["fmnist"] and len(sys.argv) == 5:
        fmnist(*sys.argv[2:])
    elif sys.argv[1:2] == ["emoji"] and len(sys.argv) == 4:
        emoji(*sys.argv[2:])
    else:
        sys.exit(__doc__)
