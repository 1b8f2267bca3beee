//! Run configs (TOML). Every key is required and unknown keys are refused, so a typo or a
//! forgotten setting is an error naming the key, never a silent default — except keys added
//! after the first release, which are optional with the old behaviour as their default, so that
//! older configs and the configs stored in older checkpoints keep loading: `train.sync_bn`,
//! `data.classes`, `data.eval_max_size`, the `[model.anchors]` and `[data.augment]` tables,
//! `eval.mode`, the synthetic source's `min_objects` and `background`, `model.variant`,
//! `model.bn_eps` and `precision`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub use crate::device::Precision;
use crate::schedule::LrSchedule;

/// The extractor and detector architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// ResNet depth: 18, 34, 50 or 101.
    pub depth: usize,
    /// ResNet base width (64 standard; 32 half width).
    pub base_width: usize,
    /// FPN channels (256 in the tutorial).
    pub fpn_channels: usize,
    /// Hidden channels of the heads (256 in the tutorial).
    pub head_channels: usize,
    /// The anchor layout, used alike by the encoder, the decoder and the heads' output count.
    /// Optional (added after the first release): the tutorial's.
    #[serde(default)]
    pub anchors: AnchorsConfig,
    /// The architecture (optional): the tutorial's RetinaNet (default) or torchvision's.
    #[serde(default, skip_serializing_if = "Variant::is_tutorial")]
    pub variant: Variant,
    /// The ResNet's BatchNorm `eps` (optional, PyTorch's 1e-5; torchvision's COCO weights of
    /// `retinanet_resnet50_fpn` expect 0, which `convert import --torchvision` sets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bn_eps: Option<f64>,
}

/// `model.variant`: which RetinaNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// The tutorial's FPN (P3..P6 by default) and heads, its anchors and post-processing.
    #[default]
    Tutorial,
    /// torchvision's `retinanet_resnet50_fpn`: FPN P3..P7 with P6 from P5, heads without
    /// normalisation, its anchors (`[model.anchors]` as `sizes` with `aspect_ratios` and
    /// `scales_per_octave`, sizes truncated as torchvision's), box coder and post-processing.
    TorchvisionV1,
    /// torchvision's `retinanet_resnet50_fpn_v2`: as v1 with P6 from C5 and GroupNorm (32
    /// groups) in the heads.
    TorchvisionV2,
}

impl Variant {
    fn is_tutorial(&self) -> bool {
        *self == Variant::Tutorial
    }

    /// The detector style of the variant.
    pub fn detector_style(&self) -> retinanet_detector::DetectorStyle {
        use retinanet_detector::{DetectorStyle, TvOptions};
        match self {
            Variant::Tutorial => DetectorStyle::Tutorial,
            Variant::TorchvisionV1 => DetectorStyle::Torchvision(TvOptions::V1),
            Variant::TorchvisionV2 => DetectorStyle::Torchvision(TvOptions::V2),
        }
    }

    /// The config value.
    pub fn name(&self) -> &'static str {
        match self {
            Variant::Tutorial => "tutorial",
            Variant::TorchvisionV1 => "torchvision_v1",
            Variant::TorchvisionV2 => "torchvision_v2",
        }
    }

    /// Whether the variant is torchvision's.
    pub fn is_torchvision(&self) -> bool {
        !self.is_tutorial()
    }
}

impl ModelConfig {
    /// The anchor layout of the model: `[model.anchors]` as the variant reads it.
    pub fn anchor_layout(&self) -> Result<retinanet_anchors::AnchorConfig> {
        if !self.variant.is_torchvision() {
            return self.anchors.layout();
        }
        let a = &self.anchors;
        let (Some(sizes), Some(ratios)) = (&a.sizes, &a.aspect_ratios) else {
            bail!(
                "model.variant = torchvision_*: give [model.anchors] as sizes with aspect_ratios (torchvision's: sizes = [32.0, 64.0, 128.0, 256.0, 512.0], aspect_ratios = [0.5, 1.0, 2.0], scales_per_octave = 3, first_stride = 8, levels = 5), not a_hw"
            );
        };
        if a.a_hw.is_some() {
            bail!("model.variant = torchvision_*: [model.anchors] takes sizes, not a_hw");
        }
        if (a.first_stride, a.levels) != (8, 5) {
            bail!(
                "model.variant = torchvision_*: the pyramid is P3..P7, so model.anchors.first_stride = 8 and model.anchors.levels = 5 (not {} and {})",
                a.first_stride,
                a.levels
            );
        }
        if sizes.len() != a.levels {
            bail!(
                "model.anchors.sizes = {sizes:?} has {} values for model.anchors.levels = {}",
                sizes.len(),
                a.levels
            );
        }
        if !(1..=8).contains(&a.scales_per_octave) {
            bail!(
                "model.anchors.scales_per_octave = {}: must lie in 1..=8",
                a.scales_per_octave
            );
        }
        // torchvision's sizes per level: int(size * 2^(k / n)).
        let n = a.scales_per_octave;
        let per_level: Vec<Vec<f64>> = sizes
            .iter()
            .map(|&x| {
                (0..n)
                    .map(|k| (x * (k as f64 / n as f64).exp2()).trunc())
                    .collect()
            })
            .collect();
        retinanet_anchors::AnchorConfig::torchvision(per_level, ratios.clone(), 8).map_err(|e| {
            anyhow::anyhow!(
                "{}",
                e.to_string()
                    .replace("invalid anchor config: ", "model.anchors.")
            )
        })
    }

