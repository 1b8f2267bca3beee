//! Classification datasets for pretraining: ImageFolder, CIFAR-10 binary and MNIST idx folders.
//!
//! Labels are `0..C` (class indices for cross-entropy), classes in sorted folder-name order for
//! ImageFolder (as torchvision).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::rngs::StdRng;

use crate::error::{DatasetError, Result, io_err};
use crate::imageops::load_rgb;
use crate::loader::{ItemMeta, ItemSource, Loader, LoaderConfig};
use crate::transform::ClassificationTransform;

/// File extensions ImageFolder picks up (the formats this crate decodes).
pub const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "bmp", "gif", "ppm"];

#[derive(Debug, Clone)]
enum Store {
    Files(Vec<PathBuf>),
    Memory(Vec<RgbImage>),
}

/// A classification dataset: images (files or in memory) with labels `0..C`.
#[derive(Debug, Clone)]
pub struct ClassificationDataset {
    store: Store,
    labels: Vec<u32>,
    class_names: Vec<String>,
}

impl ClassificationDataset {
    /// `root/<class>/<image>`: classes are the sub-folders in sorted order, images the files with
    /// an extension in [`IMAGE_EXTENSIONS`] (sorted by name).
    pub fn from_image_folder(root: &Path) -> Result<Self> {
        let mut classes: Vec<(String, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(root).map_err(io_err(root))? {
            let e = e.map_err(io_err(root))?;
            let p = e.path();
            if p.is_dir() {
                classes.push((e.file_name().to_string_lossy().into_owned(), p));
            }
        }
        classes.sort();
        if classes.is_empty() {
            return Err(DatasetError::Empty(format!(
                "{} has no class folder",
                root.display()
            )));
        }
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for (ci, (_, dir)) in classes.iter().enumerate() {
            let mut found = Vec::new();
            for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
                let p = e.map_err(io_err(dir))?.path();
                let ok = p
                    .extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()));
                if ok && p.is_file() {
                    found.push(p);
                }
            }
            found.sort();
            labels.extend(std::iter::repeat_n(ci as u32, found.len()));
            files.extend(found);
        }
        if files.is_empty() {
            return Err(DatasetError::Empty(format!(
                "{} has no image in its class folders",
                root.display()
            )));
        }
        Ok(ClassificationDataset {
            store: Store::Files(files),
            labels,
            class_names: classes.into_iter().map(|(n, _)| n).collect(),
        })
    }

    /// CIFAR-10 binary version: `data_batch_1.bin` .. `data_batch_5.bin` (train) or
    /// `test_batch.bin` (eval) in `dir` (or in `dir/cifar-10-batches-bin`). Class names from
    /// `batches.meta.txt` when present.
    pub fn from_cifar10_dir(dir: &Path, train: bool) -> Result<Self> {
        let dir = if dir.join("cifar-10-batches-bin").is_dir() {
            dir.join("cifar-10-batches-bin")
        } else {
            dir.to_path_buf()
        };
        let files: Vec<PathBuf> = if train {
            (1..=5)
                .map(|i| dir.join(format!("data_batch_{i}.bin")))
                .collect()
        } else {
            vec![dir.join("test_batch.bin")]
        };
        let mut images = Vec::new();
        let mut labels = Vec::new();
        for f in &files {
            let bytes = std::fs::read(f).map_err(io_err(f))?;
            if bytes.is_empty() || bytes.len() % 3073 != 0 {
                return Err(DatasetError::Annotation {
                    path: f.clone(),
                    message: format!(
                        "{} bytes is not a whole number of 3073-byte CIFAR-10 records",
                        bytes.len()
                    ),
                });
            }
            for rec in bytes.chunks_exact(3073) {
                if rec[0] > 9 {
                    return Err(DatasetError::Annotation {
                        path: f.clone(),
                        message: format!("label {} outside 0..=9", rec[0]),
                    });
                }
                labels.push(rec[0] as u32);
                let px = &rec[1..];
                // Planar R, G, B 32x32 -> interleaved.
                let img = RgbImage::from_fn(32, 32, |x, y| {
                    let i = (y * 32 + x) as usize;
                    image::Rgb([px[i], px[1024 + i], px[2048 + i]])
                });
                images.push(img);
            }
        }
        let meta = dir.join("batches.meta.txt");
        let class_names = match std::fs::read_to_string(&meta) {
            Ok(t) => t
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
            Err(_) => [
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        };
        Ok(ClassificationDataset {
            store: Store::Memory(images),
            labels,
            class_names,
        })
    }

    /// MNIST idx files (uncompressed) in `dir`: `train-images-idx3-ubyte` /
    /// `train-labels-idx1-ubyte` or the `t10k-` pair (also the `.idx3-ubyte` spelling). Grey
    /// digits become RGB.
    pub fn from_mnist_dir(dir: &Path, train: bool) -> Result<Self> {
        let prefix = if train { "train" } else { "t10k" };
        let pick = |kind: &str, n: u8| -> PathBuf {
            let a = dir.join(format!("{prefix}-{kind}-idx{n}-ubyte"));
            if a.exists() {
                a
            } else {
                dir.join(format!("{prefix}-{kind}.idx{n}-ubyte"))
            }
        };
        let (ip, lp) = (pick("images", 3), pick("labels", 1));
        let ib = std::fs::read(&ip).map_err(io_err(&ip))?;
        let lb = std::fs::read(&lp).map_err(io_err(&lp))?;
        let bad = |p: &Path, m: &str| DatasetError::Annotation {
            path: p.to_path_buf(),
            message: m.to_string(),
        };
        let be =
            |b: &[u8], o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as usize;
        if ib.len() < 16 || be(&ib, 0) != 2051 {
            return Err(bad(&ip, "not an idx3 image file (magic 2051)"));
        }
        if lb.len() < 8 || be(&lb, 0) != 2049 {
            return Err(bad(&lp, "not an idx1 label file (magic 2049)"));
        }
        let (n, rows, cols) = (be(&ib, 4), be(&ib, 8), be(&ib, 12));
        if ib.len() != 16 + n * rows * cols {
            return Err(bad(&ip, "file size does not match the header"));
        }
        if be(&lb, 4) != n || lb.len() != 8 + n {
            return Err(bad(&lp, "label count does not match the image file"));
        }
        let images = ib[16..]
            .chunks_exact(rows * cols)
            .map(|px| {
                RgbImage::from_fn(cols as u32, rows as u32, |x, y| {
                    let v = px[y as usize * cols + x as usize];
                    image::Rgb([v, v, v])
                })
            })
            .collect();
        let labels = lb[8..].iter().map(|&l| l as u32).collect::<Vec<_>>();
        if let Some(&l) = labels.iter().find(|&&l| l > 9) {
            return Err(bad(&lp, &format!("label {l} outside 0..=9")));
        }
        Ok(ClassificationDataset {
            store: Store::Memory(images),
            labels,
            class_names: (0..10).map(|i| i.to_string()).collect(),
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there is no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Class names; label `i` is `class_names()[i]`.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Label of item `index`.
    pub fn label(&self, index: usize) -> u32 {
        self.labels[index]
    }

    /// The file of item `index` (None for in-memory datasets).
    pub fn path(&self, index: usize) -> Option<&Path> {
        match &self.store {
            Store::Files(f) => Some(&f[index]),
            Store::Memory(_) => None,
        }
    }

    /// Decodes item `index`.
    pub fn load_image(&self, index: usize) -> Result<RgbImage> {
        match &self.store {
            Store::Files(f) => load_rgb(&f[index]),
            Store::Memory(m) => Ok(m[index].clone()),
        }
    }
}

/// A batch of classification items.
#[derive(Debug, Clone)]
pub struct ClassificationBatch {
    /// `[B, 3, S, S]` f32 normalised RGB on the CPU.
    pub images: Tensor,
    /// `[B]` u32 class indices.
    pub labels: Tensor,
    /// Per image: the dataset index.
    pub indices: Vec<usize>,
    /// The epoch this batch belongs to.
    pub epoch: usize,
    /// The batch's index within its epoch.
    pub batch: usize,
}

/// A classification dataset with its transform, as a loader source.
#[derive(Debug)]
pub struct ClassificationSource {
    /// The dataset.
    pub dataset: ClassificationDataset,
    /// The item transform.
    pub transform: ClassificationTransform,
}

impl ItemSource for ClassificationSource {
    type Meta = ();
    type Batch = ClassificationBatch;

    fn len(&self) -> usize {
        self.dataset.len()
    }

    fn item_size(&self, _: usize, _: u64, _: usize, _: usize) -> Result<(usize, usize)> {
        let s = self.transform.size as usize;
        Ok((s, s))
    }

    fn item_path(&self, index: usize) -> Option<PathBuf> {
        self.dataset.path(index).map(Path::to_path_buf)
    }

    fn load_into(
        &self,
        index: usize,
        _: (usize, usize),
        rng: &mut StdRng,
        out: &mut [f32],
    ) -> Result<()> {
        let img = self.dataset.load_image(index)?;
        self.transform.apply_into(&img, rng, out);
        Ok(())
    }

    fn collate(
        &self,
        data: Vec<f32>,
        (h, w): (usize, usize),
        metas: Vec<ItemMeta<()>>,
        epoch: usize,
        batch: usize,
    ) -> Result<ClassificationBatch> {
        let n = metas.len();
        let indices: Vec<usize> = metas.into_iter().map(|m| m.index).collect();
        let labels: Vec<u32> = indices.iter().map(|&i| self.dataset.label(i)).collect();
        Ok(ClassificationBatch {
            images: Tensor::from_vec(data, (n, 3, h, w), &Device::Cpu)?,
            labels: Tensor::from_vec(labels, (n,), &Device::Cpu)?,
            indices,
            epoch,
            batch,
        })
    }
}

/// The classification loader: batches of [`ClassificationBatch`].
pub type ClassificationLoader = Loader<ClassificationSource>;

impl Loader<ClassificationSource> {
    /// A loader over `dataset` with `transform`.
    pub fn new(
        dataset: ClassificationDataset,
        transform: ClassificationTransform,
        config: LoaderConfig,
    ) -> Result<Self> {
        if transform.size == 0 {
            return Err(DatasetError::Invalid(
                "transform size must be at least 1".into(),
            ));
        }
        Loader::with_source(ClassificationSource { dataset, transform }, config)
    }

    /// The dataset.
    pub fn dataset(&self) -> &ClassificationDataset {
        &self.source().dataset
    }
}
