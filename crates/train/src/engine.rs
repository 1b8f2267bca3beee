//! The one training loop that `pretrain` and `train-detector` both run, in the spirit of
//! Detectron2's `TrainerBase`: the [`Trainer`] owns what every run has — the position in the
//! data, the learning-rate schedule and the run's clock, stops (Ctrl-C, `--max-steps`, the time
//! limit), the NaN stop, checkpoints, the JSON log and the progress bar, the optimizer step and
//! the ranks of a data-parallel run — and a pipeline supplies a [`Task`]: its forward pass and
//! loss (the step function) and its hooks (an evaluation batch after a step, an evaluation after
//! an epoch, the final report).
//!
//! Checkpoints that a run writes as it goes are deferred to the next step: they are written once
//! that step's forward pass has shown the weights give a finite loss, so the last good
//! checkpoint is always one a resumed run can continue from. A checkpoint the run ends with
//! (stop, time limit, last step) is written at once.
//!
//! With several ranks (see [`crate::dist`]) every rank runs this loop in step: each takes its
//! share of every global batch, one small all-reduce per step carries the losses, the NaN check,
//! the stop request and rank 0's clock (so every rank takes the same decisions), the gradients
//! are summed before the (unchanged) optimizer step, and only rank 0 writes files and shows
//! progress.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde_json::{Map, Value, json};

use crate::checkpoint::{CheckpointMeta, CheckpointWriter, load_checkpoint_bytes, resume_position};
use crate::dist::{
    self, Agreed, Communicator, agree, all_reduce_grads, broadcast_varmap, check_same_weights,
};
use crate::model::assign_from;
use crate::optim::Sgd;
use crate::progress::Progress;
use crate::run::{JsonLog, RunDir, RunOptions};
use crate::schedule::{LrSchedule, ProgressDecays, resume_clock, run_progress};

/// Where a run is: optimizer steps done, and the next batch (`batch_in_epoch` of `epoch`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// Optimizer steps done.
    pub step: usize,
    /// The epoch of the next batch.
    pub epoch: usize,
    /// Batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
}

/// How long a run lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// Whole passes over the training set (the detector).
    Epochs(usize),
    /// Optimizer steps, across epochs (pretraining, as the tutorial counts it).
    Steps(usize),
}

/// What the engine needs to know of a run, taken from its config.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The checkpoint's kind: `"detector"` or `"extractor"`.
    pub kind: &'static str,
    /// The progress bar's title.
    pub label: &'static str,
    /// How long the run lasts.
    pub budget: Budget,
    /// Global batches in an epoch.
    pub per_epoch: usize,
    /// A checkpoint every this many steps.
    pub checkpoint_every: usize,
    /// Also a checkpoint at the end of every epoch.
    pub save_at_epoch_end: bool,
    /// The run's time limit in minutes (0: none), resumes included.
    pub time_limit_minutes: f64,
    /// The learning-rate schedule.
    pub lr: LrSchedule,
    /// Global gradient-norm clip.
    pub grad_clip: Option<f64>,
    /// The run's seed, name, config (TOML) and class names, stored in every checkpoint.
    pub seed: u64,
    /// The run name (`runs/<name>`).
    pub name: String,
    /// The config as TOML.
    pub config_toml: String,
    /// Class names `1..=C`.
    pub class_names: Vec<String>,
}

impl Plan {
    /// Total optimizer steps the run is planned for.
    pub fn total_steps(&self) -> usize {
        match self.budget {
            Budget::Epochs(e) => e * self.per_epoch,
            Budget::Steps(s) => s,
        }
    }

    fn time_limit_s(&self) -> Option<f64> {
        (self.time_limit_minutes > 0.0).then_some(self.time_limit_minutes * 60.0)
    }
}

