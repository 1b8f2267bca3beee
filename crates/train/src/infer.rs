//! Inference on image files: preprocess, run, decode, map boxes back, draw.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use image::RgbImage;
use retinanet_dataset::imageops::image_to_chw;
use retinanet_dataset::{
    DetectionDataset, DetectionLoader, DetectionTransform, LoaderConfig, draw_detections, load_rgb,
};
use retinanet_detector::RetinaNet;
use retinanet_encoder::{DecodeOptions, Detections, Encoder, Postprocess};
use retinanet_eval::{Evaluator, Report};
use serde::{Deserialize, Serialize};

use crate::config::{DetectorEvalConfig, DetectorRunConfig, EvalMode};
use crate::detect::{LoadedDetector, decode_options};
use crate::progress::Progress;

/// The transform evaluation makes its images with (`eval.mode`): the whole image with its
/// shorter side at `data.eval_size` (the longer at most `data.eval_max_size`), or the tutorial's
/// centre crop.
pub fn eval_transform(cfg: &DetectorRunConfig) -> DetectionTransform {
    let d = &cfg.data;
    match cfg.eval.mode {
        EvalMode::Whole => whole_image_transform(cfg, d.eval_size, d.eval_max_size, d.boxarea_th),
        EvalMode::CenterCrop => DetectionTransform {
            max_size: d.eval_max_size,
            ..DetectionTransform::eval(d.eval_size, d.boxarea_th)
        },
    }
}

/// The whole-image transform of `cfg`'s model at `size` (the shorter side) and `max_size`:
/// torchvision's models see the images torchvision's transform makes.
fn whole_image_transform(
    cfg: &DetectorRunConfig,
    size: u32,
    max_size: u32,
    boxarea_th: f32,
) -> DetectionTransform {
    if cfg.model.variant.is_torchvision() {
        DetectionTransform::torchvision(size, max_size, boxarea_th)
    } else {
        DetectionTransform::whole(size, max_size, boxarea_th)
    }
}

/// The loader evaluation reads a split with: in order, made by [`eval_transform`], unreadable
/// images skipped (and reported by the loader) with `data.skip_bad_images`.
pub fn eval_loader(dataset: DetectionDataset, cfg: &DetectorRunConfig) -> Result<DetectionLoader> {
    let lc = LoaderConfig {
        shuffle: false,
        skip_bad: cfg.data.skip_bad_images,
        ..LoaderConfig::new(cfg.train.batch_size.clamp(1, 32), cfg.seed)
    };
    Ok(DetectionLoader::new(dataset, eval_transform(cfg), lc)?)
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
    Ok(evaluate_loader_results(model, encoder, loader, cfg, device, quiet)?.0)
}

/// [`evaluate_loader`], with each image's result (ground truth and detections, by index).
pub fn evaluate_loader_results(
    model: &RetinaNet,
    encoder: &Encoder,
    loader: &DetectionLoader,
    cfg: &DetectorRunConfig,
    device: &Device,
    quiet: bool,
) -> Result<(Report, Vec<ImageResult>)> {
    let dataset = loader.dataset();
    let n = match cfg.eval.max_images {
        0 => dataset.len(),
        m => m.min(dataset.len()),
    };
    let mut progress = Progress::new("eval", n as u64, quiet);
    let mut results = detect_loader(model, encoder, loader, cfg, device, n, 0, &mut progress)?;
    progress.finish();
    let report = score(&mut results, dataset.class_names())?;
    Ok((report, results))
}

/// One evaluation image: its ground truth and detections, as evaluation scores them (and as a
/// rank of a data-parallel run sends them to rank 0). In whole-image evaluation both are in the
/// image file's own pixels and the ground truth is the split's, every box; with the centre
/// crop, in the crop's pixels, boxes outside it gone.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageResult {
    /// The image's index in its split.
    pub index: usize,
    /// Ground-truth boxes.
    pub gt_boxes: Vec<[f32; 4]>,
    /// Their labels.
    pub gt_labels: Vec<u32>,
    /// Detected boxes.
    pub boxes: Vec<[f32; 4]>,
    /// Their labels.
    pub labels: Vec<u32>,
    /// Their scores.
    pub scores: Vec<f32>,
}

impl ImageResult {
    /// The detections alone.
    pub fn detections(&self) -> Detections {
        Detections {
            boxes: self.boxes.clone(),
            labels: self.labels.clone(),
            scores: self.scores.clone(),
        }
    }
}

