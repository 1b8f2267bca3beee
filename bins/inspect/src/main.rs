//! `inspect`: runs a trained detector on images, draws boxes, names and scores, writes
//! `<name>.pred.png` and prints the detections.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Parser;
use retinanet_train::cli::ModelArgs;
use retinanet_train::infer::{
    CocoIds, ImageScale, detect_file, draw, expand_inputs, inference_options, output_path,
};
use retinanet_train::parse_device;

/// Detect objects in images with a trained RetinaNet.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Images or folders of images.
    #[arg(default_value = "img/0.jpg")]
    inputs: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Class names (one per line) of --extractor / --detector; default for 20 classes: VOC's.
    #[arg(long)]
    names: Option<PathBuf>,
    /// Resize the shorter side to this many pixels first (at least 33, the smallest input the
    /// detector's levels cover). Default: as the run's evaluation does (shorter side to
    /// `data.eval_size`, longer at most `data.eval_max_size`), so `inspect` and `evaluate`
    /// find the same boxes in an image; with --extractor / --detector, the image's own size.
    #[arg(long, value_parser = clap::value_parser!(u32).range(33..), conflicts_with = "own_size")]
    size: Option<u32>,
    /// Run at the image's own size instead (the tutorial's inspect).
    #[arg(long)]
    own_size: bool,
    /// Output PNG (one input) or folder (several); default `<name>.pred.png` beside each input.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    /// Score threshold, in [0, 1] (default 0.5; for --torchvision models torchvision's 0.05).
    #[arg(long, value_parser = unit_interval)]
    score_th: Option<f32>,
    /// NMS IoU threshold, in [0, 1] (default 0.5).
    #[arg(long, value_parser = unit_interval)]
    nms_th: Option<f32>,
    /// NMS within each class instead of across classes (torchvision's models always).
    #[arg(long)]
    per_class: bool,
    /// Keep at most this many detections per image (default: all; torchvision's models 300).
    #[arg(long)]
    max_detections: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Arithmetic of the convolutions: f32, tf32 on CUDA, or bf16 on CPUs with AVX512-BF16.
    #[arg(long, value_enum, default_value = "f32")]
    precision: retinanet_train::device::Precision,
    /// Also write every detection into this COCO results file (a JSON array of `image_id`,
    /// `category_id`, `bbox` [x, y, w, h], `score`, as pycocotools' loadRes reads).
    #[arg(long)]
    coco_results: Option<PathBuf>,
    /// The COCO instances file whose ids the results use: images by file name, classes by
    /// name. Without it, images are numbered 1, 2, ... in input order and categories by label.
    #[arg(long, requires = "coco_results")]
    coco_gt: Option<PathBuf>,
}

/// A flag value in [0, 1] (a score or an IoU).
fn unit_interval(s: &str) -> std::result::Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside [0, 1]"))
    }
}

fn main() -> Result<()> {
    retinanet_train::init_runtime();
    retinanet_train::check_settings()?;
    let a = Args::parse();
    let device = parse_device(&a.device)?;
    a.precision.apply(&device)?;
    let det = a.model.load(a.names.as_deref(), &device)?;
    // The per-level pre-NMS top-k stays on, as in evaluation: without it a large photo and a
    // low threshold send hundreds of thousands of boxes to NMS.
    // torchvision's models default to torchvision's own post-processing (their [eval]), so
    // inspect shows what torchvision would; the tutorial's to its display settings.
    let e = &det.config.eval;
    let opts = if det.config.model.variant.is_torchvision() {
        inference_options(
            e,
            a.score_th.unwrap_or(e.score_th),
            a.nms_th.unwrap_or(e.nms_th),
            e.class_agnostic && !a.per_class,
            a.max_detections
                .or((e.max_detections > 0).then_some(e.max_detections)),
        )
    } else {
        inference_options(
            e,
            a.score_th.unwrap_or(0.5),
            a.nms_th.unwrap_or(0.5),
            !a.per_class,
            a.max_detections,
        )
    };
    let inputs = expand_inputs(&a.inputs)?;
    let out_dir = match &a.out {
        Some(o) if inputs.len() > 1 || o.is_dir() => {
            std::fs::create_dir_all(o)?;
            Some(o.clone())
        }
        _ => None,
    };
    // The ids are resolved before any image is run: a mismatch is found at once.
    let ids = match &a.coco_results {
        Some(_) => Some(CocoIds::for_model(&det, a.coco_gt.as_deref(), &inputs)?),
        None => None,
    };
    let scale = match (a.size, a.own_size) {
        (_, true) => ImageScale::Own,
        (Some(s), false) => ImageScale::Shorter(s),
        // The tutorial's pair of state dicts has no run config: its inspect runs images whole.
        (None, false) if a.model.extractor.is_some() => ImageScale::Own,
        (None, false) => ImageScale::Evaluation,
    };
    let mut results = Vec::new();
    for (k, input) in inputs.iter().enumerate() {
        let (mut img, d) = detect_file(&det, input, scale, &opts)?;
        if let Some(ids) = &ids {
            results.extend(ids.results(k, &d.detections));
        }
        draw(&mut img, &d.detections, &det.class_names);
        let out = match (&a.out, &out_dir) {
            (_, Some(dir)) => output_path(input, Some(dir)),
            (Some(file), None) => file.clone(),
            (None, None) => output_path(input, None),
        };
        if out.extension().and_then(|e| e.to_str()) != Some("png") {
            bail!("output {} must be a .png file", out.display());
        }
        retinanet_train::infer::save(&img, &out)?;
        let dd = &d.detections;
        if a.json {
            for i in 0..dd.len() {
                let b = dd.boxes[i];
                println!(
                    "{{\"image\":{:?},\"label\":{},\"class\":{:?},\"score\":{:.4},\"box\":[{:.1},{:.1},{:.1},{:.1}]}}",
                    input.display().to_string(),
                    dd.labels[i],
                    det.class_names[dd.labels[i] as usize - 1],
                    dd.scores[i],
                    b[0],
                    b[1],
                    b[2],
                    b[3]
                );
            }
        } else {
            println!(
                "{} ({}x{}): {} detections -> {}",
                input.display(),
                d.size.1,
                d.size.0,
                dd.len(),
                out.display()
            );
            println!(
                "  {:<14} {:>6}  {:>7} {:>7} {:>7} {:>7}",
                "class", "score", "ymin", "xmin", "ymax", "xmax"
            );
            for i in 0..dd.len() {
                let b = dd.boxes[i];
                println!(
                    "  {:<14} {:>6.3}  {:>7.1} {:>7.1} {:>7.1} {:>7.1}",
                    det.class_names[dd.labels[i] as usize - 1],
                    dd.scores[i],
                    b[0],
                    b[1],
                    b[2],
                    b[3]
                );
            }
        }
    }
    if let Some(p) = &a.coco_results {
        retinanet_eval::coco_results::write_results(p, &results)?;
        eprintln!("wrote {} detections to {}", results.len(), p.display());
    }
    Ok(())
}
