//! Classification pretraining of the extractor, the tutorial's way: SGD with a step schedule
//! counted in steps, accuracy on one evaluation batch every `eval_every` steps, periodic
//! checkpoints, resume — on the training engine ([`crate::engine`]), so it runs on several
//! ranks as the tutorial's multi-GPU pretraining does.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Tensor};
use retinanet_dataset::{
    ClassificationBatch, ClassificationLoader, ClassificationTransform, LoaderConfig,
};
use retinanet_extractor::ResNet;
use serde_json::{Map, Value, json};

use crate::config::{PretrainRunConfig, Validate, parse_config, to_toml};
use crate::data::open_classification;
use crate::dist::{agree, check_divisible, open_on_ranks};
use crate::engine::{
    Budget, Ending, Forward, Plan, StepContext, Task, Trainer, rank_device, sync_bn_reducer,
};
use crate::model::{build_classifier, trainable_vars};
use crate::optim::Sgd;
use crate::plot::{Series, plot_lines, smooth};
use crate::run::{RunDir, RunOptions, plot_loss, read_series};

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
    let t_start = Instant::now();
    let t = &cfg.train;
    let comm = opts.comm.clone();
    // Every rank checks the same config: a refusal is everyone's, printed once.
    let device = agree(
        &*comm,
        (|| {
            cfg.validate()?;
            check_divisible("train.batch_size", t.batch_size, &*comm)?;
            rank_device(&cfg.device, cfg.precision, &*comm)
        })(),
    )?;
    let (train_ds, eval_ds) = open_on_ranks(&*comm, || open_classification(&cfg.data.source))?;
    // The same on every rank; agreed so that a failure cannot leave the others waiting.
    let (names, model, varmap, opt, loader, eval_loader, plan) = agree(
        &*comm,
        (|| {
            let names = train_ds.class_names().to_vec();
            if eval_ds.class_names() != names {
                bail!(
                    "the train and eval splits have different classes: {names:?} vs {:?}",
                    eval_ds.class_names()
                );
            }
            let (varmap, mut model) =
                build_classifier(cfg.depth, cfg.base_width, names.len(), cfg.seed, &device)?;
            model.set_sync_bn(sync_bn_reducer(t.sync_bn, &comm, &device)?);
            let opt = Sgd::new(trainable_vars(&varmap), t.momentum, t.weight_decay)?;

            let size = cfg.data.size;
            let lc = LoaderConfig {
                drop_last: true,
                skip_bad: cfg.data.skip_bad_images,
                shard_rank: comm.rank(),
                shard_count: comm.size(),
                ..LoaderConfig::new(t.batch_size, cfg.seed)
            };
            let loader =
                ClassificationLoader::new(train_ds, ClassificationTransform::train(size), lc)?;
            // The evaluation batch is shared out too; its hits are summed over the ranks.
            let elc = LoaderConfig {
                skip_bad: cfg.data.skip_bad_images,
                prefetch: 0,
                shard_rank: comm.rank(),
                shard_count: comm.size(),
                ..LoaderConfig::new(t.eval_batch_size, cfg.seed ^ 0x5EED)
            };
            let eval_loader =
                ClassificationLoader::new(eval_ds, ClassificationTransform::eval(size), elc)?;
            let per_epoch = loader.batches_per_epoch();
            if per_epoch == 0 {
                bail!(
                    "{} training images make no batch of {}",
                    loader.dataset().len(),
                    t.batch_size
                );
            }
            let plan = Plan {
                kind: "extractor",
                label: "pretrain",
                budget: Budget::Steps(t.steps),
                per_epoch,
                checkpoint_every: t.checkpoint_every,
                save_at_epoch_end: false,
                time_limit_minutes: t.time_limit_minutes,
                lr: t.lr.clone(),
                grad_clip: None,
                seed: cfg.seed,
                name: cfg.name.clone(),
                config_toml: to_toml(cfg)?,
                class_names: names.clone(),
            };
            Ok((names, model, varmap, opt, loader, eval_loader, plan))
        })(),
    )?;
    let mut trainer = Trainer::start(
        opts,
        plan,
        device,
        varmap,
        opt,
        |meta| {
            let old: PretrainRunConfig =
                parse_config(&meta.config).context("the checkpoint's config")?;
            if (old.depth, old.base_width, old.seed, old.train.batch_size)
                != (cfg.depth, cfg.base_width, cfg.seed, t.batch_size)
                || meta.class_names != names
            {
                bail!(
                    "the checkpoint's depth, width, seed, batch size or classes differ from the config's: resume with the run's own config.toml"
                );
            }
            Ok(())
        },
        |_| Ok(()),
    )?;
    let mut task = PretrainTask {
        cfg,
        model,
        loader,
        eval_loader,
        eval_acc: None,
    };
    trainer.run(&mut task)?;
    Ok(PretrainSummary {
        steps: trainer.pos.step,
        eval_accuracy: task.eval_acc,
        seconds: t_start.elapsed().as_secs_f64(),
        run: trainer.run.clone(),
    })
}