/// Runs `model` on the batches of `loader` up to `limit` images: each image's ground truth and
/// detections, its index being its dataset index plus `offset`.
///
/// Whole-image batches hold images of several sizes on one canvas: each run of equal sizes goes
/// through the network cut to its own size, so an image's detections never depend on the
/// images batched with it (and equal [`detect_file`]'s for the same file).
#[allow(clippy::too_many_arguments)]
pub fn detect_loader(
    model: &RetinaNet,
    encoder: &Encoder,
    loader: &DetectionLoader,
    cfg: &DetectorRunConfig,
    device: &Device,
    limit: usize,
    offset: usize,
    progress: &mut Progress,
) -> Result<Vec<ImageResult>> {
    let opts = decode_options(&cfg.eval);
    let whole = loader.source().transform.item_size_varies();
    let dataset = loader.dataset();
    let mut results = Vec::with_capacity(limit);
    // BatchNorm folded once for all batches.
    let model = &model.for_inference()?;
    for batch in loader.epoch(0) {
        let batch = batch?;
        let n = batch.indices.len().min(limit - results.len());
        let mut k = 0;
        while k < n {
            // A run of images of one size.
            let size = batch.sizes[k];
            let end = (k..n).find(|&j| batch.sizes[j] != size).unwrap_or(n);
            let images = crop_canvas(&batch.images, k, end - k, size)?;
            let dets = run_network(model, encoder, &images, device, &opts)?;
            for (j, d) in (k..end).zip(dets) {
                let (gt_boxes, gt_labels, d) = if whole {
                    let r = dataset.get(batch.indices[j]);
                    let src = batch.source_sizes[j];
                    (
                        clamp_to(&r.boxes, src),
                        r.labels.clone(),
                        to_source_for(encoder, d, size, src),
                    )
                } else {
                    (batch.boxes[j].clone(), batch.labels[j].clone(), d)
                };
                results.push(ImageResult {
                    index: offset + batch.indices[j],
                    gt_boxes,
                    gt_labels,
                    boxes: d.boxes.into_iter().map(collapse_inverted).collect(),
                    labels: d.labels,
                    scores: d.scores,
                });
            }
            k = end;
        }
        progress.inc(batch.indices.len() as u64, "");
        if results.len() == limit {
            break;
        }
    }
    Ok(results)
}

/// Images `start..start + n` of a `[B, 3, H, W]` canvas, cut to their `(h, w)`.
fn crop_canvas(images: &Tensor, start: usize, n: usize, (h, w): (usize, usize)) -> Result<Tensor> {
    let (b, _, ch, cw) = images.dims4()?;
    if (start, n, h, w) == (0, b, ch, cw) {
        return Ok(images.clone());
    }
    Ok(images
        .narrow(0, start, n)?
        .narrow(2, 0, h)?
        .narrow(3, 0, w)?
        .contiguous()?)
}

/// The network and the decoder on images `[n, 3, h, w]` of one size: detections in the input's
/// pixels.
fn run_network(
    model: &RetinaNet,
    encoder: &Encoder,
    images: &Tensor,
    device: &Device,
    opts: &DecodeOptions,
) -> Result<Vec<Detections>> {
    let (n, _, h, w) = images.dims4()?;
    if encoder.config().postprocess != Postprocess::Torchvision {
        let (cls, reg) = model.infer(&images.to_device(device)?)?;
        return Ok(encoder.decode_tensors(&cls, &reg, (h, w), opts)?);
    }
    // torchvision pads a batch with zeros (after normalisation) to a multiple of 32 and clips
    // the boxes to each image's own part.
    let (ph, pw) = (h.div_ceil(32) * 32, w.div_ceil(32) * 32);
    let x = images
        .to_device(device)?
        .pad_with_zeros(2, 0, ph - h)?
        .pad_with_zeros(3, 0, pw - w)?;
    let (cls, reg) = model.infer(&x)?;
    Ok(encoder.decode_tensors_valid(&cls, &reg, (ph, pw), &vec![(h, w); n], opts)?)
}