    /// torchvision's `retinanet_resnet50_fpn` (`v2`: `_v2`) of `depth`: width 64, 256 channels,
    /// its anchors.
    pub fn torchvision(depth: usize, v2: bool, bn_eps: Option<f64>) -> Self {
        Self {
            depth,
            base_width: 64,
            fpn_channels: 256,
            head_channels: 256,
            anchors: AnchorsConfig {
                a_hw: None,
                sizes: Some(vec![32.0, 64.0, 128.0, 256.0, 512.0]),
                aspect_ratios: Some(vec![0.5, 1.0, 2.0]),
                scales_per_octave: 3,
                first_stride: 8,
                levels: 5,
            },
            variant: if v2 {
                Variant::TorchvisionV2
            } else {
                Variant::TorchvisionV1
            },
            bn_eps,
        }
    }
}

/// `[model.anchors]`: the anchor layout. Either `a_hw` (the shapes `[h, w]` of the first level,
/// each level twice the one before: the tutorial's form) or `sizes` (one base size per level,
/// with `aspect_ratios` `h / w`: torchvision's and Detectron2's form); both repeated for
/// `scales_per_octave` steps `2^(k / n)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorsConfig {
    /// Shapes `[h, w]` at the first level (instead of `sizes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a_hw: Option<Vec<[f64; 2]>>,
    /// Base size of each level (instead of `a_hw`; one per level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sizes: Option<Vec<f64>>,
    /// Aspect ratios `h / w` (with `sizes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aspect_ratios: Option<Vec<f64>>,
    /// Octave steps per shape (the tutorial: 1; the RetinaNet paper: 3).
    pub scales_per_octave: usize,
    /// Stride of the first level in pixels: 4 (P2), 8 (P3, the tutorial), 16 or 32.
    pub first_stride: usize,
    /// Pyramid levels (the tutorial: 4, P3..P6; up to P7).
    pub levels: usize,
}

impl Default for AnchorsConfig {
    fn default() -> Self {
        Self {
            a_hw: Some(retinanet_anchors::TUTORIAL_A_HW.to_vec()),
            sizes: None,
            aspect_ratios: None,
            scales_per_octave: 1,
            first_stride: 8,
            levels: 4,
        }
    }
}

