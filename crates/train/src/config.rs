//! Run configs (TOML). Every key is required and unknown keys are refused, so a typo or a
//! forgotten setting is an error naming the key, never a silent default.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

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
    /// COCO instances JSON files and their image folders.
    Coco {
        train_json: PathBuf,
        train_images: PathBuf,
        eval_json: PathBuf,
        eval_images: PathBuf,
    },
}

/// Detection data settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionDataConfig {
    /// Square training size (e.g. 257; `2^n + 1` puts anchors on the centre).
    pub size: u32,
    /// Square evaluation size.
    pub eval_size: u32,
    /// Boxes of area `<=` this (pixels) after augmentation are dropped.
    pub boxarea_th: f32,
    /// Skip unreadable images (counted and reported) instead of stopping.
    pub skip_bad_images: bool,
    /// The source.
    pub source: DetectionSourceConfig,
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
    /// ResNet depth (18, 34, 50, 101).
    pub depth: usize,
    /// ResNet base width.
    pub base_width: usize,
    /// Data.
    pub data: ClassificationDataConfig,
    /// Training.
    pub train: PretrainTrainConfig,
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
