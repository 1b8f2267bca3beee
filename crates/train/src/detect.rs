//! The detector pipelines: training (with evaluation, checkpoints, resume), evaluation of a
//! checkpoint, and loading a trained model for inference.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use candle_nn::VarMap;
use retinanet_dataset::{DetectionDataset, DetectionLoader, DetectionTransform, LoaderConfig};
use retinanet_detector::RetinaNet;
use retinanet_encoder::{DecodeOptions, Encoder, EncoderConfig};
use retinanet_eval::{Evaluator, Report};
use retinanet_loss::{FocalLossConfig, focal_loss_detection};
use serde_json::json;

use crate::checkpoint::{CheckpointWriter, load_checkpoint, resume_position};
use crate::config::{DetectorEvalConfig, DetectorRunConfig, parse_config, to_toml};
use crate::data::open_detection;
use crate::device::parse_device;
use crate::model::{
    assign_from, build_retinanet, load_pretrained_extractor, retinanet_config, trainable_vars,
};
use crate::optim::Sgd;
use crate::plot::{Series, plot_lines, smooth};
use crate::progress::Progress;
use crate::run::{JsonLog, RunDir, RunOptions, read_series};
use crate::schedule::{ProgressDecays, resume_clock, run_progress};

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

fn encoder_for(cfg: &DetectorRunConfig, num_classes: usize) -> Result<Encoder> {
    Ok(Encoder::new(EncoderConfig {
        iou_th: (cfg.train.iou_th[0], cfg.train.iou_th[1]),
        train_size: (cfg.data.size as usize, cfg.data.size as usize),
        num_classes: Some(num_classes),
        ..EncoderConfig::default()
    })?)
}

fn validate(cfg: &DetectorRunConfig) -> Result<()> {
    if cfg.train.batch_size == 0 {
        bail!("train.batch_size must be at least 1");
    }
    if cfg.train.checkpoint_every == 0 {
        bail!("train.checkpoint_every must be at least 1");
    }
    if cfg.data.size < 33 || cfg.data.eval_size < 33 {
        bail!("data.size and data.eval_size must be at least 33 pixels");
    }
    cfg.train.lr.validate().context("train.lr")?;
    Ok(())
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
    let names = dataset.class_names().to_vec();
    let size = cfg.data.eval_size as usize;
    let n = if cfg.eval.max_images > 0 {
        cfg.eval.max_images.min(dataset.len())
    } else {
        dataset.len()
    };
    let lc = LoaderConfig {
        shuffle: false,
        skip_bad: cfg.data.skip_bad_images,
        ..LoaderConfig::new(cfg.train.batch_size.min(32), cfg.seed)
    };
    let loader = DetectionLoader::new(
        dataset,
        DetectionTransform::eval(cfg.data.eval_size, cfg.data.boxarea_th),
        lc,
    )?;
    let opts = decode_options(&cfg.eval);
    let mut ev = Evaluator::new(names);
    let mut progress = Progress::new("eval", n as u64, quiet);
    let mut seen = 0;
    for batch in loader.epoch(0) {
        let batch = batch?;
        let (cls, reg) = model.infer(&batch.images.to_device(device)?)?;
        let dets = encoder.decode_tensors(&cls, &reg, (size, size), &opts)?;
        for ((d, gb), gl) in dets.iter().zip(&batch.boxes).zip(&batch.labels) {
            if seen == n {
                break;
            }
            ev.add_image(gb, gl, None, &d.boxes, &d.labels, &d.scores)?;
            seen += 1;
        }
        progress.inc(batch.boxes.len() as u64, "");
        if seen == n {
            break;
        }
    }
    progress.finish();
    if loader.skipped_count() > 0 {
        eprintln!(
            "evaluation skipped {} unreadable images",
            loader.skipped_count()
        );
    }
    Ok(ev.finish())
}

