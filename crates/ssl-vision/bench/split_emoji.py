"""Seeded stratified 70/30 split of an emoji Parquet file by its `category` column, with an
integer `label` (categories sorted by name) for `ssl eval vision`.

    python split_emoji.py /work/shared/data/multimodal/emoji_google.parquet OUT_DIR

writes OUT_DIR/emoji_train.parquet and OUT_DIR/emoji_test.parquet (columns image, category,
label; row groups of 256). Needs pyarrow.
"""
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq

src, out = sys.argv[1], sys.argv[2]
t = pq.read_table(src)
cats = t.column("category").to_pylist()
names = sorted(set(cats))
rng = random.Random(0)
train, test = [], []
for name in names:
    idx = [i for i, c in enumerate(cats) if c == name]
    rng.shuffle(idx)
    k = round(0.3 * len(idx))
    test += idx[:k]
    train += idx[k:]
for rows, part in [(sorted(train), "train"), (sorted(test), "test")]:
    sub = t.take(rows).select(["image", "category"])
    labels = [names.index(c) for c in sub.column("category").to_pylist()]
    sub = sub.append_column("label", pa.array(labels, pa.int64()))
    pq.write_table(sub, f"{out}/emoji_{part}.parquet", row_group_size=256)
    print(part, sub.num_rows)
print(names)
