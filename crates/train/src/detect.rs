//! The detector pipelines: training (with evaluation, checkpoints, resume), evaluation of a
//! checkpoint, and loading a trained model for inference.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use retinanet_dataset::{
    DetectionBatch, DetectionDataset, DetectionLoader, DetectionTransform, LoaderConfig,
};
use retinanet_detector::RetinaNet;
use retinanet_encoder::{DecodeOptions, Encoder, EncoderConfig, Postprocess};
use retinanet_eval::Report;
use retinanet_loss::{FocalLossConfig, focal_loss_detection};
use serde_json::{Map, Value, json};

use crate::anchor_report::{AnchorCheck, check_anchors};
use crate::checkpoint::load_checkpoint;
use crate::config::{DetectorEvalConfig, DetectorRunConfig, Validate, parse_config, to_toml};
use crate::data::{OpenOptions, open_detection_with};
use crate::dist::{Communicator, Local, agree, check_divisible, open_on_ranks, shard_range};
use crate::engine::{
    Budget, Ending, Forward, Plan, StepContext, Task, Trainer, rank_device, sync_bn_reducer,
};
use crate::infer::{ImageResult, detect_loader, eval_loader, score};
use crate::model::{assign_from, build_model, load_pretrained_extractor, trainable_vars};
use crate::optim::Sgd;
use crate::plot::{Series, plot_lines};
use crate::progress::Progress;
use crate::run::{JsonLog, RunDir, RunOptions, plot_loss, read_series};

/// What a training run ended with.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Optimizer steps done in total.
    pub steps: usize,
    /// The last evaluation, if any.
    pub report: Option<Report>,
    /// Seconds spent in this invocation.
    pub seconds: f64,
    /// Stopped early (interrupt, step or time limit) rather than finishing its epochs.
    pub stopped_early: bool,
    /// The run folder.
    pub run: RunDir,
}

/// A trained detector, ready for inference.
pub struct LoadedDetector {
    /// The network.
    pub model: RetinaNet,
    /// Its variables.
    pub varmap: VarMap,
    /// The encoder/decoder of its training config.
    pub encoder: Encoder,
    /// Class names `1..=C`.
    pub class_names: Vec<String>,
    /// The config it was trained with.
    pub config: DetectorRunConfig,
    /// The device it lives on.
    pub device: Device,
}

/// Decode options of an evaluation config.
pub fn decode_options(e: &DetectorEvalConfig) -> DecodeOptions {
    DecodeOptions {
        score_th: e.score_th,
        nms_th: e.nms_th,
        class_agnostic: e.class_agnostic,
        pre_nms_top_k: (e.pre_nms_top_k > 0).then_some(e.pre_nms_top_k),
        max_detections: (e.max_detections > 0).then_some(e.max_detections),
        ..DecodeOptions::default()
    }
}

/// The encoder and decoder of a run: its anchors, IoU thresholds and training size.
pub fn encoder_for(cfg: &DetectorRunConfig, num_classes: usize) -> Result<Encoder> {
    Ok(Encoder::new(EncoderConfig {
        anchors: cfg.model.anchor_layout()?,
        iou_th: (cfg.train.iou_th[0], cfg.train.iou_th[1]),
        train_size: (cfg.data.size as usize, cfg.data.size as usize),
        num_classes: Some(num_classes),
        postprocess: if cfg.model.variant.is_torchvision() {
            Postprocess::Torchvision
        } else {
            Postprocess::Tutorial
        },
    })?)
}

/// The anchor check of `cfg`'s training split (what `train-detector --check-anchors` prints).
pub fn check_run_anchors(cfg: &DetectorRunConfig) -> Result<AnchorCheck> {
    cfg.validate()?;
    let opts = OpenOptions {
        classes: cfg.data.classes.as_ref().map(|c| c.names()).transpose()?,
        skip_missing: cfg.data.skip_bad_images,
    };
    let (train, _) = open_detection_with(&cfg.data.source, &opts)?;
    check_anchors(&train, cfg)
}

