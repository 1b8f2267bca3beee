//! Inference on image files: preprocess, run, decode, map boxes back, draw.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use image::RgbImage;
use image::imageops::FilterType;
use retinanet_dataset::imageops::image_to_chw;
use retinanet_dataset::{
    DetectionDataset, DetectionLoader, DetectionTransform, LoaderConfig, draw_detections, load_rgb,
};
use retinanet_detector::RetinaNet;
use retinanet_encoder::{DecodeOptions, Detections, Encoder};
use retinanet_eval::{Evaluator, Report};

use crate::config::{DetectorEvalConfig, DetectorRunConfig};
use crate::detect::{LoadedDetector, decode_options};
use crate::progress::Progress;

/// The loader evaluation reads a split with: in order, at `data.eval_size`, unreadable images
/// skipped (and reported by the loader) with `data.skip_bad_images`.
pub fn eval_loader(dataset: DetectionDataset, cfg: &DetectorRunConfig) -> Result<DetectionLoader> {
    let lc = LoaderConfig {
        shuffle: false,
        skip_bad: cfg.data.skip_bad_images,
        ..LoaderConfig::new(cfg.train.batch_size.clamp(1, 32), cfg.seed)
    };
    Ok(DetectionLoader::new(
        dataset,
        DetectionTransform::eval(cfg.data.eval_size, cfg.data.boxarea_th),
        lc,
    )?)
}

/// Scores `model` on the batches of `loader` (VOC and COCO-style), on its first
/// `eval.max_images` images (all with 0). The loader's skips ([`DetectionLoader::skips`],
/// [`DetectionLoader::skip_summary`]) say what was left out; a split with nothing readable is
/// an error.
pub fn evaluate_loader(
    model: &RetinaNet,
    encoder: &Encoder,
    loader: &DetectionLoader,
    cfg: &DetectorRunConfig,
    device: &Device,
    quiet: bool,
) -> Result<Report> {
    let dataset = loader.dataset();
    let size = cfg.data.eval_size as usize;
    let n = match cfg.eval.max_images {
        0 => dataset.len(),
        m => m.min(dataset.len()),
    };
    let opts = decode_options(&cfg.eval);
    let mut ev = Evaluator::new(dataset.class_names().to_vec());
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
    Ok(ev.finish())
}

/// Candidates kept per pyramid level before NMS when the run's config keeps all (`0`).
pub const DEFAULT_PRE_NMS_TOP_K: usize = 1000;

/// Decode options for inference on whole images (`inspect`): the run's evaluation settings
/// with these overrides, and always a per-level pre-NMS top-k (the run's, or
/// [`DEFAULT_PRE_NMS_TOP_K`]): at a photo's own size (4000x3000 has ~700,000 anchors) a low
/// threshold would otherwise send nearly every anchor to NMS, minutes of work.
pub fn inference_options(
    eval: &DetectorEvalConfig,
    score_th: f32,
    nms_th: f32,
    class_agnostic: bool,
    max_detections: Option<usize>,
) -> DecodeOptions {
    let mut opts = decode_options(eval);
    opts.score_th = score_th;
    opts.nms_th = nms_th;
    opts.class_agnostic = class_agnostic;
    opts.pre_nms_top_k = Some(opts.pre_nms_top_k.unwrap_or(DEFAULT_PRE_NMS_TOP_K));
    opts.max_detections = max_detections;
    opts
}

/// Detections of one image, in the image's own pixel coordinates.
#[derive(Clone, Debug)]
pub struct ImageDetections {
    /// The image file.
    pub path: PathBuf,
    /// `(height, width)` of the file.
    pub size: (u32, u32),
    /// The detections.
    pub detections: Detections,
}

/// Image files named by `inputs`: files as given, folders expanded to their images (sorted).
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    let ext = f
                        .extension()
                        .and_then(|e| e.to_str())
                        .unwrap_or("")
                        .to_ascii_lowercase();
                    matches!(ext.as_str(), "jpg" | "jpeg" | "png" | "bmp" | "gif")
                        && !f.to_string_lossy().ends_with(".pred.png")
                })
                .collect();
            v.sort();
            if v.is_empty() {
                bail!("{} holds no image", p.display());
            }
            out.extend(v);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            bail!("{} does not exist", p.display());
        }
    }
    Ok(out)
}

/// Runs the detector on one image file: at its own size, or with its shorter side resized to
/// `size`; boxes come back in the file's pixels.
pub fn detect_file(
    det: &LoadedDetector,
    path: &Path,
    size: Option<u32>,
    opts: &DecodeOptions,
) -> Result<(RgbImage, ImageDetections)> {
    let img = load_rgb(path)?;
    let (w, h) = (img.width(), img.height());
    let (net_img, sy, sx) = match size {
        Some(s) if s.min(w).min(h) > 0 => {
            let k = s as f64 / w.min(h) as f64;
            let (nw, nh) = (
                ((w as f64 * k).round() as u32).max(1),
                ((h as f64 * k).round() as u32).max(1),
            );
            let r = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
            (r, h as f32 / nh as f32, w as f32 / nw as f32)
        }
        _ => (img.clone(), 1.0, 1.0),
    };
    let (nw, nh) = (net_img.width() as usize, net_img.height() as usize);
    let x = Tensor::from_vec(image_to_chw(&net_img), (1, 3, nh, nw), &Device::Cpu)?
        .to_device(&det.device)?;
    let (cls, reg) = det
        .model
        .infer(&x)
        .with_context(|| format!("running the network on {}", path.display()))?;
    let mut d = det
        .encoder
        .decode_tensors(&cls, &reg, (nh, nw), opts)?
        .pop()
        .unwrap_or_default();
    for b in &mut d.boxes {
        *b = [b[0] * sy, b[1] * sx, b[2] * sy, b[3] * sx];
    }
    Ok((
        img,
        ImageDetections {
            path: path.to_path_buf(),
            size: (h, w),
            detections: d,
        },
    ))
}

/// Draws `d` on `img` with class names and scores.
pub fn draw(img: &mut RgbImage, d: &Detections, names: &[String]) {
    draw_detections(img, &d.boxes, &d.labels, Some(&d.scores), names);
}

/// Where `inspect` writes the picture of `input`: `<stem>.pred.png` beside it, or in `out_dir`.
pub fn output_path(input: &Path, out_dir: Option<&Path>) -> PathBuf {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let name = format!("{stem}.pred.png");
    match out_dir {
        Some(d) => d.join(name),
        None => input.with_file_name(name),
    }
}

/// Saves a PNG.
pub fn save(img: &RgbImage, path: &Path) -> Result<()> {
    retinanet_dataset::save_png(img, path)?;
    Ok(())
}