impl AnchorsConfig {
    /// The layout as the anchor generator takes it; errors name the key and value.
    pub fn layout(&self) -> Result<retinanet_anchors::AnchorConfig> {
        retinanet_detector::DetectorConfig::levels_for_stride(self.first_stride, self.levels)
            .map_err(|e| {
                anyhow::anyhow!(
                    "model.anchors.first_stride = {} with model.anchors.levels = {}: {e}",
                    self.first_stride,
                    self.levels
                )
            })?;
        if !(1..=8).contains(&self.scales_per_octave) {
            bail!(
                "model.anchors.scales_per_octave = {}: must lie in 1..=8",
                self.scales_per_octave
            );
        }
        let named = |e: retinanet_anchors::AnchorConfigError| {
            anyhow::anyhow!(
                "{}",
                e.to_string()
                    .replace("invalid anchor config: ", "model.anchors.")
            )
        };
        let cfg = match (&self.a_hw, &self.sizes) {
            (Some(_), Some(_)) => bail!(
                "model.anchors has both a_hw and sizes: give the first level's shapes (a_hw) or a size per level with aspect_ratios (sizes), not both"
            ),
            (None, None) => bail!(
                "model.anchors needs a_hw (the first level's shapes [h, w]) or sizes (one per level) with aspect_ratios"
            ),
            (Some(a_hw), None) => {
                if self.aspect_ratios.is_some() {
                    bail!(
                        "model.anchors.aspect_ratios goes with sizes; with a_hw the shapes already set the ratios"
                    );
                }
                if a_hw.is_empty() {
                    bail!("model.anchors.a_hw is empty: give at least one shape [h, w]");
                }
                for (i, hw) in a_hw.iter().enumerate() {
                    if !(hw[0].is_finite() && hw[1].is_finite() && hw[0] > 0.0 && hw[1] > 0.0) {
                        bail!(
                            "model.anchors.a_hw[{i}] = {hw:?}: sides must be finite and > 0 pixels"
                        );
                    }
                }
                let c = retinanet_anchors::AnchorConfig {
                    a_hw: retinanet_anchors::octave_shapes(a_hw, self.scales_per_octave),
                    scales: self.levels,
                    first_stride: self.first_stride,
                    level_scales: None,
                    style: Default::default(),
                };
                c.validate().map_err(named)?;
                c
            }
            (None, Some(sizes)) => {
                let Some(ratios) = &self.aspect_ratios else {
                    bail!("model.anchors.sizes needs aspect_ratios (h / w, e.g. [0.5, 1.0, 2.0])");
                };
                if ratios.is_empty() {
                    bail!("model.anchors.aspect_ratios is empty: give at least one ratio h / w");
                }
                if sizes.len() != self.levels {
                    bail!(
                        "model.anchors.sizes = {sizes:?} has {} values for model.anchors.levels = {}: give one size per level",
                        sizes.len(),
                        self.levels
                    );
                }
                if let Some(w) = sizes.windows(2).find(|w| w[1] < w[0]) {
                    bail!(
                        "model.anchors.sizes = {sizes:?}: sizes must not shrink from level to level ({} then {})",
                        w[0],
                        w[1]
                    );
                }
                retinanet_anchors::AnchorConfig::from_sizes(
                    sizes,
                    ratios,
                    self.scales_per_octave,
                    self.first_stride,
                )
                .map_err(named)?
            }
        };
        if cfg.anchors_per_cell() > 64 {
            bail!(
                "model.anchors: {} anchors per cell (shapes x scales_per_octave): at most 64",
                cfg.anchors_per_cell()
            );
        }
        Ok(cfg)
    }
}

/// Multi-scale training sizes: a list, or a range `{ min, max, step }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MultiScale {
    /// `multi_scale = [321, 385, 449]`.
    Sizes(Vec<u32>),
    /// `multi_scale = { min = 321, max = 449, step = 32 }`.
    Range {
        /// Smallest size.
        min: u32,
        /// Largest size (included when `min + k * step` reaches it).
        max: u32,
        /// Step between sizes.
        step: u32,
    },
}

impl MultiScale {
    /// The sizes, in order.
    pub fn sizes(&self) -> Vec<u32> {
        match self {
            MultiScale::Sizes(v) => v.clone(),
            MultiScale::Range { min, max, step } => {
                (*min..=*max).step_by((*step).max(1) as usize).collect()
            }
        }
    }
}

/// `[data.augment]`: training augmentation. Every key is optional (the table was added after
/// the first release); the defaults are the tutorial's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Probability of a horizontal flip (0.5).
    pub hflip: f64,
    /// Probability of a vertical flip (0).
    pub vflip: f64,
    /// Random turns by multiples of 90 degrees (false).
    pub rot90: bool,
    /// Crop area as a fraction of the image, `[min, max]` (`[0.85, 1.0]`); smaller zooms in.
    pub crop_area: [f64; 2],
    /// Crop aspect ratio range (`[0.75, 1.333...]`).
    pub crop_aspect: [f64; 2],
    /// Brightness jitter in [0, 1] (0).
    pub brightness: f32,
    /// Contrast jitter in [0, 1] (0).
    pub contrast: f32,
    /// Saturation jitter in [0, 1] (0).
    pub saturation: f32,
    /// Hue jitter in [0, 0.5] (0).
    pub hue: f32,
    /// Training sizes drawn per batch instead of `data.size` (none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multi_scale: Option<MultiScale>,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        let a = retinanet_dataset::Augment::default();
        Self {
            hflip: a.hflip,
            vflip: a.vflip,
            rot90: a.rot90,
            crop_area: [a.crop_area.0, a.crop_area.1],
            crop_aspect: [a.crop_aspect.0, a.crop_aspect.1],
            brightness: a.brightness,
            contrast: a.contrast,
            saturation: a.saturation,
            hue: a.hue,
            multi_scale: None,
        }
    }
}

impl AugmentConfig {
    /// The dataset crate's augmentation.
    pub fn augment(&self) -> retinanet_dataset::Augment {
        retinanet_dataset::Augment {
            hflip: self.hflip,
            vflip: self.vflip,
            rot90: self.rot90,
            crop_area: (self.crop_area[0], self.crop_area[1]),
            crop_aspect: (self.crop_aspect[0], self.crop_aspect[1]),
            brightness: self.brightness,
            contrast: self.contrast,
            saturation: self.saturation,
            hue: self.hue,
        }
    }

    /// The multi-scale sizes (empty: `data.size` only).
    pub fn sizes(&self) -> Vec<u32> {
        self.multi_scale
            .as_ref()
            .map_or_else(Vec::new, MultiScale::sizes)
    }
}