/// Evaluates `model` on `dataset` (VOC and COCO-style), optionally on the first `max_images`.
pub fn evaluate_model(
    model: &RetinaNet,
    encoder: &Encoder,
    dataset: DetectionDataset,
    cfg: &DetectorRunConfig,
    device: &Device,
    quiet: bool,
) -> Result<Report> {
    let r = evaluate_sharded(model, encoder, &dataset, cfg, device, quiet, &Local)?;
    r.context("the evaluation made no report")
}

/// [`evaluate_model`] with the images shared out over the ranks: each rank runs inference on
/// a contiguous part of the split, rank 0 gathers the detections and scores every image in the
/// split's order — the report equals one process's. `Some(report)` on rank 0, `None` elsewhere.
/// Rank 0 prints each skipped file once, with the total, unless `quiet`.
pub fn evaluate_sharded(
    model: &RetinaNet,
    encoder: &Encoder,
    dataset: &DetectionDataset,
    cfg: &DetectorRunConfig,
    device: &Device,
    quiet: bool,
    comm: &dyn Communicator,
) -> Result<Option<Report>> {
    let out = evaluate_with_skips(model, encoder, dataset, cfg, device, quiet, comm)?;
    if let Some((_, skips)) = &out
        && !quiet
        && !skips.is_empty()
    {
        eprintln!("{}", skip_lines("evaluation", skips));
    }
    Ok(out.map(|(r, _)| r))
}

/// Skipped files as `(path, reason)`.
pub(crate) fn skip_pairs(skips: Vec<retinanet_dataset::Skip>) -> Vec<(String, String)> {
    skips
        .into_iter()
        .map(|s| (s.path.display().to_string(), s.reason))
        .collect()
}

/// "`what` skipped N file(s)" and one line per file.
fn skip_lines(what: &str, skips: &[(String, String)]) -> String {
    let mut s = format!("{what} skipped {} unreadable file(s):", skips.len());
    for (path, reason) in skips {
        s.push_str(&format!("\n  {path}: {reason}"));
    }
    s
}

/// Files skipped as unreadable: `(path, reason)`.
type Skipped = Vec<(String, String)>;

/// A rank's evaluation results and skipped files.
type Shard = (Vec<ImageResult>, Skipped);

/// [`evaluate_sharded`], returning on rank 0 the files skipped as unreadable as well
/// (`(path, reason)`, each once, in rank order).
fn evaluate_with_skips(
    model: &RetinaNet,
    encoder: &Encoder,
    dataset: &DetectionDataset,
    cfg: &DetectorRunConfig,
    device: &Device,
    quiet: bool,
    comm: &dyn Communicator,
) -> Result<Option<(Report, Skipped)>> {
    let names = dataset.class_names().to_vec();
    let n = if cfg.eval.max_images > 0 {
        cfg.eval.max_images.min(dataset.len())
    } else {
        dataset.len()
    };
    let share = shard_range(n, comm.rank(), comm.size());
    let mut progress = Progress::new("eval", share.len() as u64, quiet || !comm.is_root());
    let as_pair = |s: &retinanet_dataset::Skip| (s.path.display().to_string(), s.reason.clone());
    // Files missing when the split was opened: the shards below do not carry that list.
    let mut skips: Vec<(String, String)> = if comm.is_root() {
        dataset.dropped().iter().map(as_pair).collect()
    } else {
        Vec::new()
    };
    let mut results = Vec::new();
    if !share.is_empty() {
        let part = DetectionDataset::from_records(
            dataset.records()[share.clone()].to_vec(),
            names.clone(),
            dataset.image_root(),
        )?;
        let loader = eval_loader(part, cfg)?;
        results = detect_loader(
            model,
            encoder,
            &loader,
            cfg,
            device,
            share.len(),
            share.start,
            &mut progress,
        )?;
        skips.extend(loader.skips().iter().map(as_pair));
    }
    progress.finish();
    if comm.size() > 1 {
        let gathered = comm.gather_bytes(&serde_json::to_vec(&(&results, &skips))?)?;
        (results, skips) = (Vec::new(), Vec::new());
        for (rank, bytes) in gathered.iter().enumerate() {
            let (r, s): Shard = serde_json::from_slice(bytes)
                .with_context(|| format!("evaluation results of rank {rank}"))?;
            results.extend(r);
            skips.extend(s);
        }
    }
    if !comm.is_root() {
        return Ok(None);
    }
    Ok(Some((score(&mut results, &names)?, skips)))
}

