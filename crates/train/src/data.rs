//! Opening the configured data sources (the synthetic default is generated on first use).

use anyhow::{Context, Result, bail};
use retinanet_dataset::synthetic::{self, Shape};
use retinanet_dataset::{ClassificationDataset, DetectionDataset, SyntheticConfig};

use crate::config::{ClassificationSourceConfig, DetectionSourceConfig};

fn check_exists(p: &std::path::Path, what: &str) -> Result<()> {
    if !p.exists() {
        bail!("{what} {} does not exist", p.display());
    }
    Ok(())
}

/// `(train, eval)` detection datasets of a source.
pub fn open_detection(src: &DetectionSourceConfig) -> Result<(DetectionDataset, DetectionDataset)> {
    Ok(match src {
        DetectionSourceConfig::Synthetic {
            cache_dir,
            num_train,
            num_eval,
            image_size,
            max_objects,
            object_size,
            seed,
        } => {
            let cfg = SyntheticConfig {
                image_size: *image_size,
                num_train: *num_train,
                num_eval: *num_eval,
                max_objects: *max_objects,
                object_size: *object_size,
                seed: *seed,
                classes: Shape::ALL.to_vec(),
                ..SyntheticConfig::default()
            };
            let s = synthetic::ensure_detection(cache_dir, &cfg).with_context(|| {
                format!("cannot make the synthetic data in {}", cache_dir.display())
            })?;
            (
                DetectionDataset::from_list(&s.train_list, &s.names_file, &s.image_root)?,
                DetectionDataset::from_list(&s.eval_list, &s.names_file, &s.image_root)?,
            )
        }
        DetectionSourceConfig::List {
            train_list,
            eval_list,
            names,
            image_root,
        } => {
            for (p, w) in [
                (train_list, "train list"),
                (eval_list, "eval list"),
                (names, "names file"),
                (image_root, "image root"),
            ] {
                check_exists(p, w)?;
            }
            (
                DetectionDataset::from_list(train_list, names, image_root)?,
                DetectionDataset::from_list(eval_list, names, image_root)?,
            )
        }
        DetectionSourceConfig::Voc {
            root,
            train_split,
            eval_split,
        } => {
            check_exists(root, "VOC root")?;
            (
                DetectionDataset::from_voc(root, train_split)?,
                DetectionDataset::from_voc(root, eval_split)?,
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
            let train = DetectionDataset::from_coco(train_json, train_images)?;
            let eval = DetectionDataset::from_coco(eval_json, eval_images)?;
            if train.class_names() != eval.class_names() {
                bail!(
                    "{} and {} have different categories",
                    train_json.display(),
                    eval_json.display()
                );
            }
            (train, eval)
        }
    })
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