/// Most sizes `data.augment.multi_scale` may list (each size keeps its anchors cached).
pub const MAX_TRAIN_SIZES: usize = 32;

impl Validate for AugmentConfig {
    fn validate(&self) -> Result<()> {
        within("data.augment.hflip", self.hflip, 0.0, 1.0)?;
        within("data.augment.vflip", self.vflip, 0.0, 1.0)?;
        let [lo, hi] = self.crop_area;
        if !(lo.is_finite() && hi.is_finite() && 0.0 < lo && lo <= hi && hi <= 1.0) {
            bail!(
                "data.augment.crop_area = [{lo}, {hi}]: must be [min, max] with 0 < min <= max <= 1"
            );
        }
        let [lo, hi] = self.crop_aspect;
        if !(lo.is_finite() && hi.is_finite() && 0.1 <= lo && lo <= hi && hi <= 10.0) {
            bail!(
                "data.augment.crop_aspect = [{lo}, {hi}]: must be [min, max] with 0.1 <= min <= max <= 10"
            );
        }
        for (k, v, hi) in [
            ("brightness", self.brightness, 1.0),
            ("contrast", self.contrast, 1.0),
            ("saturation", self.saturation, 1.0),
            ("hue", self.hue, 0.5),
        ] {
            // f32 values, shown as written.
            if !(v.is_finite() && (0.0..=hi).contains(&v)) {
                bail!("data.augment.{k} = {v}: must lie in [0, {hi}]");
            }
        }
        if let Some(m) = &self.multi_scale {
            if let MultiScale::Range { min, max, step } = m
                && (*step == 0 || min > max)
            {
                bail!(
                    "data.augment.multi_scale = {{ min = {min}, max = {max}, step = {step} }}: needs min <= max and step >= 1"
                );
            }
            let sizes = m.sizes();
            if sizes.is_empty() || sizes.len() > MAX_TRAIN_SIZES {
                bail!(
                    "data.augment.multi_scale gives {} sizes: give 1 to {MAX_TRAIN_SIZES}",
                    sizes.len()
                );
            }
            if let Some(s) = sizes.iter().find(|&&s| !(33..=4096).contains(&s)) {
                bail!("data.augment.multi_scale holds size {s}: sizes must lie in 33..=4096");
            }
        }
        Ok(())
    }
}

/// Where detection data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DetectionSourceConfig {
    /// The built-in synthetic shapes, generated into `cache_dir` on first use.
    Synthetic {
        cache_dir: PathBuf,
        num_train: usize,
        num_eval: usize,
        image_size: u32,
        max_objects: usize,
        /// Side range `[min, max]` of the shapes, in scene pixels.
        object_size: [f32; 2],
        seed: u64,
        /// Fewest objects per scene (optional, 1).
        #[serde(default = "one", skip_serializing_if = "is_one")]
        min_objects: usize,
        /// `plain` (optional, the default data) or `textured` (the small-object mode).
        #[serde(default, skip_serializing_if = "is_plain")]
        background: SyntheticBackground,
    },
    /// The tutorial's list files.
    List {
        train_list: PathBuf,
        eval_list: PathBuf,
        names: PathBuf,
        image_root: PathBuf,
    },
    /// A VOC root (`Annotations/`, `ImageSets/Main/`, `JPEGImages/`).
    Voc {
        root: PathBuf,
        train_split: String,
        eval_split: String,
    },
    /// A YOLO dataset's `data.yaml` (labelling tools' export: `names`, split folders or lists,
    /// `labels/` beside `images/`).
    Yolo {
        data: PathBuf,
        /// The split to train on (`train`).
        #[serde(default = "default_train_split")]
        train_split: String,
        /// The split to evaluate on (`val`).
        #[serde(default = "default_eval_split")]
        eval_split: String,
    },
    /// COCO instances JSON files and their image folders.
    Coco {
        train_json: PathBuf,
        train_images: PathBuf,
        eval_json: PathBuf,
        eval_images: PathBuf,
    },
}

fn default_train_split() -> String {
    "train".into()
}

fn default_eval_split() -> String {
    "val".into()
}

fn one() -> usize {
    1
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

fn is_plain(b: &SyntheticBackground) -> bool {
    *b == SyntheticBackground::Plain
}

/// The synthetic scenes' background.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyntheticBackground {
    /// Flat, gradient, noise or stripes.
    #[default]
    Plain,
    /// Multi-scale noise textures with more clutter (the small-object mode).
    Textured,
}

fn default_eval_max_size() -> u32 {
    1000
}

