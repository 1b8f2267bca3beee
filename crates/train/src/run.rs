//! Run folders (`runs/<name>/`), metric logs (JSON lines) and the interrupt flag.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use serde_json::Value;

/// How a pipeline is run (as opposed to what it trains: the config).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Folder holding run folders (default `runs`).
    pub runs_dir: PathBuf,
    /// Continue from the run folder's checkpoint.
    pub resume: bool,
    /// No progress output (tests).
    pub quiet: bool,
    /// Stop after this many optimizer steps in total (with a checkpoint), e.g. to split a run.
    pub max_steps: Option<usize>,
    /// Set (e.g. by Ctrl-C) to stop at the next step with a checkpoint.
    pub stop: Arc<AtomicBool>,
    /// The ranks of a data-parallel run ([`crate::dist::Local`] for one process).
    pub comm: Arc<dyn crate::dist::Communicator>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            runs_dir: "runs".into(),
            resume: false,
            quiet: false,
            max_steps: None,
            stop: Arc::new(AtomicBool::new(false)),
            comm: Arc::new(crate::dist::Local),
        }
    }
}

impl RunOptions {
    /// Whether a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Installs the handlers that set the stop flag: Ctrl-C (a second one exits at once), and on
    /// Unix `SIGTERM` and `SIGUSR1` — what `kill`, batch schedulers (`scancel --signal=USR1`,
    /// SLURM's `--signal`) and `mpirun` (which forwards `SIGUSR1` to every rank) send. The run
    /// then stops at the next step with a checkpoint; with several ranks, all at the same step.
    pub fn install_ctrlc(&self) -> Result<()> {
        let flag = self.stop.clone();
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: writing a checkpoint and stopping (Ctrl-C again to abort)");
        })
        .context("cannot install the Ctrl-C handler")?;
        #[cfg(unix)]
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
            signal_hook::flag::register(sig, self.stop.clone())
                .with_context(|| format!("cannot install the handler of signal {sig}"))?;
        }
        Ok(())
    }
}

/// The files of one run.
#[derive(Clone, Debug)]
pub struct RunDir {
    /// `runs/<name>`.
    pub root: PathBuf,
}

impl RunDir {
    /// The folder of run `name` under `runs_dir` (created).
    pub fn create(runs_dir: &Path, name: &str) -> Result<Self> {
        let run = Self::at(runs_dir, name)?;
        std::fs::create_dir_all(&run.root)
            .with_context(|| format!("cannot create run folder {}", run.root.display()))?;
        Ok(run)
    }

    /// The folder of run `name` under `runs_dir`, not created.
    pub fn at(runs_dir: &Path, name: &str) -> Result<Self> {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') || name == ".." {
            anyhow::bail!("run name `{name}` must be a plain folder name");
        }
        Ok(Self {
            root: runs_dir.join(name),
        })
    }

    /// Removes the temporary files that interrupted checkpoint writes left
    /// (`.<file>.tmp-<pid>`), unless the process that wrote one is still alive.
    pub fn remove_stale_temporaries(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((_, pid)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")) else {
                continue;
            };
            let alive = pid.parse::<u32>().is_ok_and(|p| {
                p == std::process::id() || Path::new(&format!("/proc/{p}")).exists()
            });
            if !alive {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    /// The checkpoint.
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint.safetensors")
    }
    /// The config used.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// Per-step training log.
    pub fn train_log(&self) -> PathBuf {
        self.root.join("train.jsonl")
    }
    /// Per-evaluation log.
    pub fn eval_log(&self) -> PathBuf {
        self.root.join("eval.jsonl")
    }
    /// A file in the run folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    /// Marks this run as the latest of `runs_dir` (what `inspect` and `evaluate` pick by default).
    pub fn mark_latest(&self, runs_dir: &Path, kind: &str) -> Result<()> {
        let name = self
            .root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let p = runs_dir.join(format!("LATEST-{kind}"));
        std::fs::write(&p, format!("{name}\n"))
            .with_context(|| format!("cannot write {}", p.display()))
    }
}

/// The run folder marked latest for `kind` (`detector` or `extractor`).
pub fn latest_run(runs_dir: &Path, kind: &str) -> Result<RunDir> {
    let p = runs_dir.join(format!("LATEST-{kind}"));
    let name = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "no {kind} run found ({} is missing): train one first, or pass --checkpoint",
            p.display()
        )
    })?;
    Ok(RunDir {
        root: runs_dir.join(name.trim()),
    })
}

/// Appends JSON records, one per line.
pub struct JsonLog {
    file: File,
    path: PathBuf,
}

impl JsonLog {
    /// Opens `path` for appending; with `keep_until_step`, records of later steps (written after
    /// the checkpoint a run resumes from) are dropped first.
    pub fn open(path: &Path, keep_until_step: Option<usize>) -> Result<Self> {
        if let Some(step) = keep_until_step {
            if path.exists() {
                let f = File::open(path)
                    .with_context(|| format!("cannot read the run's log {}", path.display()))?;
                let kept: Vec<String> = BufReader::new(f)
                    .lines()
                    .map_while(|l| l.ok())
                    .filter(|l| {
                        serde_json::from_str::<Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(Value::as_u64))
                            .is_some_and(|s| s as usize <= step)
                    })
                    .collect();
                let mut text = kept.join("\n");
                if !text.is_empty() {
                    text.push('\n');
                }
                std::fs::write(path, text).with_context(|| {
                    format!(
                        "cannot rewrite the run's log {} for the resume",
                        path.display()
                    )
                })?;
            }
        } else {
            std::fs::write(path, "").with_context(|| format!("cannot write {}", path.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Writes one record.
    pub fn write(&mut self, v: &Value) -> Result<()> {
        writeln!(self.file, "{v}")
            .with_context(|| format!("cannot append to {}", self.path.display()))
    }
}

/// Reads `(x, y)` pairs of two fields from a JSON-lines log (missing file: none).
pub fn read_series(path: &Path, x: &str, y: &str) -> Vec<(f64, f64)> {
    let Ok(f) = File::open(path) else {
        return Vec::new();
    };
    BufReader::new(f)
        .lines()
        .map_while(|l| l.ok())
        .filter_map(|l| {
            let v: Value = serde_json::from_str(&l).ok()?;
            Some((v.get(x)?.as_f64()?, v.get(y)?.as_f64()?))
        })
        .collect()
}

/// Draws `loss.png` of a run from its `train.jsonl`: the loss of every step and its
/// exponential smoothing (nothing when the log is empty).
pub fn plot_loss(run: &RunDir, title: &str) -> Result<()> {
    use crate::plot::{Series, plot_lines, smooth};
    let loss = read_series(&run.train_log(), "step", "loss");
    if loss.is_empty() {
        return Ok(());
    }
    let sm = smooth(&loss, 0.05);
    plot_lines(
        &run.file("loss.png"),
        title,
        "step",
        &[
            Series {
                name: "loss",
                points: &loss,
            },
            Series {
                name: "smoothed",
                points: &sm,
            },
        ],
        None,
    )
}