/// Trains a detector as `cfg` says; see the crate docs for the run folder's contents.
pub fn train_detector(cfg: &DetectorRunConfig, opts: &RunOptions) -> Result<TrainSummary> {
    let t_start = Instant::now();
    let comm = opts.comm.clone();
    // Every rank checks the same config: a refusal is everyone's, printed once.
    let device = agree(
        &*comm,
        (|| {
            cfg.validate()?;
            check_divisible("train.batch_size", cfg.train.batch_size, &*comm)?;
            rank_device(&cfg.device, cfg.precision, &*comm)
        })(),
    )?;
    let (train_ds, eval_ds) = open_on_ranks(&*comm, || {
        let opts = OpenOptions {
            classes: cfg.data.classes.as_ref().map(|c| c.names()).transpose()?,
            skip_missing: cfg.data.skip_bad_images,
        };
        open_detection_with(&cfg.data.source, &opts)
    })?;
    // The anchor check, on rank 0: printed before training, written to the run folder. It only
    // reports, so a failure is reported too and training goes on.
    let anchor_check = comm.is_root().then(|| match check_anchors(&train_ds, cfg) {
        Ok(c) => c.to_text(),
        Err(e) => format!("anchor check failed: {e:#}\n"),
    });
    if let Some(text) = &anchor_check
        && !opts.quiet
    {
        eprint!("{text}");
    }
    // Deterministic from the config and data, so the same on every rank; agreed all the same,
    // so that a failure on one rank cannot leave the others waiting.
    let (varmap, model, encoder, opt, loader, plan, names) = agree(
        &*comm,
        (|| {
            if train_ds.is_empty() {
                bail!("the training split is empty");
            }
            let names = train_ds.class_names().to_vec();
            let num_classes = names.len();
            let (varmap, mut model) = build_model(
                &cfg.model,
                num_classes,
                cfg.train.frozen_stages,
                cfg.seed,
                &device,
            )?;
            model.extractor.set_freeze_bn(cfg.train.freeze_bn);
            model
                .extractor
                .set_sync_bn(sync_bn_reducer(cfg.train.sync_bn, &comm, &device)?);
            let encoder = encoder_for(cfg, num_classes)?;
            let opt = Sgd::new(
                trainable_vars(&varmap),
                cfg.train.momentum,
                cfg.train.weight_decay,
            )?;
            let lc = LoaderConfig {
                drop_last: true,
                skip_bad: cfg.data.skip_bad_images,
                shard_rank: comm.rank(),
                shard_count: comm.size(),
                ..LoaderConfig::new(cfg.train.batch_size, cfg.seed)
            };
            let transform = DetectionTransform {
                augment: cfg.data.augment.augment(),
                ..DetectionTransform::train(cfg.data.size, cfg.data.boxarea_th)
            };
            let loader =
                DetectionLoader::multi_scale(train_ds, transform, cfg.data.augment.sizes(), lc)?;
            let per_epoch = loader.batches_per_epoch();
            if per_epoch == 0 {
                bail!(
                    "{} training images make no batch of {}",
                    loader.dataset().len(),
                    cfg.train.batch_size
                );
            }
            let plan = Plan {
                kind: "detector",
                label: "train",
                budget: Budget::Epochs(cfg.train.epochs),
                per_epoch,
                checkpoint_every: cfg.train.checkpoint_every,
                save_at_epoch_end: true,
                time_limit_minutes: cfg.train.time_limit_minutes,
                lr: cfg.train.lr.clone(),
                grad_clip: (cfg.train.grad_clip > 0.0).then_some(cfg.train.grad_clip),
                seed: cfg.seed,
                name: cfg.name.clone(),
                config_toml: to_toml(cfg)?,
                class_names: names.clone(),
            };
            Ok((varmap, model, encoder, opt, loader, plan, names))
        })(),
    )?;
    let load_device = device.clone();
    let mut trainer = Trainer::start(
        opts,
        plan,
        device,
        varmap,
        opt,
        |meta| {
            let old: DetectorRunConfig =
                parse_config(&meta.config).context("the checkpoint's config")?;
            check_compatible(&old, cfg, &meta.class_names, &names)
        },
        |varmap| {
            if !cfg.train.pretrained.is_empty() {
                load_pretrained_extractor(varmap, Path::new(&cfg.train.pretrained), &load_device)?;
            }
            Ok(())
        },
    )?;
    if let Some(text) = anchor_check {
        let p = trainer.run.file("anchor-check.txt");
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let eval_log = if comm.is_root() {
        Some(JsonLog::open(
            &trainer.run.eval_log(),
            opts.resume.then_some(trainer.pos.step),
        )?)
    } else {
        None
    };
    let mut task = DetectorTask {
        cfg,
        model,
        encoder,
        loader,
        eval_ds,
        fl: FocalLossConfig::default(),
        report: None,
        eval_step: None,
        eval_log,
        eval_skipped: Default::default(),
    };
    let ending = trainer.run(&mut task)?;
    Ok(TrainSummary {
        steps: trainer.pos.step,
        report: task.report,
        seconds: t_start.elapsed().as_secs_f64(),
        stopped_early: ending.stopped_early(),
        run: trainer.run.clone(),
    })
}

/// The detector's part of the training loop: its step and its evaluations.
struct DetectorTask<'a> {
    cfg: &'a DetectorRunConfig,
    model: RetinaNet,
    encoder: Encoder,
    loader: DetectionLoader,
    eval_ds: DetectionDataset,
    fl: FocalLossConfig,
    /// The last evaluation (rank 0).
    report: Option<Report>,
    /// The step `report` was evaluated at.
    eval_step: Option<usize>,
    eval_log: Option<JsonLog>,
    /// Evaluation files already named as skipped.
    eval_skipped: std::collections::BTreeSet<String>,
}

