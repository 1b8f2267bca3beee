//! Classification pretraining of the extractor, the tutorial's way: SGD with a step schedule
//! counted in steps, accuracy on one evaluation batch every `eval_every` steps, periodic
//! checkpoints, resume.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType};
use retinanet_dataset::{ClassificationLoader, ClassificationTransform, LoaderConfig};
use serde_json::json;

use crate::checkpoint::{CheckpointWriter, load_checkpoint, resume_position};
use crate::config::{PretrainRunConfig, parse_config, to_toml};
use crate::data::open_classification;
use crate::device::parse_device;
use crate::model::{assign_from, build_classifier, trainable_vars};
use crate::optim::Sgd;
use crate::plot::{Series, plot_lines, smooth};
use crate::progress::Progress;
use crate::run::{JsonLog, RunDir, RunOptions, read_series};
use crate::schedule::{ProgressDecays, resume_clock, run_progress};

/// What a pretraining run ended with.
#[derive(Clone, Debug)]
pub struct PretrainSummary {
    /// Steps done in total.
    pub steps: usize,
    /// Accuracy on the last evaluation batch.
    pub eval_accuracy: Option<f64>,
    /// Seconds spent in this invocation.
    pub seconds: f64,
    /// The run folder.
    pub run: RunDir,
}

