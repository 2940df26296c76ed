#!/usr/bin/env bash
# Needs target/release/ssl built with --features mpi (see the README).
# Step time and all-reduce share, 1 vs 2 ranks, on this 2-core machine.
cd "$(dirname "$0")/../../.."
mkdir -p /tmp/dp
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPI="mpirun -np 2 --oversubscribe --mca btl self,vader --mca btl_vader_single_copy_mechanism none -x RAYON_NUM_THREADS=1"
S="--set train.max_steps=60 --set train.log_every=0 --set train.health_every=0 --set train.checkpoint_every_steps=0"
for m in text vision; do
  EXTRA=""; [ $m = vision ] && EXTRA="--set task.preview_every=0"
  rm -rf /tmp/dp/$m-*
  RAYON_NUM_THREADS=2 target/release/ssl pretrain $m --out /tmp/dp/$m-1r2t $S $EXTRA > /dev/null 2>&1
  RAYON_NUM_THREADS=1 target/release/ssl pretrain $m --out /tmp/dp/$m-1r1t $S $EXTRA > /dev/null 2>&1
  $MPI target/release/ssl pretrain $m --out /tmp/dp/$m-2r1t $S $EXTRA > /dev/null 2>&1
done
python3 - <<'PY'
import json, statistics as st
for m in ["text", "vision"]:
    for run, ranks in [("1r2t", 1), ("1r1t", 1), ("2r1t", 2)]:
        rows = [json.loads(l) for l in open(f"/tmp/dp/{m}-{run}/metrics.jsonl") if '"step_time_s"' in l]
        rows = [r for r in rows if r["step"] > 5]
        t = st.median(r["step_time_s"] for r in rows)
        a = st.median(r.get("allreduce_s", 0.0) for r in rows)
        cfg = open(f"/tmp/dp/{m}-{run}/config.toml").read()
        bs = int([l for l in cfg.splitlines() if l.startswith("batch_size")][0].split("=")[1])
        print(f"{m}\t{run}\tstep {1e3*t:.1f} ms\tallreduce {1e3*a:.2f} ms ({100*a/t:.1f}%)\t{ranks*bs/t:.0f} samples/s (global batch {ranks*bs})")
PY