impl DetectorTask<'_> {
    fn evaluate(&mut self, t: &mut Trainer) -> Result<()> {
        let r = evaluate_with_skips(
            &self.model,
            &self.encoder,
            &self.eval_ds,
            self.cfg,
            &t.device,
            t.opts.quiet,
            &*t.comm,
        )?;
        let elapsed = t.sync_clock()?;
        let r = r.map(|(r, skips)| {
            // Each file once per run, however many evaluations skip it.
            let new: Vec<_> = skips
                .into_iter()
                .filter(|s| self.eval_skipped.insert(s.0.clone()))
                .collect();
            if !new.is_empty() {
                t.println(&skip_lines("evaluation", &new));
            }
            r
        });
        if let (Some(r), Some(log)) = (r, self.eval_log.as_mut()) {
            log_eval(log, &t.progress, &r, t.pos.step, t.pos.epoch, elapsed)?;
            self.report = Some(r);
            write_plots(&t.run)?;
        }
        self.eval_step = Some(t.pos.step);
        Ok(())
    }
}

impl Task for DetectorTask<'_> {
    type Batch = DetectionBatch;

    fn batches(
        &self,
        epoch: usize,
        batch: usize,
    ) -> Box<dyn Iterator<Item = retinanet_dataset::Result<DetectionBatch>>> {
        Box::new(self.loader.epoch_from(epoch, batch))
    }

    fn new_skips(&mut self) -> Vec<(String, String)> {
        skip_pairs(self.loader.take_new_skips())
    }

    fn batch_index(b: &DetectionBatch) -> usize {
        b.batch
    }

    fn batch_len(b: &DetectionBatch) -> usize {
        b.indices.len()
    }

    fn forward(&mut self, ctx: &StepContext, batch: DetectionBatch) -> Result<Forward> {
        let images = batch.images.to_device(ctx.device)?;
        let (_, _, h, w) = images.dims4()?;
        let (cls, reg) = self.model.forward_t(&images, true)?;
        // At this batch's size: multi-scale training changes it from batch to batch.
        let targets = self
            .encoder
            .encode_at((h, w), &batch.labels, &batch.boxes)
            .with_context(|| format!("encoding batch {} of epoch {}", batch.batch, ctx.epoch))?;
        let (cls_t, reg_t) = targets.to_tensors(ctx.device)?;
        let loss = focal_loss_detection(&cls, &reg, &cls_t, &reg_t, &self.fl)?;
        // The loss is normalised by the positives of the whole global batch: rescale this
        // rank's part from its own count to the global one.
        let mut positives = [loss.num_positive as f64];
        ctx.comm.all_reduce_sum_f64(&mut positives)?;
        let f = (loss.num_positive as f64).max(1.0) / positives[0].max(1.0);
        let scale = |t: Tensor| -> Result<Tensor> { Ok(if f == 1.0 { t } else { (t * f)? }) };
        let (total, cls, reg) = (scale(loss.total)?, scale(loss.cls)?, scale(loss.reg)?);
        Ok(Forward {
            loss: total,
            sums: vec![
                ("cls", cls.to_scalar::<f32>()? as f64),
                ("reg", reg.to_scalar::<f32>()? as f64),
                ("positives", loss.num_positive as f64),
            ],
        })
    }

    fn record(&self, sums: &[(&'static str, f64)], rec: &mut Map<String, Value>) {
        for &(k, v) in sums {
            rec.insert(
                k.into(),
                if k == "positives" {
                    json!(v)
                } else {
                    json!(v as f32)
                },
            );
        }
    }

    fn progress_message(&self, rec: &Map<String, Value>) -> String {
        let f = |k: &str| rec.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        format!(
            "ep {} loss {:.4} lr {:.2e} {:.1} img/s",
            f("epoch"),
            f("loss"),
            f("lr"),
            f("images_per_s")
        )
    }

    fn after_epoch(&mut self, t: &mut Trainer) -> Result<()> {
        let e = &self.cfg.eval;
        let last_epoch = t.pos.epoch == self.cfg.train.epochs;
        if e.every_epochs > 0 && t.pos.epoch.is_multiple_of(e.every_epochs) && !last_epoch {
            self.evaluate(t)?;
        }
        Ok(())
    }

    fn after_train(&mut self, t: &mut Trainer, ending: &Ending) -> Result<()> {
        // A final evaluation unless the run was interrupted (or one was just made at this step).
        if *ending != Ending::Interrupted {
            if self.eval_step != Some(t.pos.step) {
                self.evaluate(t)?;
            }
            if let Some(r) = &self.report {
                let write = |name: &str, text: String| {
                    let p = t.run.file(name);
                    std::fs::write(&p, text)
                        .with_context(|| format!("cannot write {}", p.display()))
                };
                write("report.json", r.to_json())?;
                write("report.txt", r.to_table())?;
            }
        } else if self.eval_step != Some(t.pos.step) {
            // An interrupted run reports nothing (its last evaluation is of an earlier step).
            self.report = None;
        }
        if t.comm.is_root() {
            write_plots(&t.run)?;
        }
        Ok(())
    }
}

fn log_eval(
    log: &mut JsonLog,
    progress: &Progress,
    r: &Report,
    step: usize,
    epoch: usize,
    elapsed_s: f64,
) -> Result<()> {
    let coco = r.coco.as_ref();
    log.write(&json!({
        "step": step, "epoch": epoch, "map": r.map, "map_07": r.map_07,
        "coco_ap": coco.map(|c| c.ap), "coco_ap50": coco.map(|c| c.ap50),
        "elapsed_s": elapsed_s,
    }))?;
    progress.println(&format!("epoch {epoch}, step {step}:\n{}", r.to_table()));
    Ok(())
}

/// Redraws `loss.png` and `map.png` of a run from its logs.
pub fn write_plots(run: &RunDir) -> Result<()> {
    plot_loss(run, "training loss")?;
    let map = read_series(&run.eval_log(), "step", "map");
    if !map.is_empty() {
        let ap = read_series(&run.eval_log(), "step", "coco_ap");
        plot_lines(
            &run.file("map.png"),
            "evaluation",
            "step",
            &[
                Series {
                    name: "mAP@0.5",
                    points: &map,
                },
                Series {
                    name: "AP@.5:.95",
                    points: &ap,
                },
            ],
            Some(1.0),
        )?;
    }
    Ok(())
}

/// The dotted keys at which two configs' TOML differ, with both values: `key: a vs b`.
pub fn differing_keys<T: serde::Serialize>(prefix: &str, a: &T, b: &T) -> Vec<String> {
    fn walk(prefix: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
        match (a, b) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    walk(&format!("{prefix}.{k}"), x.get(k), y.get(k), out);
                }
            }
            (x, y) if x != y => {
                let show =
                    |v: Option<&toml::Value>| v.map_or("(none)".to_string(), |v| v.to_string());
                out.push(format!("{prefix} = {} vs {}", show(x), show(y)));
            }
            _ => {}
        }
    }
    let (a, b) = (toml::Value::try_from(a).ok(), toml::Value::try_from(b).ok());
    let mut out = Vec::new();
    walk(prefix, a.as_ref(), b.as_ref(), &mut out);
    out
}

