//! Opening the configured data sources (the synthetic default is generated on first use).

use anyhow::{Context, Result, bail};
pub use retinanet_dataset::OpenOptions;
use retinanet_dataset::synthetic::{self, Shape};
use retinanet_dataset::{ClassificationDataset, DetectionDataset, SyntheticConfig};
use std::path::{Path, PathBuf};

use crate::config::{ClassificationSourceConfig, DetectionSourceConfig, SyntheticBackground};

fn check_exists(p: &std::path::Path, what: &str) -> Result<()> {
    if !p.exists() {
        bail!("{what} {} does not exist", p.display());
    }
    Ok(())
}

/// `(train, eval)` detection datasets of a source with one class list (see
/// [`open_detection_with`]); every image must exist.
pub fn open_detection(src: &DetectionSourceConfig) -> Result<(DetectionDataset, DetectionDataset)> {
    open_detection_with(src, &OpenOptions::default())
}

/// `(train, eval)` detection datasets of a source, both with the same class list, fixed before
/// either split's labels are read: `opts.classes` when given (e.g. a checkpoint's; labels are
/// matched by name and a class outside it is refused, naming where it appears); else the names
/// file (list, synthetic), the VOC root's `classes.txt` or the sorted union of both splits'
/// names (VOC), the union of both files' categories by id (COCO).
///
/// Missing images are found here, naming the list line (or XML and id, or COCO image): an
/// error, or with `opts.skip_missing` dropped and reported ([`DetectionDataset::dropped`], and
/// by a loader over the dataset as skips).
pub fn open_detection_with(
    src: &DetectionSourceConfig,
    opts: &OpenOptions,
) -> Result<(DetectionDataset, DetectionDataset)> {
    let (train, eval) = match src {
        DetectionSourceConfig::Synthetic { .. } => {
            let s = synthetic_paths(src)?;
            (
                DetectionDataset::open_list(&s.train_list, &s.names_file, &s.image_root, opts)?,
                DetectionDataset::open_list(&s.eval_list, &s.names_file, &s.image_root, opts)?,
            )
        }
        DetectionSourceConfig::List {
            train_list,
            eval_list,
            names,
            image_root,
        } => {
            check_list_paths(
                &[(train_list, "train list"), (eval_list, "eval list")],
                names,
                image_root,
            )?;
            (
                DetectionDataset::open_list(train_list, names, image_root, opts)?,
                DetectionDataset::open_list(eval_list, names, image_root, opts)?,
            )
        }
        DetectionSourceConfig::Voc {
            root,
            train_split,
            eval_split,
        } => {
            check_exists(root, "VOC root")?;
            let mut v = DetectionDataset::open_voc(root, &[train_split, eval_split], opts)?;
            let eval = v.pop().expect("two splits");
            (v.pop().expect("two splits"), eval)
        }
        DetectionSourceConfig::Yolo {
            data,
            train_split,
            eval_split,
        } => {
            check_exists(data, "YOLO data.yaml")?;
            let d = retinanet_dataset::yolo::read_data_yaml(data)?;
            (
                DetectionDataset::open_yolo_data(&d, train_split, opts)?,
                DetectionDataset::open_yolo_data(&d, eval_split, opts)?,
            )
        }
        DetectionSourceConfig::Coco {
            train_json,
            train_images,
            eval_json,
            eval_images,
        } => {
            for (p, w) in [
                (train_json, "COCO train JSON"),
                (train_images, "COCO train images"),
                (eval_json, "COCO eval JSON"),
                (eval_images, "COCO eval images"),
            ] {
                check_exists(p, w)?;
            }
            let mut v = DetectionDataset::open_coco(
                &[(train_json, train_images), (eval_json, eval_images)],
                opts,
            )?;
            let eval = v.pop().expect("two files");
            (v.pop().expect("two files"), eval)
        }
    };
    // The readers above guarantee it; a model trained on one list and scored on another would
    // report a wrong mAP without any error.
    if train.class_names() != eval.class_names() {
        bail!(
            "the training and evaluation splits have different class lists {:?} and {:?}",
            train.class_names(),
            eval.class_names()
        );
    }
    Ok((train, eval))
}