/// Detection data settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionDataConfig {
    /// Square training size (e.g. 257; `2^n + 1` puts anchors on the centre).
    pub size: u32,
    /// Evaluation size: the shorter side of whole-image evaluation, the square of the centre crop.
    pub eval_size: u32,
    /// The longest side an evaluation image is scaled to (optional, the tutorial's 1000).
    #[serde(default = "default_eval_max_size")]
    pub eval_max_size: u32,
    /// Boxes of area `<=` this (pixels) after augmentation are dropped.
    pub boxarea_th: f32,
    /// Skip unreadable or missing images (each named once, and counted) instead of stopping.
    pub skip_bad_images: bool,
    /// The run's class list, fixed before any split is read: a list of names, or a names file
    /// (one per line). Optional: by default the source's own (its names file, the VOC root's
    /// `classes.txt` or the sorted union of its splits' names, COCO's categories by id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<ClassList>,
    /// Training augmentation (optional table; the tutorial's by default).
    #[serde(default)]
    pub augment: AugmentConfig,
    /// The source.
    pub source: DetectionSourceConfig,
}

/// A class list given in a config: the names, or a file of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClassList {
    /// `classes = ["cat", "dog"]`.
    Names(Vec<String>),
    /// `classes = "names.txt"`.
    File(PathBuf),
}

impl ClassList {
    /// The names, read from the file when it is one.
    pub fn names(&self) -> Result<Vec<String>> {
        Ok(match self {
            ClassList::Names(n) => n.clone(),
            ClassList::File(p) => retinanet_dataset::annotations::read_names(p)
                .with_context(|| format!("data.classes = {}", p.display()))?,
        })
    }
}

/// Detector training settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorTrainConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Encoder IoU thresholds `[lo, hi]`.
    pub iou_th: [f32; 2],
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    /// Keep the extractor's BatchNorm in evaluation mode.
    pub freeze_bn: bool,
    /// Frozen extractor parts: 0 none, 1 stem, k stem + stages 1..k-1.
    pub frozen_stages: usize,
    /// Extractor weights to start from: "" (none), a `pretrain` checkpoint, or a torchvision
    /// / tutorial ResNet state dict (`.pth` or `.safetensors`).
    pub pretrained: String,
    /// Write a checkpoint every this many steps (and at each epoch end).
    pub checkpoint_every: usize,
    /// Stop (with a checkpoint) after this many minutes of training (0: no limit); the run's
    /// total, resumes included (the clock is kept in the checkpoint).
    pub time_limit_minutes: f64,
    /// Learning-rate schedule (boundaries in steps).
    pub lr: LrSchedule,
    /// With several ranks, BatchNorm statistics over the whole global batch (SyncBatchNorm)
    /// rather than each rank's share. Optional (default false), so configs and checkpoints of
    /// earlier versions keep loading.
    #[serde(default)]
    pub sync_bn: bool,
}

/// Evaluation settings of a detector run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorEvalConfig {
    /// Evaluate every this many epochs (0: only at the end).
    pub every_epochs: usize,
    /// Decode score threshold.
    pub score_th: f32,
    /// NMS IoU threshold.
    pub nms_th: f32,
    /// One NMS over all classes (the tutorial) rather than per class.
    pub class_agnostic: bool,
    /// Candidates kept per level before NMS (0: all).
    pub pre_nms_top_k: usize,
    /// Detections kept per image (0: all).
    pub max_detections: usize,
    /// Evaluation images (0: the whole split).
    pub max_images: usize,
    /// `whole` (each image whole, shorter side to `data.eval_size`, scored in its own pixels)
    /// or `center_crop` (the tutorial's). Optional: `whole`.
    #[serde(default)]
    pub mode: EvalMode,
}

/// How evaluation images are made (see [`DetectorEvalConfig::mode`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalMode {
    /// The whole image: no object is cut away, boxes reported in the image's own pixels.
    #[default]
    Whole,
    /// The tutorial's centre crop at `eval_size` (objects outside it are not scored).
    CenterCrop,
}

/// A `train-detector` run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorRunConfig {
    /// Run name: the run folder is `runs/<name>`.
    pub name: String,
    /// Seed of initialisation, shuffling and augmentation.
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The arithmetic of convolutions and products (optional, `"f32"`; see [`Precision`]).
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// Architecture.
    pub model: ModelConfig,
    /// Data.
    pub data: DetectionDataConfig,
    /// Training.
    pub train: DetectorTrainConfig,
    /// Evaluation.
    pub eval: DetectorEvalConfig,
}

/// Where classification data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClassificationSourceConfig {
    /// The built-in synthetic shapes (one shape per image).
    Synthetic {
        cache_dir: PathBuf,
        num_train: usize,
        num_eval: usize,
        image_size: u32,
        seed: u64,
    },
    /// `root/<class>/<image>` folders.
    ImageFolder {
        train_root: PathBuf,
        eval_root: PathBuf,
    },
    /// The CIFAR-10 binary folder (`data_batch_*.bin`, `test_batch.bin`).
    Cifar10 { dir: PathBuf },
    /// The MNIST idx folder.
    Mnist { dir: PathBuf },
}