/// Correct predictions of `logits` for `labels`.
fn hits(logits: &Tensor, labels: &Tensor) -> Result<f64> {
    let pred = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
    let h = pred
        .eq(labels)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(h as f64)
}

/// Pretraining's part of the training loop.
struct PretrainTask<'a> {
    cfg: &'a PretrainRunConfig,
    model: ResNet,
    loader: ClassificationLoader,
    eval_loader: ClassificationLoader,
    eval_acc: Option<f64>,
}

impl Task for PretrainTask<'_> {
    type Batch = ClassificationBatch;

    fn batches(
        &self,
        epoch: usize,
        batch: usize,
    ) -> Box<dyn Iterator<Item = retinanet_dataset::Result<ClassificationBatch>>> {
        Box::new(self.loader.epoch_from(epoch, batch))
    }

    fn new_skips(&mut self) -> Vec<(String, String)> {
        crate::detect::skip_pairs(self.loader.take_new_skips())
    }

    fn batch_index(b: &ClassificationBatch) -> usize {
        b.batch
    }

    fn batch_len(b: &ClassificationBatch) -> usize {
        b.indices.len()
    }

    fn forward(&mut self, ctx: &StepContext, batch: ClassificationBatch) -> Result<Forward> {
        let images = batch.images.to_device(ctx.device)?;
        let labels = batch.labels.to_device(ctx.device)?;
        let logits = self.model.classify_t(&images, true)?;
        let mean = candle_nn::loss::cross_entropy(&logits, &labels)?;
        // This rank's share of the global batch's mean.
        let f = batch.indices.len() as f64 / ctx.global_images as f64;
        let loss = if f == 1.0 { mean } else { (mean * f)? };
        Ok(Forward {
            loss,
            sums: vec![
                ("hits", hits(&logits, &labels)?),
                ("count", batch.indices.len() as f64),
            ],
        })
    }

    fn record(&self, sums: &[(&'static str, f64)], rec: &mut Map<String, Value>) {
        let get = |k| sums.iter().find(|s| s.0 == k).map_or(0.0, |s| s.1);
        rec.insert(
            "train_acc".into(),
            json!(get("hits") / get("count").max(1.0)),
        );
    }

    fn progress_message(&self, rec: &Map<String, Value>) -> String {
        let f = |k: &str| rec.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        format!(
            "loss {:.4} acc {:.2} lr {:.2e} {:.1} img/s",
            f("loss"),
            f("train_acc"),
            f("lr"),
            f("images_per_s")
        )
    }

    fn after_step(&mut self, t: &mut Trainer, rec: &mut Map<String, Value>) -> Result<()> {
        let tc = &self.cfg.train;
        let step = t.pos.step;
        if !step.is_multiple_of(tc.eval_every) && step != tc.steps {
            return Ok(());
        }
        // One batch of the evaluation set, a different one each time (as the tutorial).
        let k = step / tc.eval_every;
        let bpe = self.eval_loader.batches_per_epoch().max(1);
        let eb = self.eval_loader.batch(k / bpe, k % bpe)?;
        let el = self
            .model
            .classify_t(&eb.images.to_device(&t.device)?, false)?;
        let mut s = [
            hits(&el, &eb.labels.to_device(&t.device)?)?,
            eb.indices.len() as f64,
        ];
        t.comm.all_reduce_sum_f64(&mut s)?;
        let ea = s[0] / s[1].max(1.0);
        rec.insert("eval_acc".into(), json!(ea));
        self.eval_acc = Some(ea);
        let f = |k: &str| rec.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        t.println(&format!(
            "step {step}: loss {:.4}, train acc {:.3}, eval acc {ea:.3}",
            f("loss"),
            f("train_acc")
        ));
        Ok(())
    }

    fn after_train(&mut self, t: &mut Trainer, _: &Ending) -> Result<()> {
        if !t.comm.is_root() {
            return Ok(());
        }
        let run = &t.run;
        plot_loss(run, "pretraining loss")?;
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
        Ok(())
    }
}