/// The evaluation split of a source alone (what `evaluate` needs), with the class list of
/// `opts.classes` (a checkpoint's: an object of a class the model does not know is refused,
/// naming the class and the file). Without `opts.classes` the list is the one
/// [`open_detection_with`] gives both splits (which may need the training split's names).
pub fn open_eval_detection(
    src: &DetectionSourceConfig,
    opts: &OpenOptions,
) -> Result<DetectionDataset> {
    if opts.classes.is_none() {
        return Ok(open_detection_with(src, opts)?.1);
    }
    Ok(match src {
        DetectionSourceConfig::Synthetic { .. } => {
            let s = synthetic_paths(src)?;
            DetectionDataset::open_list(&s.eval_list, &s.names_file, &s.image_root, opts)?
        }
        DetectionSourceConfig::List {
            eval_list,
            names,
            image_root,
            ..
        } => {
            check_list_paths(&[(eval_list, "eval list")], names, image_root)?;
            DetectionDataset::open_list(eval_list, names, image_root, opts)?
        }
        DetectionSourceConfig::Voc {
            root, eval_split, ..
        } => {
            check_exists(root, "VOC root")?;
            DetectionDataset::open_voc(root, &[eval_split], opts)?.remove(0)
        }
        DetectionSourceConfig::Yolo {
            data, eval_split, ..
        } => {
            check_exists(data, "YOLO data.yaml")?;
            DetectionDataset::open_yolo(data, eval_split, opts)?
        }
        DetectionSourceConfig::Coco {
            eval_json,
            eval_images,
            ..
        } => {
            check_exists(eval_json, "COCO eval JSON")?;
            check_exists(eval_images, "COCO eval images")?;
            DetectionDataset::open_coco(&[(eval_json, eval_images)], opts)?.remove(0)
        }
    })
}

fn check_list_paths(lists: &[(&PathBuf, &str)], names: &Path, image_root: &Path) -> Result<()> {
    for (p, w) in lists {
        check_exists(p, w)?;
    }
    check_exists(names, "names file")?;
    check_exists(image_root, "image root")
}

/// The synthetic data's files (generated on first use).
fn synthetic_paths(src: &DetectionSourceConfig) -> Result<synthetic::SyntheticDetection> {
    let DetectionSourceConfig::Synthetic {
        cache_dir,
        num_train,
        num_eval,
        image_size,
        max_objects,
        object_size,
        seed,
        min_objects,
        background,
    } = src
    else {
        bail!("not a synthetic source");
    };
    let cfg = SyntheticConfig {
        image_size: *image_size,
        num_train: *num_train,
        num_eval: *num_eval,
        max_objects: *max_objects,
        min_objects: *min_objects,
        background: match background {
            SyntheticBackground::Plain => synthetic::Background::Plain,
            SyntheticBackground::Textured => synthetic::Background::Textured,
        },
        object_size: *object_size,
        seed: *seed,
        classes: Shape::ALL.to_vec(),
        ..SyntheticConfig::default()
    };
    synthetic::ensure_detection(cache_dir, &cfg)
        .with_context(|| format!("cannot make the synthetic data in {}", cache_dir.display()))
}

/// `(train, eval)` classification datasets of a source.
pub fn open_classification(
    src: &ClassificationSourceConfig,
) -> Result<(ClassificationDataset, ClassificationDataset)> {
    Ok(match src {
        ClassificationSourceConfig::Synthetic {
            cache_dir,
            num_train,
            num_eval,
            image_size,
            seed,
        } => {
            let cfg = SyntheticConfig {
                class_image_size: *image_size,
                num_train: *num_train,
                num_eval: *num_eval,
                seed: *seed,
                classes: Shape::ALL.to_vec(),
                ..SyntheticConfig::default()
            };
            let s = synthetic::ensure_classification(cache_dir, &cfg).with_context(|| {
                format!("cannot make the synthetic data in {}", cache_dir.display())
            })?;
            (
                ClassificationDataset::from_image_folder(&s.train_root)?,
                ClassificationDataset::from_image_folder(&s.eval_root)?,
            )
        }
        ClassificationSourceConfig::ImageFolder {
            train_root,
            eval_root,
        } => {
            check_exists(train_root, "train folder")?;
            check_exists(eval_root, "eval folder")?;
            (
                ClassificationDataset::from_image_folder(train_root)?,
                ClassificationDataset::from_image_folder(eval_root)?,
            )
        }
        ClassificationSourceConfig::Cifar10 { dir } => {
            check_exists(dir, "CIFAR-10 folder")?;
            (
                ClassificationDataset::from_cifar10_dir(dir, true)?,
                ClassificationDataset::from_cifar10_dir(dir, false)?,
            )
        }
        ClassificationSourceConfig::Mnist { dir } => {
            check_exists(dir, "MNIST folder")?;
            (
                ClassificationDataset::from_mnist_dir(dir, true)?,
                ClassificationDataset::from_mnist_dir(dir, false)?,
            )
        }
    })
}

/// A class-names file (one name per line; a byte-order mark, CRLF and blank lines tolerated).
pub fn read_names_file(path: &std::path::Path) -> Result<Vec<String>> {
    Ok(retinanet_dataset::annotations::read_names(path)?)
}