/// [`to_source`], or for torchvision's models its `resize_boxes`: coordinates times
/// `source / input` (f32) per axis, continuous boxes.
pub fn to_source_for(
    encoder: &Encoder,
    mut d: Detections,
    input: (usize, usize),
    source: (usize, usize),
) -> Detections {
    if encoder.config().postprocess != Postprocess::Torchvision {
        return to_source(d, input, source);
    }
    let ry = source.0 as f32 / input.0 as f32;
    let rx = source.1 as f32 / input.1 as f32;
    for b in &mut d.boxes {
        *b = [b[0] * ry, b[1] * rx, b[2] * ry, b[3] * rx];
    }
    d
}

/// Detections on an input of `input` `(h, w)` made from an image of `source` `(H, W)`, back in
/// the image's pixels: the exact inverse of the box mapping of the transforms (a box covers
/// the pixels `min..=max`, the extent `[min, max + 1)`, which scales), clamped to the image.
pub fn to_source(mut d: Detections, input: (usize, usize), source: (usize, usize)) -> Detections {
    let sy = source.0 as f32 / input.0 as f32;
    let sx = source.1 as f32 / input.1 as f32;
    if (sy, sx) == (1.0, 1.0) {
        return d;
    }
    let (hmax, wmax) = (source.0 as f32 - 1.0, source.1 as f32 - 1.0);
    for b in &mut d.boxes {
        *b = [
            (b[0] * sy).clamp(0.0, hmax),
            (b[1] * sx).clamp(0.0, wmax),
            ((b[2] + 1.0) * sy - 1.0).clamp(0.0, hmax),
            ((b[3] + 1.0) * sx - 1.0).clamp(0.0, wmax),
        ];
    }
    d
}

/// Ground-truth boxes clamped to an image of `(H, W)` (none dropped).
fn clamp_to(boxes: &[[f32; 4]], (h, w): (usize, usize)) -> Vec<[f32; 4]> {
    let (hmax, wmax) = (h as f32 - 1.0, w as f32 - 1.0);
    boxes
        .iter()
        .map(|b| {
            [
                b[0].clamp(0.0, hmax),
                b[1].clamp(0.0, wmax),
                b[2].clamp(0.0, hmax),
                b[3].clamp(0.0, wmax),
            ]
        })
        .collect()
}

/// The VOC and COCO-style report of `results`, scored in index order (the order of the split,
/// whichever ranks produced them).
pub fn score(results: &mut [ImageResult], class_names: &[String]) -> Result<Report> {
    results.sort_by_key(|r| r.index);
    let mut ev = Evaluator::new(class_names.to_vec());
    for r in results.iter() {
        ev.add_image(
            &r.gt_boxes,
            &r.gt_labels,
            None,
            &r.boxes,
            &r.labels,
            &r.scores,
        )?;
    }
    Ok(ev.finish())
}

/// The decoder clamps as the tutorial does (top-left corner at 0, bottom-right at H-1, W-1),
/// which leaves a box lying wholly off one side of the image inverted. Such a detection is
/// kept — it is a false positive — collapsed onto the border, where it overlaps nothing.
fn collapse_inverted([y0, x0, y1, x1]: [f32; 4]) -> [f32; 4] {
    [y0.min(y1), x0.min(x1), y1, x1]
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

/// The size `inspect` runs an image at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageScale {
    /// As the run's evaluation does: shorter side to `data.eval_size`, longer side at most
    /// `data.eval_max_size` (so `inspect` and `evaluate` agree on an image).
    Evaluation,
    /// Shorter side to this many pixels (longer at most `data.eval_max_size`).
    Shorter(u32),
    /// The image's own size (the tutorial's inspect).
    Own,
}