/// A step's forward pass, as the task returns it.
pub struct Forward {
    /// This rank's share of the global batch's loss: the ranks' shares sum to the loss of the
    /// whole batch (normalised by global counts), so the summed gradients are its gradient.
    pub loss: Tensor,
    /// Values summed over the ranks for the log (the same names, in the same order, on every
    /// rank): the loss's parts, counts, hits.
    pub sums: Vec<(&'static str, f64)>,
}

/// What a step's forward pass may use.
pub struct StepContext<'a> {
    /// The ranks.
    pub comm: &'a dyn Communicator,
    /// This rank's device.
    pub device: &'a Device,
    /// Steps done before this one.
    pub step: usize,
    /// The batch's epoch.
    pub epoch: usize,
    /// Images in this step's global batch (all ranks' shares).
    pub global_images: usize,
}

/// What a pipeline supplies to the engine: its data, its step function and its hooks.
pub trait Task {
    /// A batch of the loader.
    type Batch;
    /// This rank's shares of the rest of epoch `epoch`, from its batch `batch`.
    fn batches(
        &self,
        epoch: usize,
        batch: usize,
    ) -> Box<dyn Iterator<Item = retinanet_dataset::Result<Self::Batch>>>;
    /// The batch's index within its epoch.
    fn batch_index(batch: &Self::Batch) -> usize;
    /// Files this rank's loader skipped as unreadable since the last call (`(path, reason)`),
    /// each once: the engine names them in the log.
    fn new_skips(&mut self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Images in this rank's share of the batch.
    fn batch_len(batch: &Self::Batch) -> usize;
    /// The forward pass and the loss of this rank's share (the step function; the engine does
    /// the backward pass, the gradient all-reduce and the update).
    fn forward(&mut self, ctx: &StepContext, batch: Self::Batch) -> Result<Forward>;
    /// Turns the step's summed values into log fields (`loss`, `lr`, `grad_norm`, ... are the
    /// engine's).
    fn record(&self, sums: &[(&'static str, f64)], record: &mut Map<String, Value>);
    /// The progress bar's message for a step's record.
    fn progress_message(&self, record: &Map<String, Value>) -> String;
    /// After each update, before the record is logged (e.g. an evaluation batch).
    fn after_step(&mut self, _: &mut Trainer, _: &mut Map<String, Value>) -> Result<()> {
        Ok(())
    }
    /// At the end of each epoch, after its checkpoint (e.g. an evaluation).
    fn after_epoch(&mut self, _: &mut Trainer) -> Result<()> {
        Ok(())
    }
    /// When the loop has ended.
    fn after_train(&mut self, _: &mut Trainer, _: &Ending) -> Result<()> {
        Ok(())
    }
}

/// Why the loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The budget was used up.
    Finished,
    /// Ctrl-C or `--max-steps`: stopped with a checkpoint, to be resumed.
    Interrupted,
    /// The time limit.
    OutOfTime,
}

impl Ending {
    /// Ended before the budget was used up.
    pub fn stopped_early(&self) -> bool {
        *self != Ending::Finished
    }
}

/// A checkpoint waiting for the next forward pass to show its weights are good.
struct Pending {
    at: (usize, usize, usize),
    elapsed_s: f64,
    /// BatchNorm statistics at the checkpoint (the next forward pass updates them in place).
    buffers: HashMap<String, Tensor>,
}

/// The state of a running training loop; see the module documentation.
pub struct Trainer {
    /// The ranks (a world of one for a plain run).
    pub comm: Arc<dyn Communicator>,
    /// This rank's device.
    pub device: Device,
    /// The run folder (written by rank 0 only).
    pub run: RunDir,
    /// How the run was started.
    pub opts: RunOptions,
    /// The run's plan.
    pub plan: Plan,
    /// Every variable of the model (weights and BatchNorm statistics).
    pub varmap: VarMap,
    /// The optimizer over the trainable ones.
    pub opt: Sgd,
    /// Where the run is.
    pub pos: Position,
    /// The progress display (silent on ranks other than 0).
    pub progress: Progress,
    /// Seconds of the run so far by rank 0's clock, as last agreed by the ranks.
    pub elapsed_s: f64,
    t0: Instant,
    decays: ProgressDecays,
    writer: CheckpointWriter,
    log: Option<JsonLog>,
    pending: Option<Pending>,
    /// The last checkpoint known to give a finite loss, and its step.
    last_good: Option<(PathBuf, usize)>,
    /// The checkpoint this process resumed from, until its first loss is known.
    resumed_from: Option<usize>,
    /// Files skipped as unreadable in this process, on rank 0: `(path, reason)`.
    skipped: Vec<(String, String)>,
}

impl Trainer {
    /// Sets up a run: resumes the run folder's checkpoint (`opts.resume`: checked by
    /// `check_resume`, read by rank 0 and sent to every rank) or starts afresh (`fresh` loads
    /// pretrained weights on rank 0), makes every rank hold rank 0's weights (checked by a
    /// checksum), and on rank 0 creates the run folder, its `config.toml` and logs. The folder
    /// is only created once all of this has succeeded.
    pub fn start(
        opts: &RunOptions,
        plan: Plan,
        device: Device,
        varmap: VarMap,
        mut opt: Sgd,
        check_resume: impl FnOnce(&CheckpointMeta) -> Result<()>,
        fresh: impl FnOnce(&VarMap) -> Result<()>,
    ) -> Result<Self> {
        let comm = opts.comm.clone();
        let root = comm.is_root();
        let run = RunDir::at(&opts.runs_dir, &plan.name)?;
        let ck_path = run.checkpoint();
        let mut pos = Position::default();
        let mut decays = ProgressDecays::default();
        let mut t0 = Instant::now();
        let mut elapsed_s = 0.0;
        if opts.resume {
            // Rank 0 reads the file (on several machines only it may see the run folder).
            let mut bytes = Vec::new();
            let read = if root {
                std::fs::read(&ck_path)
                    .with_context(|| format!("cannot read checkpoint {}", ck_path.display()))
                    .map(|b| bytes = b)
            } else {
                Ok(())
            };
            agree(
                &*comm,
                read.with_context(|| format!("cannot resume run {}", run.root.display())),
            )?;
            comm.broadcast_bytes(&mut bytes)?;
            let loaded = (|| {
                let ck = load_checkpoint_bytes(&bytes, &ck_path, &device)?;
                if ck.meta.kind != plan.kind {
                    bail!(
                        "{} is a `{}` checkpoint, this run trains a `{}`",
                        ck_path.display(),
                        ck.meta.kind,
                        plan.kind
                    );
                }
                check_resume(&ck.meta)?;
                assign_from(&varmap, &ck.tensors, &ck_path)?;
                opt.load_state(&ck.tensors)?;
                let (d, start) = resume_clock(&ck.meta.extra, plan.time_limit_minutes)?;
                let (_, secs) = ProgressDecays::from_extra(&ck.meta.extra)?;
                Ok((ck.meta, d, start, secs))
            })()
            .with_context(|| format!("cannot resume run {}", run.root.display()));
            let (meta, d, start, secs) = agree(&*comm, loaded)?;
            pos = Position {
                step: meta.step,
                epoch: meta.epoch,
                batch_in_epoch: meta.batch_in_epoch,
            };
            (decays, t0, elapsed_s) = (d, start, secs);
            if root && !opts.quiet {
                eprintln!(
                    "resuming {} at step {} (epoch {}, batch {})",
                    run.root.display(),
                    pos.step,
                    pos.epoch,
                    pos.batch_in_epoch
                );
            }
        } else {
            let r = if root {
                if ck_path.exists() {
                    Err(anyhow::anyhow!(
                        "{} already holds a checkpoint: pass --resume to continue it, or choose another run name",
                        run.root.display()
                    ))
                } else {
                    fresh(&varmap)
                }
            } else {
                Ok(())
            };
            agree(&*comm, r)?;
            broadcast_varmap(&*comm, &varmap)?;
        }
        check_same_weights(&*comm, &varmap, &opt.state())?;

        let log = if root {
            let made = (|| {
                let run = RunDir::create(&opts.runs_dir, &plan.name)?;
                run.remove_stale_temporaries();
                std::fs::write(run.config(), &plan.config_toml)
                    .with_context(|| format!("cannot write {}", run.config().display()))?;
                run.mark_latest(&opts.runs_dir, plan.kind)?;
                JsonLog::open(&run.train_log(), opts.resume.then_some(pos.step))
            })();
            Some(agree(&*comm, made)?)
        } else {
            agree(&*comm, Ok(()))?;
            None
        };

        let mut progress =
            Progress::new(plan.label, plan.total_steps() as u64, opts.quiet || !root);
        progress.start_at(pos.step as u64);
        if let Some(limit) = plan.time_limit_s() {
            progress.set_deadline(t0 + Duration::from_secs_f64(limit));
        }
        let writer = CheckpointWriter {
            path: ck_path,
            kind: plan.kind,
            seed: plan.seed,
            config: plan.config_toml.clone(),
            class_names: plan.class_names.clone(),
        };
        Ok(Self {
            comm,
            device,
            run,
            opts: opts.clone(),
            varmap,
            opt,
            pos,
            progress,
            elapsed_s,
            t0,
            decays,
            writer,
            log,
            pending: None,
            last_good: None,
            resumed_from: opts.resume.then_some(pos.step),
            skipped: Vec::new(),
            plan,
        })
    }

    /// Seconds since the run started by this rank's clock (resumes included).
    pub fn local_elapsed_s(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Agrees on the run's clock (rank 0's) and returns it.
    pub fn sync_clock(&mut self) -> Result<f64> {
        let mut v = [if self.comm.is_root() {
            self.local_elapsed_s()
        } else {
            0.0
        }];
        self.comm.all_reduce_sum_f64(&mut v)?;
        self.elapsed_s = v[0];
        Ok(v[0])
    }

    /// Prints a line above the progress bar (rank 0 only).
    pub fn println(&self, line: &str) {
        if self.comm.is_root() {
            self.progress.println(line);
        }
    }

    fn out_of_time(&self) -> bool {
        self.plan
            .time_limit_s()
            .is_some_and(|t| self.elapsed_s >= t)
    }

    fn budget_done(&self) -> bool {
        match self.plan.budget {
            Budget::Epochs(e) => self.pos.epoch >= e,
            Budget::Steps(s) => self.pos.step >= s,
        }
    }

    fn extra(&self, elapsed_s: f64) -> Value {
        self.decays.to_extra(elapsed_s)
    }

    /// Writes a checkpoint of the current weights at `at` now.
    fn save_now(&mut self, at: (usize, usize, usize)) -> Result<()> {
        self.pending = None;
        self.save_checked(at, self.elapsed_s, HashMap::new())
    }

    /// Queues a checkpoint at `at` until the next forward pass has shown a finite loss.
    fn defer_save(&mut self, at: (usize, usize, usize)) -> Result<()> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let buffers = data
            .iter()
            .filter(|(k, _)| retinanet_extractor::is_buffer(k))
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        drop(data);
        self.pending = Some(Pending {
            at,
            elapsed_s: self.elapsed_s,
            buffers,
        });
        Ok(())
    }

    /// Writes the queued checkpoint, if any. `proven`: its weights have just given a finite
    /// loss (else the run ends before another forward pass could show it).
    fn write_pending(&mut self, proven: bool) -> Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        self.save_checked(p.at, p.elapsed_s, p.buffers)?;
        if proven {
            self.last_good = Some((self.writer.path.clone(), p.at.0));
        }
        Ok(())
    }

    /// Checks (on every rank, which hold the same weights) that the weights are finite, then
    /// rank 0 writes them with `buffers` in place of the current BatchNorm statistics.
    fn save_checked(
        &mut self,
        at: (usize, usize, usize),
        elapsed_s: f64,
        buffers: HashMap<String, Tensor>,
    ) -> Result<()> {
        let mut tensors = crate::model::varmap_tensors(&self.varmap);
        tensors.extend(buffers);
        if let Some(name) = crate::checkpoint::first_non_finite_tensor(&tensors)? {
            return Err(Agreed(format!(
                "the weights became non-finite by step {} (`{name}`): stopping; {}",
                at.0,
                self.last_good_hint()
            ))
            .into());
        }
        if self.comm.is_root() {
            tensors.extend(self.opt.state());
            self.writer
                .save_tensors(&tensors, at, self.extra(elapsed_s))?;
        }
        Ok(())
    }

    /// Where to go back to after a divergence, for error messages: only a checkpoint that
    /// exists and is known to be good is named.
    fn last_good_hint(&self) -> String {
        let advice = "lower train.lr.lr, or set train.grad_clip (e.g. 1.0)";
        match &self.last_good {
            Some((p, step)) if p.exists() => format!(
                "the last good checkpoint is {} (step {step}): resume it with --resume after you {advice}",
                p.display()
            ),
            _ => match self.resumed_from {
                Some(step) => format!(
                    "the checkpoint this run resumed from ({}, step {step}) gives a non-finite loss itself; start the run again after you {advice}",
                    self.writer.path.display()
                ),
                None => format!(
                    "no checkpoint of this run is known to be good yet (train.checkpoint_every = {}); start again after you {advice}",
                    self.plan.checkpoint_every
                ),
            },
        }
    }

    /// Runs the loop to its end; see the module documentation.
    pub fn run<T: Task>(&mut self, task: &mut T) -> Result<Ending> {
        let per_epoch = self.plan.per_epoch;
        let total_steps = self.plan.total_steps();
        let limit = self.plan.time_limit_s();
        let world = self.comm.size();
        let mut ending = Ending::Finished;
        'epochs: while !self.budget_done() {
            let steps_at_epoch_start = self.pos.step;
            let mut batches_seen = 0;
            let mut last = Instant::now();
            let mut iter = task.batches(self.pos.epoch, self.pos.batch_in_epoch);
            for batch in iter.by_ref() {
                let batch = batch?;
                batches_seen += 1;
                let index = T::batch_index(&batch);
                let n_local = T::batch_len(&batch);
                let mut global_images = n_local;
                if world > 1 {
                    // Shares of a batch may be empty when unreadable images were skipped.
                    let mut pre = [n_local as f64, (n_local == 0) as u8 as f64];
                    self.comm.all_reduce_sum_f64(&mut pre)?;
                    global_images = pre[0] as usize;
                    if global_images == 0 {
                        self.pos.batch_in_epoch = index + 1;
                        continue;
                    }
                    if pre[1] > 0.0 {
                        return Err(Agreed(format!(
                            "batch {index} of epoch {}: every image of the share of {} rank(s) was skipped as unreadable; with several ranks each share needs one readable image (remove the unreadable files)",
                            self.pos.epoch, pre[1]
                        ))
                        .into());
                    }
                }
                let step = self.pos.step;
                let done = run_progress(step, total_steps, self.elapsed_s, limit);
                self.plan.lr.advance(&mut self.decays, step, done);
                let lr = self.plan.lr.at_progress(step, &self.decays);
                let ctx = StepContext {
                    comm: &*self.comm,
                    device: &self.device,
                    step,
                    epoch: self.pos.epoch,
                    global_images,
                };
                let fwd = task.forward(&ctx, batch)?;
                let loss = fwd
                    .loss
                    .to_dtype(candle_core::DType::F32)?
                    .to_scalar::<f32>()?;

                // The step's one small all-reduce: the losses and logged sums, the stop request
                // and rank 0's clock, so that every rank decides alike.
                let root = self.comm.is_root();
                let skipped = task.new_skips();
                let mut v: Vec<f64> = Vec::with_capacity(fwd.sums.len() + 4);
                v.push(loss as f64);
                v.extend(fwd.sums.iter().map(|s| s.1));
                v.push(skipped.len() as f64);
                v.push(self.opts.stop_requested() as u8 as f64);
                v.push(if root { self.local_elapsed_s() } else { 0.0 });
                if world > 1 {
                    self.comm.all_reduce_sum_f64(&mut v)?;
                }
                // Every rank's newly skipped files, named by rank 0 (a gather only when any).
                let skipped = if world > 1 && v[v.len() - 3] > 0.0 {
                    let all = self.comm.gather_bytes(&serde_json::to_vec(&skipped)?)?;
                    let mut out = Vec::new();
                    for bytes in all {
                        out.extend(serde_json::from_slice::<Vec<(String, String)>>(&bytes)?);
                    }
                    out
                } else {
                    skipped
                };
                let total = if world > 1 { v[0] } else { loss as f64 };
                if !total.is_finite() {
                    return Err(Agreed(format!(
                        "the loss became {total} at step {step} (epoch {}, batch {index}): stopping; {}",
                        self.pos.epoch,
                        self.last_good_hint()
                    ))
                    .into());
                }
                // These weights give a finite loss: a checkpoint waiting for that may be written,
                // and the checkpoint this run resumed from is good.
                if let Some(s) = self.resumed_from.take() {
                    self.last_good = Some((self.writer.path.clone(), s));
                }
                self.write_pending(true)?;
                let stop_flag = v[v.len() - 2] > 0.0;
                let mut grads = fwd.loss.backward()?;
                all_reduce_grads(&*self.comm, &mut grads, self.opt.vars())?;
                let grad_norm = self.opt.step(&grads, lr, self.plan.grad_clip)?;
                drop(grads);
                self.elapsed_s = if world > 1 {
                    v[v.len() - 1]
                } else {
                    self.local_elapsed_s()
                };
                self.pos.step += 1;
                self.pos.batch_in_epoch = index + 1;
                let dt = last.elapsed().as_secs_f64();
                last = Instant::now();

                let sums: Vec<(&'static str, f64)> = fwd
                    .sums
                    .iter()
                    .zip(&v[1..])
                    .map(|(s, &x)| (s.0, if world > 1 { x } else { s.1 }))
                    .collect();
                let mut rec = Map::new();
                rec.insert("step".into(), json!(self.pos.step));
                rec.insert("epoch".into(), json!(self.pos.epoch));
                rec.insert("loss".into(), json!(total as f32));
                task.record(&sums, &mut rec);
                rec.insert("lr".into(), json!(lr));
                rec.insert(
                    "images_per_s".into(),
                    json!(global_images as f64 / dt.max(1e-9)),
                );
                if let Some(g) = grad_norm {
                    rec.insert("grad_norm".into(), json!(g));
                }
                if root && !skipped.is_empty() {
                    for (path, reason) in &skipped {
                        self.println(&format!("skipped {path}: {reason}"));
                    }
                    rec.insert(
                        "skipped".into(),
                        skipped
                            .iter()
                            .map(|(p, r)| json!({"path": p, "reason": r}))
                            .collect(),
                    );
                    self.skipped.extend(skipped);
                }
                rec.insert("elapsed_s".into(), json!(self.elapsed_s));
                if world > 1 {
                    rec.insert("ranks".into(), json!(world));
                }
                task.after_step(self, &mut rec)?;
                let msg = task.progress_message(&rec);
                if let Some(log) = &mut self.log {
                    log.write(&Value::Object(rec))?;
                }
                self.progress.inc(1, &msg);

                let step = self.pos.step;
                let out_of_time = self.out_of_time();
                let at_max = self.opts.max_steps.is_some_and(|m| step >= m);
                let steps_done = matches!(self.plan.budget, Budget::Steps(s) if step >= s);
                let epoch_end = self.pos.batch_in_epoch >= per_epoch;
                let at = resume_position(step, self.pos.epoch, self.pos.batch_in_epoch, per_epoch);
                if stop_flag || at_max || out_of_time || steps_done {
                    self.save_now(at)?;
                } else if step.is_multiple_of(self.plan.checkpoint_every)
                    && !(epoch_end && self.plan.save_at_epoch_end)
                {
                    // An epoch's last batch is left to the epoch-end checkpoint below.
                    self.defer_save(at)?;
                }
                if stop_flag || at_max {
                    self.println(&format!("stopped at step {step}; resume with --resume"));
                    ending = Ending::Interrupted;
                    break 'epochs;
                }
                if out_of_time {
                    self.println(&self.time_up());
                    ending = Ending::OutOfTime;
                    break 'epochs;
                }
                if steps_done {
                    break 'epochs;
                }
            }
            drop(iter);
            if batches_seen > 0 && self.pos.step == steps_at_epoch_start {
                return Err(Agreed(format!(
                    "epoch {} gave no batch to train on: every image was skipped as unreadable (see the skipped files above)",
                    self.pos.epoch
                ))
                .into());
            }
            self.pos.epoch += 1;
            self.pos.batch_in_epoch = 0;
            if self.plan.save_at_epoch_end {
                let at = (self.pos.step, self.pos.epoch, 0);
                if self.budget_done() {
                    self.save_now(at)?;
                } else {
                    self.defer_save(at)?;
                }
            }
            task.after_epoch(self)?;
            // The limit may pass during that evaluation: stop here rather than after one more
            // step and a second evaluation.
            self.sync_clock()?;
            if !self.budget_done() && self.out_of_time() {
                self.println(&self.time_up());
                ending = Ending::OutOfTime;
                break 'epochs;
            }
        }
        self.write_pending(false)?;
        self.progress.finish();
        if !self.skipped.is_empty() {
            let p = self.run.file("skipped.txt");
            let text: String = self
                .skipped
                .iter()
                .map(|(path, reason)| format!("{path}\t{reason}\n"))
                .collect();
            std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
            self.println(&format!(
                "training skipped {} unreadable file(s) in all: listed in {}",
                self.skipped.len(),
                p.display()
            ));
        }
        task.after_train(self, &ending)?;
        Ok(ending)
    }

    fn time_up(&self) -> String {
        format!(
            "time limit of {} min reached at step {}",
            self.plan.time_limit_minutes, self.pos.step
        )
    }
}

/// The device of this rank for a configured `spec`, set up for `precision` (or the refusal of
/// either): with several ranks on a machine, `cuda` means `cuda:<local rank>`.
pub fn rank_device(
    spec: &str,
    precision: crate::device::Precision,
    comm: &dyn Communicator,
) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    if comm.local_size() > 1 && s.starts_with("cuda:") {
        bail!(
            "device = `{spec}` names one GPU, but {} ranks share this machine: use device = \"cuda\" (rank r takes cuda:<local rank>)",
            comm.local_size()
        );
    }
    let device = if comm.local_size() > 1 && (s == "cuda" || s == "gpu") {
        crate::device::parse_device(&format!("cuda:{}", comm.local_rank()))?
    } else {
        crate::device::parse_device(spec)?
    };
    precision.apply(&device)?;
    Ok(device)
}

/// The SyncBatchNorm reducer for a run's settings: `Some` with `sync_bn` on several ranks.
pub fn sync_bn_reducer(
    sync_bn: bool,
    comm: &Arc<dyn Communicator>,
    device: &Device,
) -> Result<Option<Arc<dyn retinanet_kernels::SumReducer>>> {
    if !sync_bn || comm.size() == 1 {
        return Ok(None);
    }
    if !device.is_cpu() {
        bail!(
            "train.sync_bn = true runs on the CPU only in this version: set it to false for GPU ranks (each rank then normalises with its own batch, as PyTorch's DDP without SyncBatchNorm)"
        );
    }
    Ok(Some(Arc::new(dist::StatsReducer(comm.clone()))))
}