/// Trains a detector as `cfg` says; see the crate docs for the run folder's contents.
pub fn train_detector(cfg: &DetectorRunConfig, opts: &RunOptions) -> Result<TrainSummary> {
    validate(cfg)?;
    let mut t0 = Instant::now();
    let device = parse_device(&cfg.device)?;
    let run = RunDir::create(&opts.runs_dir, &cfg.name)?;
    let (train_ds, eval_ds) = open_detection(&cfg.data.source)?;
    if train_ds.is_empty() {
        bail!("the training split is empty");
    }
    let names = train_ds.class_names().to_vec();
    let num_classes = names.len();
    let rcfg = retinanet_config(&cfg.model, num_classes, cfg.train.frozen_stages)?;
    let (varmap, mut model) = build_retinanet(&rcfg, cfg.seed, &device)?;
    model.extractor.set_freeze_bn(cfg.train.freeze_bn);
    let encoder = encoder_for(cfg, num_classes)?;
    let mut opt = Sgd::new(
        trainable_vars(&varmap),
        cfg.train.momentum,
        cfg.train.weight_decay,
    )?;
    let config_toml = to_toml(cfg)?;

    // Where to start: a fresh run, or the checkpoint of this run folder.
    let (mut step, mut epoch, mut batch_in_epoch) = (0usize, 0usize, 0usize);
    let mut decays = ProgressDecays::default();
    let ck_path = run.checkpoint();
    if opts.resume {
        let ck = load_checkpoint(&ck_path, &device)
            .with_context(|| format!("cannot resume run {}", run.root.display()))?;
        let old: DetectorRunConfig =
            parse_config(&ck.meta.config).context("the checkpoint's config")?;
        check_compatible(&old, cfg, &ck.meta.class_names, &names)?;
        assign_from(&varmap, &ck.tensors, &ck_path)?;
        opt.load_state(&ck.tensors)?;
        (step, epoch, batch_in_epoch) = (ck.meta.step, ck.meta.epoch, ck.meta.batch_in_epoch);
        (decays, t0) = resume_clock(&ck.meta.extra, cfg.train.time_limit_minutes)
            .with_context(|| format!("cannot resume run {}", run.root.display()))?;
        if !opts.quiet {
            eprintln!(
                "resuming {} at step {step} (epoch {epoch}, batch {batch_in_epoch})",
                run.root.display()
            );
        }
    } else {
        if ck_path.exists() {
            bail!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another run name",
                run.root.display()
            );
        }
        if !cfg.train.pretrained.is_empty() {
            load_pretrained_extractor(&varmap, Path::new(&cfg.train.pretrained), &device)?;
        }
    }
    std::fs::write(run.config(), &config_toml)?;
    run.mark_latest(&opts.runs_dir, "detector")?;
    let mut train_log = JsonLog::open(&run.train_log(), opts.resume.then_some(step))?;
    let mut eval_log = JsonLog::open(&run.eval_log(), opts.resume.then_some(step))?;

    let lc = LoaderConfig {
        drop_last: true,
        skip_bad: cfg.data.skip_bad_images,
        ..LoaderConfig::new(cfg.train.batch_size, cfg.seed)
    };
    let loader = DetectionLoader::new(
        train_ds,
        DetectionTransform::train(cfg.data.size, cfg.data.boxarea_th),
        lc,
    )?;
    let per_epoch = loader.batches_per_epoch();
    if per_epoch == 0 {
        bail!(
            "{} training images make no batch of {}",
            loader.dataset().len(),
            cfg.train.batch_size
        );
    }
    let total_steps = per_epoch * cfg.train.epochs;
    let writer = CheckpointWriter {
        path: ck_path.clone(),
        kind: "detector",
        seed: cfg.seed,
        config: config_toml.clone(),
        class_names: names.clone(),
    };

    let fl = FocalLossConfig::default();
    let mut progress = Progress::new("train", total_steps as u64, opts.quiet);
    progress.start_at(step as u64);
    let mut report = None;
    // The step `report` was evaluated at.
    let mut eval_step = None;
    let mut stopped_early = false;
    let time_limit =
        (cfg.train.time_limit_minutes > 0.0).then_some(cfg.train.time_limit_minutes * 60.0);
    if let Some(limit) = time_limit {
        progress.set_deadline(t0 + std::time::Duration::from_secs_f64(limit));
    }
    let out_of_time = || time_limit.is_some_and(|t| t0.elapsed().as_secs_f64() >= t);
    let time_up = |step: usize| {
        format!(
            "time limit of {} min reached at step {step}",
            cfg.train.time_limit_minutes
        )
    };
    'epochs: while epoch < cfg.train.epochs {
        let mut last = Instant::now();
        // `from_position` runs on into the next epochs: take what is left of this one.
        for batch in loader
            .from_position(epoch, batch_in_epoch)
            .take(per_epoch - batch_in_epoch)
        {
            let batch = batch?;
            let elapsed = t0.elapsed().as_secs_f64();
            let done = run_progress(step, total_steps, elapsed, time_limit);
            cfg.train.lr.advance(&mut decays, step, done);
            let lr = cfg.train.lr.at_progress(step, &decays);
            let images = batch.images.to_device(&device)?;
            let (cls, reg) = model.forward_t(&images, true)?;
            let targets = encoder
                .encode(&batch.labels, &batch.boxes)
                .with_context(|| format!("encoding batch {} of epoch {epoch}", batch.batch))?;
            let (cls_t, reg_t) = targets.to_tensors(&device)?;
            let loss = focal_loss_detection(&cls, &reg, &cls_t, &reg_t, &fl)?;
            let total = loss.total.to_scalar::<f32>()?;
            if !total.is_finite() {
                bail!(
                    "the loss became {total} at step {step} (epoch {epoch}, batch {}): stopping; the last good checkpoint is {} (try a lower learning rate or grad_clip)",
                    batch.batch,
                    ck_path.display()
                );
            }
            let grads = loss.total.backward()?;
            let clip = (cfg.train.grad_clip > 0.0).then_some(cfg.train.grad_clip);
            let grad_norm = opt.step(&grads, lr, clip)?;
            step += 1;
            batch_in_epoch = batch.batch + 1;
            let dt = last.elapsed().as_secs_f64();
            last = Instant::now();
            let ips = batch.boxes.len() as f64 / dt.max(1e-9);
            // The gradient norm is known (and logged) when clipping computes it.
            train_log.write(&json!({
                "step": step, "epoch": epoch, "loss": total,
                "cls": loss.cls.to_scalar::<f32>()?, "reg": loss.reg.to_scalar::<f32>()?,
                "positives": loss.num_positive, "lr": lr, "images_per_s": ips,
                "grad_norm": grad_norm, "elapsed_s": t0.elapsed().as_secs_f64(),
            }))?;
            progress.inc(
                1,
                &format!("ep {epoch} loss {total:.4} lr {lr:.2e} {ips:.1} img/s"),
            );

            let out_of_time = out_of_time();
            let at_max = opts.max_steps.is_some_and(|m| step >= m);
            // A periodic checkpoint on an epoch's last batch is left to the epoch-end save just
            // below (it would write the same position twice); a stop saves here, as it leaves
            // the loop before that.
            let periodic = step % cfg.train.checkpoint_every == 0 && batch_in_epoch < per_epoch;
            if periodic || opts.stop_requested() || out_of_time || at_max {
                let at = resume_position(step, epoch, batch_in_epoch, per_epoch);
                let extra = decays.to_extra(t0.elapsed().as_secs_f64());
                writer.save(&varmap, &opt, at, extra)?;
            }
            if opts.stop_requested() || at_max {
                progress.println(&format!("stopped at step {step}; resume with --resume"));
                stopped_early = true;
                break 'epochs;
            }
            if out_of_time {
                progress.println(&time_up(step));
                stopped_early = true;
                break 'epochs;
            }
        }
        epoch += 1;
        batch_in_epoch = 0;
        writer.save(
            &varmap,
            &opt,
            (step, epoch, 0),
            decays.to_extra(t0.elapsed().as_secs_f64()),
        )?;
        let last_epoch = epoch == cfg.train.epochs;
        if cfg.eval.every_epochs > 0 && epoch % cfg.eval.every_epochs == 0 && !last_epoch {
            let r = evaluate_model(&model, &encoder, eval_ds.clone(), cfg, &device, opts.quiet)?;
            log_eval(&mut eval_log, &progress, &r, step, epoch, t0)?;
            report = Some(r);
            eval_step = Some(step);
            write_plots(&run)?;
        }
        // The limit may pass during that evaluation: stop here rather than after one more step
        // and a second evaluation.
        if out_of_time() {
            progress.println(&time_up(step));
            stopped_early = true;
            break 'epochs;
        }
    }
    progress.finish();
    // A final evaluation unless the run was interrupted (or one was just made at this step).
    if !opts.stop_requested() && opts.max_steps.is_none_or(|m| step < m) {
        let r = match report.take().filter(|_| eval_step == Some(step)) {
            Some(r) => r,
            None => {
                let r = evaluate_model(&model, &encoder, eval_ds, cfg, &device, opts.quiet)?;
                log_eval(&mut eval_log, &progress, &r, step, epoch, t0)?;
                r
            }
        };
        std::fs::write(run.file("report.json"), r.to_json())?;
        std::fs::write(run.file("report.txt"), r.to_table())?;
        report = Some(r);
    }
    write_plots(&run)?;
    Ok(TrainSummary {
        steps: step,
        report,
        seconds: t0.elapsed().as_secs_f64(),
        stopped_early,
        run,
    })
}

