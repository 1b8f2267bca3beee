//! Datasets for the RetinaNet re-implementation: the tutorial's list files, VOC and COCO
//! annotations, ImageFolder / CIFAR-10 / MNIST for pretraining, the tutorial's augmentations,
//! a seeded parallel prefetching loader, synthetic shapes (the built-in default data) and
//! drawing of detections.
//!
//! Entry points:
//! - detection: [`DetectionDataset`] (`from_list`, `from_voc`, `from_coco`), [`DetectionTransform`]
//!   (`train`, `eval`), [`DetectionLoader`] yielding [`DetectionBatch`];
//! - classification: [`ClassificationDataset`] (`from_image_folder`, `from_cifar10_dir`,
//!   `from_mnist_dir`), [`ClassificationTransform`], [`ClassificationLoader`] yielding
//!   [`ClassificationBatch`];
//! - [`synthetic::ensure_detection`] / [`synthetic::ensure_classification`]: the default data;
//! - [`load_image_for_inference`], [`draw::draw_detections`], [`draw::save_png`];
//! - converters [`voc_to_list`], [`coco_to_list`]; [`tune_allocator`] for large batches.
//!
//! Conventions: a box is `[ymin, xmin, ymax, xmax]` in pixels (f32, maxima inclusive, as the
//! tutorial's VOC converter writes them); detection labels are `1..=C` in names-file order;
//! images become `[3, H, W]` f32 RGB normalised with the ImageNet mean and std.
//!
//! ```
//! use retinanet_dataset::{DetectionDataset, DetectionLoader, DetectionTransform, LoaderConfig};
//! use retinanet_dataset::synthetic::{self, SyntheticConfig};
//!
//! let cache = std::env::temp_dir().join(format!("retinanet-doc-{}", std::process::id()));
//! let cfg = SyntheticConfig { num_train: 8, num_eval: 4, ..Default::default() };
//! let paths = synthetic::ensure_detection(&cache, &cfg).unwrap();
//! let ds = DetectionDataset::from_list(&paths.train_list, &paths.names_file, &paths.image_root).unwrap();
//! assert_eq!(ds.class_names().len(), 4);
//! let loader = DetectionLoader::new(ds, DetectionTransform::train(129, 25.0), LoaderConfig::new(4, 7)).unwrap();
//! let batch = loader.epoch(0).next().unwrap().unwrap();
//! assert_eq!(batch.images.dims(), &[4, 3, 129, 129]);
//! assert_eq!(batch.boxes.len(), 4);
//! std::fs::remove_dir_all(&cache).unwrap();
//! ```

#![warn(missing_docs)]

pub mod annotations;
pub mod classification;
pub mod detection;
pub mod draw;
pub mod error;
pub mod imageops;
pub mod loader;
pub mod synthetic;
pub mod transform;
pub mod yolo;

pub use annotations::{
    DetectionRecord, VOC_CLASSES, box_problem, coco_to_list, read_coco, read_coco_files, read_list,
    read_list_lines, read_names, read_voc, read_voc_splits, strip_bom, voc_classes_file,
    voc_to_list,
};
pub use classification::{ClassificationBatch, ClassificationDataset, ClassificationLoader};
pub use detection::{
    DetectionBatch, DetectionDataset, DetectionLoader, DetectionMeta, OpenOptions, batch_scale,
};
pub use draw::{draw_detections, save_png};
pub use error::{DatasetError, Result};
pub use imageops::{MEAN, STD, decode_rgb, image_dimensions, load_image_for_inference, load_rgb};
pub use loader::{Batches, ItemMeta, Loader, LoaderConfig, Skip, batch_rng, tune_allocator};
pub use synthetic::SyntheticConfig;
pub use transform::{
    Augment, ClassificationTransform, DetectionTransform, EvalResize, MappedBoxes, TransformedItem,
};