/// Runs the detector on one image file at `scale`; boxes come back in the file's pixels.
pub fn detect_file(
    det: &LoadedDetector,
    path: &Path,
    scale: ImageScale,
    opts: &DecodeOptions,
) -> Result<(RgbImage, ImageDetections)> {
    let img = load_rgb(path)?;
    let (w, h) = (img.width(), img.height());
    let d = &det.config.data;
    let transform = match scale {
        ImageScale::Evaluation => Some(whole_image_transform(
            &det.config,
            d.eval_size,
            d.eval_max_size,
            0.0,
        )),
        ImageScale::Shorter(s) => Some(whole_image_transform(
            &det.config,
            s,
            d.eval_max_size.max(s),
            0.0,
        )),
        ImageScale::Own => None,
    };
    // The pixels evaluation makes from this image, by the same code.
    let ((nh, nw), chw) = match transform {
        Some(t) => {
            let (nh, nw) = t.output_size(w, h);
            let mut out = vec![0f32; 3 * nh * nw];
            t.apply_into(
                &img,
                &[],
                &[],
                &mut retinanet_dataset::loader::item_rng(0, 0, 0),
                &mut out,
            );
            ((nh, nw), out)
        }
        None => ((h as usize, w as usize), image_to_chw(&img)),
    };
    let x = Tensor::from_vec(chw, (1, 3, nh, nw), &Device::Cpu)?;
    let d = run_network(&det.model, &det.encoder, &x, &det.device, opts)
        .with_context(|| format!("running the network on {}", path.display()))?
        .pop()
        .unwrap_or_default();
    let d = to_source_for(&det.encoder, d, (nh, nw), (h as usize, w as usize));
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

/// The COCO ids of the images and classes a run writes results for.
#[derive(Clone, Debug)]
pub struct CocoIds {
    /// Per input image.
    pub images: Vec<u64>,
    /// Per label `1..=C`.
    pub categories: Vec<u64>,
    /// Boxes are continuous (torchvision's: width `x1 - x0`), not this project's inclusive
    /// pixel boxes (width `x1 - x0 + 1`).
    pub continuous: bool,
}

impl CocoIds {
    /// Images numbered `1..=n` and categories by label (no instances file to match).
    pub fn numbered(n: usize, classes: usize) -> Self {
        Self {
            images: (1..=n as u64).collect(),
            categories: (1..=classes as u64).collect(),
            continuous: false,
        }
    }

    /// The ids for `det`'s detections on `images`: from the instances file `gt` when given
    /// (else numbered). torchvision's COCO models (its 91 labels) use their labels as COCO's
    /// category ids, and their boxes are continuous.
    pub fn for_model(det: &LoadedDetector, gt: Option<&Path>, images: &[PathBuf]) -> Result<Self> {
        let tv_coco = det.config.model.variant.is_torchvision()
            && det.class_names.len() == crate::interop::TORCHVISION_COCO_CATEGORIES.len()
            && det
                .class_names
                .iter()
                .zip(crate::interop::TORCHVISION_COCO_CATEGORIES)
                .all(|(a, b)| a == b);
        let mut ids = match gt {
            Some(gt) if tv_coco => Self {
                categories: (0..det.class_names.len() as u64).collect(),
                ..Self::from_instances(gt, images, &[])?
            },
            Some(gt) => Self::from_instances(gt, images, &det.class_names)?,
            None if tv_coco => Self {
                categories: (0..det.class_names.len() as u64).collect(),
                ..Self::numbered(images.len(), 0)
            },
            None => Self::numbered(images.len(), det.class_names.len()),
        };
        ids.continuous = det.config.model.variant.is_torchvision();
        Ok(ids)
    }

    /// The ids of an instances file: each image by its file name (or its last component, when
    /// unique there), each class by name; a miss is an error naming it and the file.
    pub fn from_instances(gt: &Path, images: &[PathBuf], class_names: &[String]) -> Result<Self> {
        let coco = retinanet_eval::coco_results::CocoGroundTruth::read(gt)?;
        let images = images
            .iter()
            .map(|p| {
                let s = p.to_string_lossy();
                coco.image_id(&s).with_context(|| {
                    format!(
                        "image {s} is not in {} (matched by file name)",
                        gt.display()
                    )
                })
            })
            .collect::<Result<_>>()?;
        let categories = class_names
            .iter()
            .map(|n| {
                coco.category_id(n)
                    .with_context(|| format!("class {n:?} is not a category of {}", gt.display()))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            images,
            categories,
            continuous: false,
        })
    }

    /// The results entries of image `k`'s detections.
    pub fn results(
        &self,
        k: usize,
        d: &Detections,
    ) -> Vec<retinanet_eval::coco_results::CocoDetection> {
        (0..d.len())
            .map(|i| {
                let mut c = retinanet_eval::coco_results::CocoDetection::from_yxyx(
                    self.images[k],
                    self.categories[d.labels[i] as usize - 1],
                    &d.boxes[i],
                    d.scores[i],
                );
                if self.continuous {
                    let b = &d.boxes[i];
                    c.bbox[2] = (b[3] as f64 - b[1] as f64).max(0.0);
                    c.bbox[3] = (b[2] as f64 - b[0] as f64).max(0.0);
                }
                c
            })
            .collect()
    }
}
