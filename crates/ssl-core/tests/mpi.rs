//! Data parallelism over real MPI (feature `mpi`; needs `mpirun`, Debian `openmpi-bin`).
//!
//! `cargo test -p ssl-core --features mpi --test mpi` runs this file as a plain program
//! (`harness = false`): it starts itself under `mpirun -np 2` (shared-memory transport, one
//! compute thread per rank), each rank trains on its half of every combined batch and writes its
//! final parameters, and the launcher checks that the ranks agree bit for bit and match one
//! process trained on the combined batches.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use ssl_core::{Collective, LoopTrainer, MpiCollective, Trainer};

const DIR_VAR: &str = "SSL_MPI_TEST_DIR";

fn rank_file(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank{rank}.json"))
}

fn as_rank(dir: &Path) {
    let c = MpiCollective::init().expect("MPI init");
    let (rank, world) = (c.rank(), c.world_size());
    let (ex, _) = waves(64, 11);
    // Rank 1 starts from other weights: the broadcast from rank 0 must fix that.
    let task = regression(rank as u64 * 100);
    LoopTrainer::new(train_cfg(), None)
        .expect("trainer")
        .collective(Box::new(c))
        .fit(
            &task,
            &mut source(shard(&ex, rank, world), BATCH, false),
            None,
        )
        .expect("fit");
    let bits = param_bits(&task.store);
    std::fs::write(
        rank_file(dir, rank),
        serde_json::to_string(&bits).expect("json"),
    )
    .expect("write");
}

fn launcher() -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "--mca", "btl", "self,vader"])
        .args(["--mca", "btl_vader_single_copy_mechanism", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env(DIR_VAR, dir.path())
        .arg(&exe)
        .output()
        .map_err(|e| format!("could not start mpirun (install openmpi-bin): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mpirun failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let read = |r| -> Result<Vec<(String, Vec<u32>)>, String> {
        let p = rank_file(dir.path(), r);
        let t = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        serde_json::from_str(&t).map_err(|e| e.to_string())
    };
    let (r0, r1) = (read(0)?, read(1)?);
    if r0 != r1 {
        return Err("the two MPI ranks ended with different parameters".into());
    }
    let (ex, _) = waves(64, 11);
    let diff = max_rel_diff(&floats(&r0), &floats(&one_process(&ex)));
    println!(
        "mpi: 2 ranks bit-identical; vs one process on the combined batch: {diff:.3e} (relative)"
    );
    if diff >= 1e-6 {
        return Err(format!("2 MPI ranks differ from one process by {diff}"));
    }
    Ok(())
}

fn main() {
    if let Some(dir) = std::env::var_os(DIR_VAR) {
        as_rank(Path::new(&dir));
        return;
    }
    if let Err(e) = launcher() {
        eprintln!("mpi test FAILED: {e}");
        std::process::exit(1);
    }
    println!("test result: ok. 1 passed (mpi)");
}
