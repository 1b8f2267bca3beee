//! Data-parallel training under `mpirun` on the CPU (feature `distributed`; needs Open MPI's
//! `mpirun`): two ranks train the same weights as one process with the whole batch, stop and
//! resume (also with another number of ranks), evaluate sharded with the single-process report,
//! and end — without hanging — when a rank dies, diverges alone or is given a batch the ranks
//! cannot share.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use retinanet_integration_tests::{tiny_detector_toml, tiny_pretrain_toml};
use retinanet_train::load_checkpoint;

const RUNNER: &str = env!("CARGO_BIN_EXE_rank-runner");

/// `mpirun -n <n> rank-runner <args>` (or the runner alone for `n = 0`: one process without
/// MPI), killed and failed after `limit`.
fn launch(n: usize, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = if n == 0 {
        Command::new(RUNNER)
    } else {
        let mut c = Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            &n.to_string(),
        ])
        .arg(RUNNER);
        c
    };
    c.args(args)
        // One thread per rank keeps two ranks on two cores; containers often forbid the
        // cross-process memory copies Open MPI tries first.
        .env("RAYON_NUM_THREADS", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn wait_limited(mut child: std::process::Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}: stderr {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(n: usize, args: &[&str]) -> Output {
    let out = wait_limited(
        launch(n, args, &[]).spawn().unwrap(),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "{n} ranks, {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The tiny test config with `sync_bn`, `freeze_bn` and the global batch set.
fn config(dir: &Path, name: &str, sync_bn: bool, freeze_bn: bool, batch: usize) -> PathBuf {
    let cache = dir.join("cache");
    let text = tiny_detector_toml(&cache, name, "cpu", "", 2, "[0.25]")
        .replace(
            "time_limit_minutes = 0.0\n",
            &format!("time_limit_minutes = 0.0\nsync_bn = {sync_bn}\n"),
        )
        .replace("freeze_bn = false", &format!("freeze_bn = {freeze_bn}"))
        .replace("batch_size = 4", &format!("batch_size = {batch}"));
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn train(n: usize, dir: &Path, cfg: &Path, extra: &[&str]) -> Output {
    let runs = dir.join("runs");
    let mut args = vec![
        "train-detector",
        "-q",
        "--config",
        cfg.to_str().unwrap(),
        "--runs-dir",
        runs.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(n, &args)
}

/// The largest difference between two checkpoints' tensors, relative to each tensor's largest
/// value, and the tensor it is in.
fn worst_difference(a: &Path, b: &Path) -> (f64, String) {
    let a = load_checkpoint(a, &Device::Cpu).unwrap();
    let b = load_checkpoint(b, &Device::Cpu).unwrap();
    let mut names: Vec<_> = a.tensors.keys().cloned().collect();
    names.sort();
    let mut bnames: Vec<_> = b.tensors.keys().cloned().collect();
    bnames.sort();
    assert_eq!(names, bnames, "the checkpoints hold different tensors");
    assert_eq!(
        (a.meta.step, a.meta.epoch, a.meta.batch_in_epoch),
        (b.meta.step, b.meta.epoch, b.meta.batch_in_epoch)
    );
    let mut worst = (0.0, String::new());
    for k in names {
        let va: Vec<f32> = a.tensors[&k].flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b.tensors[&k].flatten_all().unwrap().to_vec1().unwrap();
        let scale = vb.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-3);
        let d = va
            .iter()
            .zip(&vb)
            .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
        if d / scale > worst.0 {
            worst = (d / scale, k);
        }
    }
    worst
}

fn ck(dir: &Path, name: &str) -> PathBuf {
    dir.join("runs").join(name).join("checkpoint.safetensors")
}

fn losses(dir: &Path, name: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("runs").join(name).join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Float tolerance of two ranks against one process after 12 steps: the gradients are summed in
/// another order, nothing else differs.
const TOL: f64 = 2e-4;

#[test]
fn two_ranks_with_sync_bn_train_the_weights_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let one = config(d, "one", true, false, 4);
    let two = config(d, "two", true, false, 4);
    train(0, d, &one, &[]);
    train(2, d, &two, &[]);
    let worst = worst_difference(&ck(d, "two"), &ck(d, "one"));
    eprintln!("sync_bn, 2 ranks vs 1 process: {worst:?}");
    assert!(worst.0 < TOL, "{worst:?}");
    let (l1, l2) = (losses(d, "one"), losses(d, "two"));
    assert_eq!(l1.len(), 12);
    assert_eq!(l2.len(), 12, "rank 0 logs each step once");
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{l1:?}\n{l2:?}");
    }

    // Without SyncBatchNorm each rank normalises its own half batch: not the same model.
    let own = config(d, "own", false, false, 4);
    train(2, d, &own, &[]);
    let w = worst_difference(&ck(d, "own"), &ck(d, "one"));
    assert!(
        w.0 > 100.0 * TOL,
        "per-rank statistics should differ: {w:?}"
    );
}

#[test]
fn two_ranks_with_frozen_batch_norm_train_the_weights_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let one = config(d, "one", false, true, 4);
    let two = config(d, "two", false, true, 4);
    train(0, d, &one, &[]);
    train(2, d, &two, &[]);
    let worst = worst_difference(&ck(d, "two"), &ck(d, "one"));
    eprintln!("freeze_bn, 2 ranks vs 1 process: {worst:?}");
    assert!(worst.0 < TOL, "{worst:?}");
}

#[test]
fn a_stopped_two_rank_run_resumes_with_two_ranks_or_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let full = config(d, "full", true, false, 4);
    train(2, d, &full, &[]);

    // Stopped mid-epoch, resumed with the same two ranks: the same weights, bit for bit.
    let same = config(d, "same", true, false, 4);
    train(2, d, &same, &["--max-steps", "5"]);
    let stopped = load_checkpoint(&ck(d, "same"), &Device::Cpu).unwrap();
    assert_eq!(
        (
            stopped.meta.step,
            stopped.meta.epoch,
            stopped.meta.batch_in_epoch
        ),
        (5, 0, 5)
    );
    train(2, d, &same, &["--resume"]);
    assert_eq!(worst_difference(&ck(d, "same"), &ck(d, "full")).0, 0.0);
    assert_eq!(losses(d, "same"), losses(d, "full"));

    // The same two-rank checkpoint resumed by one process: the global position and batch mean
    // the same thing, so it ends where the two-rank run ends.
    let other = config(d, "other", true, false, 4);
    train(2, d, &other, &["--max-steps", "5"]);
    train(0, d, &other, &["--resume"]);
    let worst = worst_difference(&ck(d, "other"), &ck(d, "full"));
    assert!(worst.0 < TOL, "{worst:?}");
    assert_eq!(losses(d, "other").len(), 12);

    // And a one-process checkpoint resumed by three ranks would need a batch they divide.
    let three = run_failing(
        3,
        &[
            "train-detector",
            "-q",
            "--config",
            other.to_str().unwrap(),
            "--runs-dir",
            d.join("runs").to_str().unwrap(),
            "--resume",
        ],
    );
    assert!(
        three.contains("train.batch_size = 4") && three.contains("3 ranks"),
        "{three}"
    );
}

#[test]
fn sharded_evaluation_reports_exactly_what_one_process_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = config(d, "ev", false, false, 4);
    train(0, d, &cfg, &["--max-steps", "4"]);
    let mut reports = Vec::new();
    for n in [0, 2, 3] {
        let out = d.join(format!("report-{n}.json"));
        run(
            n,
            &[
                "evaluate",
                "--checkpoint",
                ck(d, "ev").to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        reports.push(std::fs::read_to_string(&out).unwrap());
    }
    assert!(reports[0].contains("\"n_images\":6") || reports[0].contains("\"n_images\": 6"));
    assert_eq!(reports[0], reports[1], "2 ranks");
    assert_eq!(
        reports[0], reports[2],
        "3 ranks (uneven shares of 6 images... 2 each)"
    );
}

#[test]
fn pretraining_on_two_ranks_follows_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text = |name: &str| tiny_pretrain_toml(&d.join("cache"), name, 2, 1, "[]", true);
    let runs = d.join("runs");
    for (n, name) in [(0, "p1"), (2, "p2")] {
        let p = d.join(format!("{name}.toml"));
        std::fs::write(&p, text(name)).unwrap();
        run(
            n,
            &[
                "pretrain",
                "-q",
                "--config",
                p.to_str().unwrap(),
                "--runs-dir",
                runs.to_str().unwrap(),
            ],
        );
    }
    // Compared after two steps: this tiny classifier (width 8 at 32 px, BatchNorm over a few
    // values per channel at the last stage) amplifies rounding about tenfold per step.
    let worst = worst_difference(&ck(d, "p2"), &ck(d, "p1"));
    eprintln!("pretraining, 2 ranks vs 1 process: {worst:?}");
    assert!(worst.0 < TOL, "{worst:?}");
    // The evaluation batch's accuracy is summed over the ranks' shares of it.
    let acc = |name: &str| -> Vec<f64> {
        std::fs::read_to_string(runs.join(name).join("train.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["eval_acc"].as_f64()
            })
            .collect()
    };
    assert_eq!(acc("p1").len(), 2);
    assert_eq!(losses(d, "p1").len(), 2);
    assert_eq!(acc("p1"), acc("p2"));
}

fn run_failing(n: usize, args: &[&str]) -> String {
    let out = wait_limited(
        launch(n, args, &[]).spawn().unwrap(),
        Duration::from_secs(120),
    );
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_batch_the_ranks_cannot_share_is_refused_once_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = config(d, "odd", false, false, 5);
    let e = run_failing(
        2,
        &[
            "train-detector",
            "-q",
            "--config",
            cfg.to_str().unwrap(),
            "--runs-dir",
            d.join("runs").to_str().unwrap(),
        ],
    );
    assert!(
        e.contains("train.batch_size = 5") && e.contains("2 ranks"),
        "{e}"
    );
    assert_eq!(
        e.matches("train.batch_size = 5").count(),
        1,
        "printed once: {e}"
    );
    assert!(
        !e.contains("MPI_ABORT"),
        "an agreed error ends the ranks normally: {e}"
    );
    assert!(
        !d.join("runs/odd").exists(),
        "no run folder for a refused start"
    );
}

#[test]
fn a_nan_on_one_rank_stops_every_rank_as_one_process_stops() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let e = run_failing(
        2,
        &[
            "nan-on-rank",
            "--rank",
            "1",
            "--step",
            "3",
            "--runs-dir",
            runs.to_str().unwrap(),
        ],
    );
    assert_eq!(e.matches("the loss became NaN at step 3").count(), 1, "{e}");
    assert!(
        e.contains("the last good checkpoint is") && e.contains("(step 2)"),
        "{e}"
    );
    assert!(!e.contains("MPI_ABORT"), "{e}");
    let back = load_checkpoint(&runs.join("nan/checkpoint.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(back.meta.step, 2);
}

#[test]
fn a_killed_rank_ends_the_job_without_a_hang_and_the_checkpoint_survives() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = config(d, "kill", false, false, 4);
    let long = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("epochs = 2", "epochs = 1000")
        .replace("checkpoint_every = 4", "checkpoint_every = 2");
    std::fs::write(&cfg, long).unwrap();
    let runs = d.join("runs");
    let pids = d.join("pids");
    std::fs::create_dir_all(&pids).unwrap();
    let args = [
        "train-detector",
        "-q",
        "--config",
        cfg.to_str().unwrap(),
        "--runs-dir",
        runs.to_str().unwrap(),
    ];
    let child = launch(2, &args, &[("RANK_RUNNER_PID_DIR", pids.to_str().unwrap())])
        .spawn()
        .unwrap();
    // Wait until the run has written a checkpoint (deferred to the step after step 2).
    let t0 = Instant::now();
    let ckp = runs.join("kill/checkpoint.safetensors");
    while !(ckp.exists() && pids.join("rank-1.pid").exists()) {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = std::fs::read_to_string(pids.join("rank-1.pid")).unwrap();
    let killed = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap()
            .success()
    );
    let out = wait_limited(child, Duration::from_secs(90));
    let waited = killed.elapsed();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("rank 1"), "the message names the rank: {e}");
    assert!(waited < Duration::from_secs(60), "{waited:?}");
    let back = load_checkpoint(&ckp, &Device::Cpu).unwrap();
    assert!(back.meta.step >= 2);
}

#[test]
fn sigusr1_to_mpirun_stops_every_rank_at_one_step_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = config(d, "usr1", true, false, 4);
    let long = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("epochs = 2", "epochs = 1000");
    std::fs::write(&cfg, long).unwrap();
    let runs = d.join("runs");
    let args = [
        "train-detector",
        "-q",
        "--config",
        cfg.to_str().unwrap(),
        "--runs-dir",
        runs.to_str().unwrap(),
    ];
    let child = launch(2, &args, &[]).spawn().unwrap();
    let log = runs.join("usr1/train.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |l| l.lines().count()) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the run did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // mpirun forwards SIGUSR1 to every rank; the ranks agree on the step to stop at.
    assert!(
        Command::new("kill")
            .args(["-USR1", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let out = wait_limited(child, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "a graceful stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps = std::fs::read_to_string(&log).unwrap().lines().count();
    let ck = load_checkpoint(&ck(d, "usr1"), &Device::Cpu).unwrap();
    assert_eq!(
        ck.meta.step, steps,
        "the checkpoint is of the step the run stopped at"
    );
    assert!(steps < 6000);
}
