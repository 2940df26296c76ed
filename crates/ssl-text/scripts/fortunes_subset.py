"""Writes the fortunes probe subset used in the ssl-text README: a seeded shuffle of
fortunes.parquet, the first N rows, classes with at least MIN rows kept.

    python fortunes_subset.py ../shared/data/text/fortunes.parquet fortunes_4k.parquet [N=4000] [MIN=10] [SEED=0]

Needs pyarrow. Deterministic: Python's random.Random(SEED).shuffle over the row indices.
"""
import collections
import random
import sys

import pyarrow.parquet as pq


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 4000
    min_rows = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    table = pq.read_table(src, columns=["text", "label"])
    order = list(range(table.num_rows))
    random.Random(seed).shuffle(order)
    first = table.take(order[:n])
    counts = collections.Counter(first.column("label").to_pylist())
    keep = [i for i, lab in enumerate(first.column("label").to_pylist()) if counts[lab] >= min_rows]
    out = first.take(keep)
    pq.write_table(out, dst)
    kept = sorted({lab for lab in out.column("label").to_pylist()})
    print(f"{dst}: {out.num_rows} rows, {len(kept)} classes (of {len(counts)} in the first {n})")


if __name__ == "__main__":
    main()