fn check_compatible(
    old: &DetectorRunConfig,
    new: &DetectorRunConfig,
    old_names: &[String],
    new_names: &[String],
) -> Result<()> {
    let model = differing_keys("model", &old.model, &new.model);
    if !model.is_empty() {
        bail!(
            "the checkpoint's model differs from the config's (checkpoint vs config): {}",
            model.join("; ")
        );
    }
    if old_names != new_names {
        bail!("the checkpoint was trained on classes {old_names:?}, the data has {new_names:?}");
    }
    if old.data.size != new.data.size
        || old.train.batch_size != new.train.batch_size
        || old.seed != new.seed
    {
        bail!(
            "resuming needs the same data.size, train.batch_size and seed as the checkpoint (it has {}, {}, {})",
            old.data.size,
            old.train.batch_size,
            old.seed
        );
    }
    // The augmentation fixes every later batch: a resumed run continues the same stream.
    let augment = differing_keys("data.augment", &old.data.augment, &new.data.augment);
    if !augment.is_empty() {
        bail!(
            "resuming needs the checkpoint's augmentation (checkpoint vs config): {}",
            augment.join("; ")
        );
    }
    Ok(())
}

/// Loads a detector checkpoint for inference on `device`.
pub fn load_detector(path: &Path, device: &Device) -> Result<LoadedDetector> {
    let ck = load_checkpoint(path, device)?;
    if ck.meta.kind != "detector" {
        bail!(
            "{} is a `{}` checkpoint, not a detector",
            path.display(),
            ck.meta.kind
        );
    }
    let config: DetectorRunConfig = parse_config(&ck.meta.config)
        .with_context(|| format!("{}: the stored config", path.display()))?;
    let names = ck.meta.class_names.clone();
    let (varmap, model) = build_model(&config.model, names.len(), 0, 0, device)?;
    assign_from(&varmap, &ck.tensors, path)?;
    let encoder = encoder_for(&config, names.len())?;
    Ok(LoadedDetector {
        model,
        varmap,
        encoder,
        class_names: names,
        config,
        device: device.clone(),
    })
}