/// Pretrains a ResNet classifier as `cfg` says; the checkpoint (`kind = "extractor"`) is what
/// `train-detector` takes as `train.pretrained`.
pub fn pretrain(cfg: &PretrainRunConfig, opts: &RunOptions) -> Result<PretrainSummary> {
    let t = &cfg.train;
    if t.batch_size == 0 || t.eval_batch_size == 0 || t.eval_every == 0 || t.checkpoint_every == 0 {
        bail!(
            "train.batch_size, eval_batch_size, eval_every and checkpoint_every must be at least 1"
        );
    }
    t.lr.validate().context("train.lr")?;
    let mut t0 = Instant::now();
    let device = parse_device(&cfg.device)?;
    let run = RunDir::create(&opts.runs_dir, &cfg.name)?;
    let (train_ds, eval_ds) = open_classification(&cfg.data.source)?;
    let names = train_ds.class_names().to_vec();
    if eval_ds.class_names() != names {
        bail!(
            "the train and eval splits have different classes: {names:?} vs {:?}",
            eval_ds.class_names()
        );
    }
    let (varmap, model) =
        build_classifier(cfg.depth, cfg.base_width, names.len(), cfg.seed, &device)?;
    let mut opt = Sgd::new(trainable_vars(&varmap), t.momentum, t.weight_decay)?;
    let config_toml = to_toml(cfg)?;
    let ck_path = run.checkpoint();
    let (mut step, mut epoch, mut batch_in_epoch) = (0usize, 0usize, 0usize);
    let mut decays = ProgressDecays::default();
    if opts.resume {
        let ck = load_checkpoint(&ck_path, &device)
            .with_context(|| format!("cannot resume run {}", run.root.display()))?;
        let old: PretrainRunConfig =
            parse_config(&ck.meta.config).context("the checkpoint's config")?;
        if (old.depth, old.base_width, old.seed, old.train.batch_size)
            != (cfg.depth, cfg.base_width, cfg.seed, t.batch_size)
            || ck.meta.class_names != names
        {
            bail!(
                "the checkpoint's depth, width, seed, batch size or classes differ from the config's: resume with the run's own config.toml"
            );
        }
        assign_from(&varmap, &ck.tensors, &ck_path)?;
        opt.load_state(&ck.tensors)?;
        (step, epoch, batch_in_epoch) = (ck.meta.step, ck.meta.epoch, ck.meta.batch_in_epoch);
        (decays, t0) = resume_clock(&ck.meta.extra, t.time_limit_minutes)
            .with_context(|| format!("cannot resume run {}", run.root.display()))?;
    } else if ck_path.exists() {
        bail!(
            "{} already holds a checkpoint: pass --resume to continue it, or choose another run name",
            run.root.display()
        );
    }
    std::fs::write(run.config(), &config_toml)?;
    run.mark_latest(&opts.runs_dir, "extractor")?;
    let mut log = JsonLog::open(&run.train_log(), opts.resume.then_some(step))?;

    let size = cfg.data.size;
    let lc = LoaderConfig {
        drop_last: true,
        skip_bad: cfg.data.skip_bad_images,
        ..LoaderConfig::new(t.batch_size, cfg.seed)
    };
    let loader = ClassificationLoader::new(train_ds, ClassificationTransform::train(size), lc)?;
    let elc = LoaderConfig {
        skip_bad: cfg.data.skip_bad_images,
        prefetch: 0,
        ..LoaderConfig::new(t.eval_batch_size, cfg.seed ^ 0x5EED)
    };
    let eval_loader = ClassificationLoader::new(eval_ds, ClassificationTransform::eval(size), elc)?;
    let per_epoch = loader.batches_per_epoch();
    if per_epoch == 0 {
        bail!(
            "{} training images make no batch of {}",
            loader.dataset().len(),
            t.batch_size
        );
    }
    let writer = CheckpointWriter {
        path: ck_path.clone(),
        kind: "extractor",
        seed: cfg.seed,
        config: config_toml.clone(),
        class_names: names.clone(),
    };
    let accuracy = |logits: &candle_core::Tensor, labels: &candle_core::Tensor| -> Result<f64> {
        let pred = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
        let hits = pred
            .eq(labels)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        Ok(hits as f64 / labels.dim(0)? as f64)
    };

    let mut progress = Progress::new("pretrain", t.steps as u64, opts.quiet);
    progress.start_at(step as u64);
    let time_limit = (t.time_limit_minutes > 0.0).then_some(t.time_limit_minutes * 60.0);
    if let Some(limit) = time_limit {
        progress.set_deadline(t0 + std::time::Duration::from_secs_f64(limit));
    }
    let mut eval_acc = None;
    'outer: while step < t.steps {
        let mut last = Instant::now();
        // `from_position` runs on into the next epochs: take what is left of this one.
        for batch in loader
            .from_position(epoch, batch_in_epoch)
            .take(per_epoch - batch_in_epoch)
        {
            let batch = batch?;
            let done = run_progress(step, t.steps, t0.elapsed().as_secs_f64(), time_limit);
            t.lr.advance(&mut decays, step, done);
            let lr = t.lr.at_progress(step, &decays);
            let images = batch.images.to_device(&device)?;
            let labels = batch.labels.to_device(&device)?;
            let logits = model.classify_t(&images, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let lv = loss.to_scalar::<f32>()?;
            if !lv.is_finite() {
                bail!(
                    "the loss became {lv} at step {step}: stopping; the last good checkpoint is {}",
                    ck_path.display()
                );
            }
            let acc = accuracy(&logits, &labels)?;
            opt.step(&loss.backward()?, lr, None)?;
            step += 1;
            batch_in_epoch = batch.batch + 1;
            let ips = batch.indices.len() as f64 / last.elapsed().as_secs_f64().max(1e-9);
            last = Instant::now();
            let mut rec = json!({"step": step, "epoch": epoch, "loss": lv, "train_acc": acc, "lr": lr, "images_per_s": ips, "elapsed_s": t0.elapsed().as_secs_f64()});
            if step % t.eval_every == 0 || step == t.steps {
                // One batch of the evaluation set, a different one each time (as the tutorial).
                let k = step / t.eval_every;
                let eb = eval_loader.batch(
                    k / eval_loader.batches_per_epoch().max(1),
                    k % eval_loader.batches_per_epoch().max(1),
                )?;
                let el = model.classify_t(&eb.images.to_device(&device)?, false)?;
                let ea = accuracy(&el, &eb.labels.to_device(&device)?)?;
                rec["eval_acc"] = json!(ea);
                eval_acc = Some(ea);
                progress.println(&format!(
                    "step {step}: loss {lv:.4}, train acc {acc:.3}, eval acc {ea:.3}"
                ));
            }
            log.write(&rec)?;
            progress.inc(
                1,
                &format!("loss {lv:.4} acc {acc:.2} lr {lr:.2e} {ips:.1} img/s"),
            );
            let out_of_time = time_limit.is_some_and(|l| t0.elapsed().as_secs_f64() >= l);
            let at_max = opts.max_steps.is_some_and(|m| step >= m);
            let done = step >= t.steps;
            if step % t.checkpoint_every == 0
                || opts.stop_requested()
                || out_of_time
                || at_max
                || done
            {
                let at = resume_position(step, epoch, batch_in_epoch, per_epoch);
                let extra = decays.to_extra(t0.elapsed().as_secs_f64());
                writer.save(&varmap, &opt, at, extra)?;
            }
            if opts.stop_requested() || out_of_time || at_max || done {
                break 'outer;
            }
        }
        epoch += 1;
        batch_in_epoch = 0;
    }
    progress.finish();
    let loss = read_series(&run.train_log(), "step", "loss");
    let sm = smooth(&loss, 0.05);
    plot_lines(
        &run.file("loss.png"),
        "pretraining loss",
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
    let ea = read_series(&run.train_log(), "step", "eval_acc");
    let ta = smooth(&read_series(&run.train_log(), "step", "train_acc"), 0.05);
    plot_lines(
        &run.file("accuracy.png"),
        "accuracy",
        "step",
        &[
            Series {
                name: "train (smoothed)",
                points: &ta,
            },
            Series {
                name: "eval batch",
                points: &ea,
            },
        ],
        Some(1.0),
    )?;
    Ok(PretrainSummary {
        steps: step,
        eval_accuracy: eval_acc,
        seconds: t0.elapsed().as_secs_f64(),
        run,
    })
}