/// Pretraining data settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassificationDataConfig {
    /// Square input size.
    pub size: u32,
    /// Skip unreadable images (counted and reported) instead of stopping.
    pub skip_bad_images: bool,
    /// The source.
    pub source: ClassificationSourceConfig,
}

/// Pretraining settings (the tutorial counts steps, not epochs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainTrainConfig {
    /// Total optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Images per evaluation batch.
    pub eval_batch_size: usize,
    /// Evaluate on one evaluation batch every this many steps.
    pub eval_every: usize,
    /// Write a checkpoint every this many steps.
    pub checkpoint_every: usize,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Stop (with a checkpoint) after this many minutes (0: no limit); the run's total, resumes
    /// included.
    pub time_limit_minutes: f64,
    /// Learning-rate schedule.
    pub lr: LrSchedule,
    /// With several ranks, BatchNorm statistics over the whole global batch (SyncBatchNorm).
    /// Optional (default false).
    #[serde(default)]
    pub sync_bn: bool,
}

/// A `pretrain` run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainRunConfig {
    /// Run name: the run folder is `runs/<name>`.
    pub name: String,
    /// Seed.
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The arithmetic of convolutions and products (optional, `"f32"`; see [`Precision`]).
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// ResNet depth (18, 34, 50, 101).
    pub depth: usize,
    /// ResNet base width.
    pub base_width: usize,
    /// Data.
    pub data: ClassificationDataConfig,
    /// Training.
    pub train: PretrainTrainConfig,
}

/// A config checked for the meaning of its values, not only their types: each refusal names the
/// key, its value and what is allowed.
pub trait Validate {
    /// Checks every value.
    fn validate(&self) -> Result<()>;
}

fn at_least<T: PartialOrd + std::fmt::Display>(key: &str, v: T, min: T) -> Result<()> {
    if v < min {
        bail!("{key} = {v}: must be at least {min}");
    }
    Ok(())
}

/// `v` in `[lo, hi]` (and finite).
fn within(key: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    if !(v.is_finite() && v >= lo && v <= hi) {
        bail!("{key} = {v}: must lie in [{lo}, {hi}]");
    }
    Ok(())
}

fn non_negative(key: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("{key} = {v}: must be a finite number >= 0");
    }
    Ok(())
}

fn depth_ok(key: &str, depth: usize) -> Result<()> {
    depth_of(depth)
        .map(|_| ())
        .map_err(|_| anyhow::anyhow!("{key} = {depth}: use 18, 34, 50 or 101"))
}

fn path_set(key: &str, p: &Path) -> Result<()> {
    if p.as_os_str().is_empty() {
        bail!("{key} is empty: name a file or folder");
    }
    Ok(())
}

/// Refuses a training batch whose activations cannot fit in this machine's memory (a typo such
/// as `size = 12900` would otherwise make the process allocate for minutes and abort). The
/// estimate is deliberately low (input plus roughly what the stem and first stage keep for the
/// backward pass), so a run it lets through may still need more.
fn fits_in_memory(what: &str, batch: usize, size: u32, base_width: usize) -> Result<()> {
    let Some(avail) = available_memory() else {
        return Ok(());
    };
    let px = batch as f64 * size as f64 * size as f64;
    // Input (3 floats) plus ~4 stem-sized maps of base_width/4 channels per input pixel.
    let need = px * 4.0 * (3.0 + base_width as f64);
    if need > avail as f64 {
        bail!(
            "{what}: a batch needs at least {:.1} GB for its activations, this machine has {:.1} GB available: lower the size or the batch",
            need / 1e9,
            avail as f64 / 1e9
        );
    }
    Ok(())
}

/// Bytes of memory available to new allocations (Linux `MemAvailable`), if known.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Validate for LrSchedule {
    fn validate(&self) -> Result<()> {
        LrSchedule::validate(self).map_err(|e| anyhow::anyhow!("train.lr.{e}"))
    }
}

