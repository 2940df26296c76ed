"""Image-level AUROC of every defect scorer on every set, with the mean rank of each scorer.

    bench/.venv/bin/python crates/ssl-vision/bench/detect_auroc.py SPLITS RESULTS [--paired A B] [--rule-excludes SET...]

SPLITS/SET/test.parquet holds `id` (or ELPV's `path`) and `label` (0 normal, 1 anomaly), as
`oneclass_split.py` and `elpv_split.py` write them. RESULTS/SET/RUN.parquet are `ssl detect
score` outputs and RESULTS/SET/RUN.json the JSON `ssl detect fit` printed for the same detector
(its `stats`: each scorer's mean and standard deviation of normal image scores). A run whose
detector used PatchCore at layer L must be named with `_lL` at its end (e.g. `all_l2`,
`pc_l0`), so its `score_patch_core` column becomes the candidate `patch_core_lL`.

Candidates: each single scorer found, and reconstruction + patch_core_lL for each L, combined as
`ssl detect` does (mean of the scorers' z-scores against the normal statistics). Each run's own
`score` column is checked against that formula. Ranks: 1 = highest AUROC on a set, ties
averaged; the mean rank is given over all sets and over the sets not excluded by
--rule-excludes (the rule's sets); the candidate with the best rule mean rank (then the higher
mean AUROC over those sets) is printed as the rule's choice. `--paired A B` also prints, per
set, AUROC(A) - AUROC(B) with a 95% interval from a paired bootstrap (200 resamples of the test
images, numpy seed 0).
"""
import glob
import json
import os
import re
import sys

import numpy as np
import pyarrow.parquet as pq


def auroc(y, s):
    """Mann-Whitney U / (n1 n0), ties counted one half."""
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(allv))
    # Average ranks over ties.
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(allv))
    r[order] = ranks
    u = r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def rank_desc(values):
    """Ranks, 1 = largest, ties averaged."""
    v = np.asarray(values)
    return np.array([1 + (v > x).sum() + 0.5 * ((v == x).sum() - 1) for x in v])


def load_set(split_dir, res_dir):
    """{candidate: scores aligned with labels}, labels."""
    t = pq.read_table(f"{split_dir}/test.parquet")
    idcol = "id" if "id" in t.column_names else "path"
    label = dict(zip(t.column(idcol).to_pylist(), t.column("label").to_pylist()))
    cands, zs = {}, {}
    for sp in sorted(glob.glob(f"{res_dir}/*.parquet")):
        run = os.path.basename(sp)[: -len(".parquet")]
        m = re.search(r"_l(\d+)$", run)
        stats = {s["kind"]: s for s in json.load(open(f"{res_dir}/{run}.json"))["stats"]}
        s = pq.read_table(sp)
        ids = s.column("id").to_pylist()
        order = np.argsort(ids)
        ids = [ids[i] for i in order]
        y = np.array([label[i] for i in ids])
        if len(ids) != len(label):
            sys.exit(f"{sp}: {len(ids)} scores for {len(label)} test images")
        z = []
        for kind, st in stats.items():
            v = s.column(f"score_{kind}").to_numpy()[order]
            name = kind if kind != "patch_core" else f"patch_core_l{m.group(1)}"
            cands[name] = v
            zs[name] = (v - st["image_mean"]) / st["image_std"]
            z.append(zs[name])
        combined = s.column("score").to_numpy()[order]
        err = np.abs(np.mean(z, axis=0) - combined).max()
        if err > 1e-6 * max(1.0, np.abs(combined).max()):
            sys.exit(f"{sp}: combined score differs from the mean of z-scores by {err}")
    for name in sorted(zs):
        if name.startswith("patch_core_l") and "reconstruction" in zs:
            cands[f"reconstruction+{name}"] = (zs["reconstruction"] + zs[name]) / 2
    return cands, y


def main():
    args = sys.argv[1:]
    excl = []
    if "--rule-excludes" in args:
        k = args.index("--rule-excludes")
        excl, args = args[k + 1 :], args[:k]
    paired = None
    if "--paired" in args:
        k = args.index("--paired")
        paired, args = args[k + 1 : k + 3], args[:k] + args[k + 3 :]
    splits, results = args
    sets = sorted(os.path.basename(d) for d in glob.glob(f"{results}/*") if os.path.isdir(d))
    table = {}
    for name in sets:
        cands, y = load_set(f"{splits}/{name}", f"{results}/{name}")
        print(f"{name}: {int((y == 0).sum())} normal, {int((y == 1).sum())} anomalous test images")
        table[name] = {c: auroc(y, v) for c, v in cands.items()}
        if paired:
            a, b = cands[paired[0]], cands[paired[1]]
            rng, diffs = np.random.default_rng(0), []
            for _ in range(200):
                i = rng.integers(0, len(y), len(y))
                if y[i].min() != y[i].max():
                    diffs.append(auroc(y[i], a[i]) - auroc(y[i], b[i]))
            lo, hi = np.percentile(diffs, [2.5, 97.5])
            print(f"  {paired[0]} - {paired[1]}: {auroc(y, a) - auroc(y, b):+.4f} (95% {lo:+.4f} to {hi:+.4f})")
    names = sorted(set.intersection(*(set(t) for t in table.values())))
    ranks = {s: dict(zip(names, rank_desc([table[s][c] for c in names]))) for s in sets}
    rule_sets = [s for s in sets if s not in excl]
    rows = []
    for c in names:
        mr_rule = np.mean([ranks[s][c] for s in rule_sets])
        mr_all = np.mean([ranks[s][c] for s in sets])
        mean_rule = np.mean([table[s][c] for s in rule_sets])
        rows.append((mr_rule, -mean_rule, c, mr_all))
    rows.sort()
    print("| scorer | " + " | ".join(sets) + f" | mean rank ({len(rule_sets)} rule sets) | mean rank (all) |")
    print("|---|" + "---:|" * (len(sets) + 2))
    for mr_rule, neg_mean, c, mr_all in rows:
        cells = " | ".join(f"{table[s][c]:.3f}" for s in sets)
        print(f"| {c} | {cells} | {mr_rule:.2f} | {mr_all:.2f} |")
    print(f"rule (best mean rank over {', '.join(rule_sets)}): {rows[0][2]}")


if __name__ == "__main__":
    main()
