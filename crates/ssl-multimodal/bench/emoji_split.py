"""Split the Noto emoji pairs into a training and a test Parquet (numpy seed 0, 20% test), so
that every run compared in the README (CLIP, SigLIP, filtered, LiT with an MAE pretrained on
the training images only) trains on the same pairs and is scored on the same held-out ones.

    /path/to/python crates/ssl-multimodal/bench/emoji_split.py EMOJI.parquet OUT_DIR
"""
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TEST_FRACTION = 0.2
src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
t = pq.read_table(src)
order = np.random.default_rng(0).permutation(t.num_rows)
k = int(round(TEST_FRACTION * t.num_rows))
test, train = np.sort(order[:k]), np.sort(order[k:])
pq.write_table(t.take(pa.array(train)), f"{out}/train.parquet")
pq.write_table(t.take(pa.array(test)), f"{out}/test.parquet")
print(f"{t.num_rows} pairs: train {len(train)}, test {len(test)}; columns {t.column_names}")