fn log_eval(
    log: &mut JsonLog,
    progress: &Progress,
    r: &Report,
    step: usize,
    epoch: usize,
    t0: Instant,
) -> Result<()> {
    let coco = r.coco.as_ref();
    log.write(&json!({
        "step": step, "epoch": epoch, "map": r.map, "map_07": r.map_07,
        "coco_ap": coco.map(|c| c.ap), "coco_ap50": coco.map(|c| c.ap50),
        "elapsed_s": t0.elapsed().as_secs_f64(),
    }))?;
    progress.println(&format!("epoch {epoch}, step {step}:\n{}", r.to_table()));
    Ok(())
}

/// Redraws `loss.png` and `map.png` of a run from its logs.
pub fn write_plots(run: &RunDir) -> Result<()> {
    let loss = read_series(&run.train_log(), "step", "loss");
    if !loss.is_empty() {
        let sm = smooth(&loss, 0.05);
        plot_lines(
            &run.file("loss.png"),
            "training loss",
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
        )?;
    }
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

fn check_compatible(
    old: &DetectorRunConfig,
    new: &DetectorRunConfig,
    old_names: &[String],
    new_names: &[String],
) -> Result<()> {
    if old.model != new.model {
        bail!(
            "the checkpoint's model {:?} differs from the config's {:?}",
            old.model,
            new.model
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
    let rcfg = retinanet_config(&config.model, names.len(), 0)?;
    let (varmap, model) = build_retinanet(&rcfg, 0, device)?;
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
