"""Reference timings for the ssl-data benchmark: the same column reads with pyarrow.

Run by `cargo bench -p ssl-data` (not meant to be run alone). Reads a JSON list of cases
`[{"name", "paths", "columns"}]` from argv[1] and prints `{"name": rows_per_second}` as JSON.
"""
import json
import sys
import time

try:
    import pyarrow.parquet as pq
except ImportError:
    print(json.dumps({"error": "pyarrow missing"}))
    sys.exit(0)


def best_of(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        rows = fn()
        best = min(best, time.perf_counter() - t)
    return rows, best


def main():
    cases = json.loads(sys.argv[1])
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    out = {"pyarrow_version": __import__("pyarrow").__version__}
    for case in cases:
        def read():
            return sum(pq.read_table(p, columns=case["columns"]).num_rows for p in case["paths"])

        rows, secs = best_of(read, repeats)
        out[case["name"]] = rows / secs
    print(json.dumps(out))


main()