impl Validate for ModelConfig {
    fn validate(&self) -> Result<()> {
        depth_ok("model.depth", self.depth)?;
        at_least("model.base_width", self.base_width, 1)?;
        at_least("model.fpn_channels", self.fpn_channels, 1)?;
        at_least("model.head_channels", self.head_channels, 1)?;
        if let Some(e) = self.bn_eps
            && !(e.is_finite() && (0.0..=1.0).contains(&e))
        {
            bail!("model.bn_eps = {e}: must lie in [0, 1]");
        }
        if self.variant.is_torchvision() {
            if self.head_channels != self.fpn_channels {
                bail!(
                    "model.head_channels = {} with model.variant = torchvision_*: torchvision's heads run at the FPN's width, so it must equal model.fpn_channels = {}",
                    self.head_channels,
                    self.fpn_channels
                );
            }
            if self.variant == Variant::TorchvisionV2 && !self.fpn_channels.is_multiple_of(32) {
                bail!(
                    "model.fpn_channels = {} with model.variant = torchvision_v2: its GroupNorm has 32 groups, so a multiple of 32",
                    self.fpn_channels
                );
            }
        }
        self.anchor_layout().map(|_| ())
    }
}

impl Validate for DetectionSourceConfig {
    fn validate(&self) -> Result<()> {
        match self {
            DetectionSourceConfig::Synthetic {
                cache_dir,
                num_train,
                num_eval,
                image_size,
                max_objects,
                object_size,
                min_objects,
                ..
            } => {
                path_set("data.source.cache_dir", cache_dir)?;
                at_least("data.source.num_train", *num_train, 1)?;
                at_least("data.source.num_eval", *num_eval, 1)?;
                at_least("data.source.image_size", *image_size, 16)?;
                at_least("data.source.max_objects", *max_objects, 1)?;
                if !(1..=*max_objects).contains(min_objects) {
                    bail!(
                        "data.source.min_objects = {min_objects}: must lie in 1..=max_objects ({max_objects})"
                    );
                }
                let [lo, hi] = *object_size;
                if !(lo.is_finite()
                    && hi.is_finite()
                    && lo >= 2.0
                    && lo <= hi
                    && hi <= *image_size as f32)
                {
                    bail!(
                        "data.source.object_size = [{lo}, {hi}]: must be [min, max] with 2 <= min <= max <= image_size ({image_size})"
                    );
                }
            }
            DetectionSourceConfig::List {
                train_list,
                eval_list,
                names,
                image_root,
            } => {
                path_set("data.source.train_list", train_list)?;
                path_set("data.source.eval_list", eval_list)?;
                path_set("data.source.names", names)?;
                path_set("data.source.image_root", image_root)?;
            }
            DetectionSourceConfig::Voc {
                root,
                train_split,
                eval_split,
            } => {
                path_set("data.source.root", root)?;
                if train_split.trim().is_empty() || eval_split.trim().is_empty() {
                    bail!(
                        "data.source.train_split and eval_split must name splits (e.g. \"trainval\", \"test\")"
                    );
                }
            }
            DetectionSourceConfig::Yolo {
                data,
                train_split,
                eval_split,
            } => {
                path_set("data.source.data", data)?;
                for (k, v) in [("train_split", train_split), ("eval_split", eval_split)] {
                    if !["train", "val", "test"].contains(&v.as_str()) {
                        bail!("data.source.{k} = {v:?}: use \"train\", \"val\" or \"test\"");
                    }
                }
            }
            DetectionSourceConfig::Coco {
                train_json,
                train_images,
                eval_json,
                eval_images,
            } => {
                path_set("data.source.train_json", train_json)?;
                path_set("data.source.train_images", train_images)?;
                path_set("data.source.eval_json", eval_json)?;
                path_set("data.source.eval_images", eval_images)?;
            }
        }
        Ok(())
    }
}

