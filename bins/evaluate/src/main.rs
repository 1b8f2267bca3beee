//! `evaluate`: VOC and COCO-style tables for a checkpoint on a split, or for a detections file
//! against a ground-truth file (formats in docs/formats.md).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use retinanet_train::cli::ModelArgs;
use retinanet_train::config::DetectorRunConfig;
use retinanet_train::config::EvalMode;
use retinanet_train::data::{OpenOptions, open_eval_detection};
use retinanet_train::detect::differing_keys;
use retinanet_train::infer::{CocoIds, eval_loader, evaluate_loader_results};
use retinanet_train::{parse_device, read_config};

/// Evaluate a detector checkpoint, or score a detections file.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Take the data (and evaluation settings) from this run config instead of the checkpoint's
    /// (needed with --extractor / --detector and --torchvision, whose model is read from the
    /// files; its [model] table is then not used).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Evaluate on at most this many images (0: all).
    #[arg(long)]
    max_images: Option<usize>,
    /// Score this detections file (JSON lines) instead of running a model.
    #[arg(long, requires_all = ["ground_truth", "names"])]
    detections: Option<PathBuf>,
    /// Ground-truth file (JSON lines) for --detections.
    #[arg(long)]
    ground_truth: Option<PathBuf>,
    /// Class names file (one per line) for --detections, or of --extractor / --detector
    /// (default for 20 classes: VOC's).
    #[arg(long)]
    names: Option<PathBuf>,
    /// Score this COCO results file (a JSON array of image_id, category_id, bbox, score)
    /// against --coco-gt instead of running a model.
    #[arg(long, requires = "coco_gt", conflicts_with = "detections")]
    coco_results: Option<PathBuf>,
    /// The COCO instances file for --coco-results, or whose ids --write-coco-results uses
    /// (images by file name, classes by name; without it images are numbered in split order).
    #[arg(long)]
    coco_gt: Option<PathBuf>,
    /// Also write the model's detections on the split as a COCO results file (whole-image
    /// evaluation: boxes in the images' own pixels).
    #[arg(long, conflicts_with_all = ["coco_results", "detections"])]
    write_coco_results: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Arithmetic of the convolutions: f32, tf32 on CUDA, or bf16 on CPUs with AVX512-BF16.
    #[arg(long, value_enum, default_value = "f32")]
    precision: retinanet_train::device::Precision,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> Result<()> {
    retinanet_train::init_runtime();
    retinanet_train::check_settings()?;
    let a = Args::parse();
    let report = if let (Some(res), Some(gt)) = (&a.coco_results, &a.coco_gt) {
        use retinanet_eval::coco_results::{CocoGroundTruth, read_results, score_results};
        let gt = CocoGroundTruth::read(gt)?;
        score_results(&gt, &read_results(res)?, res)?
    } else if let Some(det) = &a.detections {
        let (Some(gt), Some(names)) = (&a.ground_truth, &a.names) else {
            bail!("--detections needs --ground-truth and --names");
        };
        let names = retinanet_eval::io::read_names(names)?;
        let mut ev = retinanet_eval::Evaluator::new(names);
        retinanet_eval::io::evaluate_files(gt, det, &mut ev)?;
        ev.finish()
    } else {
        let device = parse_device(&a.device)?;
        a.precision.apply(&device)?;
        if (a.model.extractor.is_some() || a.model.torchvision.is_some()) && a.config.is_none() {
            bail!(
                "--extractor / --detector / --torchvision: pass --config with the data to evaluate on"
            );
        }
        let det = a.model.load(a.names.as_deref(), &device)?;
        let mut cfg: DetectorRunConfig = match &a.config {
            Some(p) => read_config(p)?,
            None => det.config.clone(),
        };
        // The checkpoint's model is what runs: a config describing another (anchors included)
        // would be scored as if it were. State dicts carry no run config: the model is the
        // one read from their tensors, the config gives the data and the evaluation settings.
        let from_state_dicts = a.model.extractor.is_some() || a.model.torchvision.is_some();
        if from_state_dicts {
            cfg.model = det.config.model.clone();
        }
        let diff = differing_keys("model", &det.config.model, &cfg.model);
        if !diff.is_empty() {
            bail!(
                "{} describes another model than {} (model vs config): {}",
                a.config
                    .as_ref()
                    .map_or("the config".into(), |p| p.display().to_string()),
                a.model.describe(),
                diff.join("; ")
            );
        }
        if let Some(m) = a.max_images {
            cfg.eval.max_images = m;
        }
        // The split is read against the model's classes: labels by name, and an object of a
        // class the model does not know is refused naming it and its file.
        let opts = OpenOptions {
            classes: Some(det.class_names.clone()),
            skip_missing: cfg.data.skip_bad_images,
        };
        let eval_ds = open_eval_detection(&cfg.data.source, &opts)?;
        if a.write_coco_results.is_some() && cfg.eval.mode != EvalMode::Whole {
            bail!(
                "--write-coco-results needs eval.mode = \"whole\": with the centre crop the boxes are in the crop's pixels, not the images'"
            );
        }
        let loader = eval_loader(eval_ds, &cfg)?;
        let (report, results) =
            evaluate_loader_results(&det.model, &det.encoder, &loader, &cfg, &device, a.quiet)?;
        if let Some(out) = &a.write_coco_results {
            let ds = loader.dataset();
            let paths: Vec<PathBuf> = results.iter().map(|r| ds.image_path(r.index)).collect();
            let ids = CocoIds::for_model(&det, a.coco_gt.as_deref(), &paths)?;
            let mut entries = Vec::new();
            for (k, r) in results.iter().enumerate() {
                entries.extend(ids.results(k, &r.detections()));
            }
            retinanet_eval::coco_results::write_results(out, &entries)?;
            eprintln!(
                "wrote {} detections of {} images to {}",
                entries.len(),
                results.len(),
                out.display()
            );
        }
        // Every skipped file (missing when the split was opened, or unreadable) once, and the
        // total: the scores leave them out.
        if let Some(summary) = loader.skip_summary() {
            eprintln!("{summary}");
        }
        report
    };
    println!("{}", report.to_table());
    if let Some(p) = &a.json {
        std::fs::write(p, report.to_json())
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