impl Validate for DetectorRunConfig {
    fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let d = &self.data;
        at_least("data.size", d.size, 33)?;
        at_least("data.eval_size", d.eval_size, 33)?;
        if d.eval_max_size < d.eval_size {
            bail!(
                "data.eval_max_size = {}: must be at least data.eval_size ({})",
                d.eval_max_size,
                d.eval_size
            );
        }
        d.augment.validate()?;
        if self.model.variant.is_torchvision() {
            // torchvision pads every input to a multiple of 32 and lays its P6 / P7 anchors out
            // by the padded size: training items of such sizes need no padding and see the
            // anchors evaluation uses.
            let mut sizes = vec![("data.size", d.size)];
            if let Some(m) = &d.augment.multi_scale {
                sizes.extend(
                    m.sizes()
                        .into_iter()
                        .map(|s| ("data.augment.multi_scale", s)),
                );
            }
            if let Some((k, s)) = sizes.into_iter().find(|(_, s)| s % 32 != 0) {
                bail!(
                    "{k} = {s} with model.variant = {}: training sizes must be multiples of 32 (torchvision pads its inputs to them)",
                    self.model.variant.name()
                );
            }
        }
        if let Some(ClassList::Names(n)) = &d.classes {
            if n.is_empty() || n.iter().any(|c| c.trim().is_empty()) {
                bail!("data.classes = {n:?}: must name at least one class, none empty");
            }
            let mut sorted = n.clone();
            sorted.sort();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                bail!("data.classes names `{}` twice", w[0]);
            }
        }
        non_negative("data.boxarea_th", d.boxarea_th as f64)?;
        d.source.validate()?;
        let t = &self.train;
        at_least("train.epochs", t.epochs, 1)?;
        at_least("train.batch_size", t.batch_size, 1)?;
        let [lo, hi] = t.iou_th;
        if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi && hi <= 1.0) {
            bail!("train.iou_th = [{lo}, {hi}]: must be [low, high] with 0 <= low <= high <= 1");
        }
        if !(t.momentum.is_finite() && (0.0..1.0).contains(&t.momentum)) {
            bail!("train.momentum = {}: must lie in [0, 1)", t.momentum);
        }
        non_negative("train.weight_decay", t.weight_decay)?;
        non_negative("train.grad_clip", t.grad_clip)?;
        if t.frozen_stages > 5 {
            bail!(
                "train.frozen_stages = {}: must lie in 0..=5",
                t.frozen_stages
            );
        }
        at_least("train.checkpoint_every", t.checkpoint_every, 1)?;
        non_negative("train.time_limit_minutes", t.time_limit_minutes)?;
        Validate::validate(&t.lr)?;
        let e = &self.eval;
        within("eval.score_th", e.score_th as f64, 0.0, 1.0)?;
        within("eval.nms_th", e.nms_th as f64, 0.0, 1.0)?;
        let largest = d.augment.sizes().into_iter().fold(d.size, u32::max);
        fits_in_memory(
            &format!(
                "data.size = {} (largest training size {largest}) with train.batch_size = {}",
                d.size, t.batch_size
            ),
            t.batch_size,
            largest,
            self.model.base_width,
        )?;
        fits_in_memory(
            &format!("data.eval_size = {}", d.eval_size),
            t.batch_size.min(32),
            d.eval_size,
            self.model.base_width,
        )
    }
}

impl Validate for PretrainRunConfig {
    fn validate(&self) -> Result<()> {
        depth_ok("depth", self.depth)?;
        at_least("base_width", self.base_width, 1)?;
        at_least("data.size", self.data.size, 32)?;
        if let ClassificationSourceConfig::Synthetic {
            cache_dir,
            num_train,
            num_eval,
            image_size,
            ..
        } = &self.data.source
        {
            path_set("data.source.cache_dir", cache_dir)?;
            at_least("data.source.num_train", *num_train, 1)?;
            at_least("data.source.num_eval", *num_eval, 1)?;
            at_least("data.source.image_size", *image_size, 16)?;
        }
        let t = &self.train;
        at_least("train.steps", t.steps, 1)?;
        at_least("train.batch_size", t.batch_size, 1)?;
        at_least("train.eval_batch_size", t.eval_batch_size, 1)?;
        at_least("train.eval_every", t.eval_every, 1)?;
        at_least("train.checkpoint_every", t.checkpoint_every, 1)?;
        if !(t.momentum.is_finite() && (0.0..1.0).contains(&t.momentum)) {
            bail!("train.momentum = {}: must lie in [0, 1)", t.momentum);
        }
        non_negative("train.weight_decay", t.weight_decay)?;
        non_negative("train.time_limit_minutes", t.time_limit_minutes)?;
        Validate::validate(&t.lr)?;
        fits_in_memory(
            &format!(
                "data.size = {} with train.batch_size = {}",
                self.data.size, t.batch_size
            ),
            t.batch_size.max(t.eval_batch_size),
            self.data.size,
            self.base_width,
        )
    }
}

/// Reads a TOML config; errors name the file, the key and the line.
pub fn read_config<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    parse_config(&text).with_context(|| format!("config {}", path.display()))
}

/// Parses a TOML config from text.
pub fn parse_config<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
}

/// The config as TOML text (stored in checkpoints and run folders).
pub fn to_toml<T: Serialize>(cfg: &T) -> Result<String> {
    Ok(toml::to_string_pretty(cfg)?)
}

impl ModelConfig {
    /// The extractor depth as the model crate's enum.
    pub fn depth(&self) -> Result<retinanet_extractor::Depth> {
        depth_of(self.depth)
    }
}

/// ResNet depth from its layer count.
pub fn depth_of(n: usize) -> Result<retinanet_extractor::Depth> {
    match retinanet_extractor::Depth::from_layers(n) {
        Some(d) => Ok(d),
        None => bail!("depth = {n}: use 18, 34, 50 or 101"),
    }
}

/// The built-in default `train-detector` config (also `configs/default.toml`).
pub const DEFAULT_DETECTOR_TOML: &str = include_str!("../../../configs/default.toml");
/// The built-in default `pretrain` config (also `configs/pretrain-default.toml`).
pub const DEFAULT_PRETRAIN_TOML: &str = include_str!("../../../configs/pretrain-default.toml");
