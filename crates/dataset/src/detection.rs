//! Detection datasets (list file, VOC, COCO) and their batches.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::Rng;
use rand::rngs::StdRng;
use rayon::prelude::*;

use crate::annotations::{self, DetectionRecord};
use crate::error::{DatasetError, Result};
use crate::imageops::load_rgb;
use crate::loader::{ItemMeta, ItemSource, Loader, LoaderConfig, Skip, batch_rng};
use crate::transform::{DetectionTransform, TransformedItem};

/// An annotated detection dataset: records, class names (label `i` is `class_names[i-1]`) and
/// the folder the record names are relative to.
#[derive(Debug, Clone)]
pub struct DetectionDataset {
    records: Vec<DetectionRecord>,
    class_names: Vec<String>,
    image_root: PathBuf,
    /// Per record: where it was read (`list.txt:12`, a VOC XML and id, ...), for messages.
    origins: Vec<String>,
    /// Records dropped when the dataset was opened (missing images, with `skip_missing`).
    dropped: Vec<Skip>,
}

/// How a detection dataset is opened from its annotation files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// The run's class list (a checkpoint's, or one fixed for all splits): labels are numbered
    /// by name in this list, and an object of another class is an error naming the class and
    /// where it appears. `None`: the source's own list (names file; VOC `classes.txt` or the
    /// names found; COCO categories by id).
    pub classes: Option<Vec<String>>,
    /// Drop the records whose image file is missing, each reported once in
    /// [`DetectionDataset::dropped`] (a loader over the dataset reports them as skipped),
    /// instead of refusing the dataset. An error all the same when no image is left.
    pub skip_missing: bool,
}

/// Relabels `records` (labels into `from`) by class name into `to`; `origins[i]` says where
/// record `i` comes from.
fn relabel(
    records: &mut [DetectionRecord],
    origins: &[String],
    from: &[String],
    to: &[String],
) -> Result<()> {
    if from == to {
        return Ok(());
    }
    let map: Vec<Option<u32>> = from
        .iter()
        .map(|n| to.iter().position(|m| m == n).map(|i| i as u32 + 1))
        .collect();
    for (r, origin) in records.iter_mut().zip(origins) {
        for l in &mut r.labels {
            *l = map[*l as usize - 1].ok_or_else(|| DatasetError::UnknownClass {
                location: origin.clone(),
                class: from[*l as usize - 1].clone(),
                classes: to.to_vec(),
            })?;
        }
    }
    Ok(())
}

/// What is wrong with an image path, if anything (missing, a folder, unreadable metadata).
fn image_problem(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => None,
        Ok(_) => Some("is not a file".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("does not exist".into()),
        Err(e) => Some(format!("cannot be read: {e}")),
    }
}

impl DetectionDataset {
    /// Records with class names; every label must lie in `1..=class_names.len()` and every box
    /// be finite and not inverted. Image files are not looked at (see
    /// [`DetectionDataset::check_images`]).
    pub fn from_records(
        records: Vec<DetectionRecord>,
        class_names: Vec<String>,
        image_root: impl Into<PathBuf>,
    ) -> Result<Self> {
        let origins = records
            .iter()
            .enumerate()
            .map(|(i, r)| format!("record {} ({:?})", i + 1, r.name))
            .collect();
        Self::with_origins(records, class_names, image_root.into(), origins)
    }

    fn with_origins(
        records: Vec<DetectionRecord>,
        class_names: Vec<String>,
        image_root: PathBuf,
        origins: Vec<String>,
    ) -> Result<Self> {
        if class_names.is_empty() {
            return Err(DatasetError::Empty("no class name".into()));
        }
        if records.is_empty() {
            return Err(DatasetError::Empty(format!(
                "no image (image root {})",
                image_root.display()
            )));
        }
        for (r, origin) in records.iter().zip(&origins) {
            if r.boxes.len() != r.labels.len() {
                return Err(DatasetError::Invalid(format!(
                    "{origin}: {} boxes but {} labels",
                    r.boxes.len(),
                    r.labels.len()
                )));
            }
            if let Some(&l) = r
                .labels
                .iter()
                .find(|&&l| l == 0 || l as usize > class_names.len())
            {
                return Err(DatasetError::Invalid(format!(
                    "{origin}: label {l} is outside 1..={}",
                    class_names.len()
                )));
            }
            if let Some((k, p)) = r
                .boxes
                .iter()
                .enumerate()
                .find_map(|(k, b)| annotations::box_problem(b).map(|p| (k, p)))
            {
                return Err(DatasetError::Invalid(format!(
                    "{origin}: box {} {:?} (ymin xmin ymax xmax): {p}",
                    k + 1,
                    r.boxes[k]
                )));
            }
        }
        Ok(DetectionDataset {
            records,
            class_names,
            image_root,
            origins,
            dropped: Vec::new(),
        })
    }

    /// Checks that every record's image file exists. Without `skip_missing`, a missing image is
    /// an error naming where it is listed (and how many are missing); with it, those records
    /// are dropped and listed in [`DetectionDataset::dropped`].
    pub fn check_images(mut self, skip_missing: bool) -> Result<Self> {
        let problems: Vec<(usize, String)> = (0..self.records.len())
            .into_par_iter()
            .filter_map(|i| image_problem(&self.image_path(i)).map(|p| (i, p)))
            .collect();
        let Some((first, problem)) = problems.first().cloned() else {
            return Ok(self);
        };
        let total = self.records.len();
        if !skip_missing || problems.len() == total {
            let mut e = DatasetError::MissingImage {
                location: self.origins[first].clone(),
                path: self.image_path(first),
                problem,
                missing: problems.len(),
                total,
            };
            if skip_missing {
                e = DatasetError::Empty(format!("no image is left after skipping: {e}"));
            }
            return Err(e);
        }
        let mut bad = vec![false; total];
        for (i, p) in &problems {
            bad[*i] = true;
            self.dropped.push(Skip {
                path: self.image_path(*i),
                reason: format!("{}: image {p}", self.origins[*i]),
            });
        }
        let mut k = 0;
        self.records.retain(|_| {
            k += 1;
            !bad[k - 1]
        });
        let mut k = 0;
        self.origins.retain(|_| {
            k += 1;
            !bad[k - 1]
        });
        Ok(self)
    }

    /// Records dropped when the dataset was opened (with [`OpenOptions::skip_missing`]), each
    /// with its file and reason.
    pub fn dropped(&self) -> &[Skip] {
        &self.dropped
    }

    /// Where record `index` was read: `list.txt:12`, a VOC XML and id, a COCO file and image id.
    pub fn origin(&self, index: usize) -> &str {
        &self.origins[index]
    }

    /// Renumbers the labels by class name into `classes` (e.g. a checkpoint's); an object of a
    /// class outside `classes` is an error naming it and where it appears.
    pub fn with_classes(mut self, classes: &[String]) -> Result<Self> {
        if classes.is_empty() {
            return Err(DatasetError::Empty("no class name".into()));
        }
        relabel(&mut self.records, &self.origins, &self.class_names, classes)?;
        self.class_names = classes.to_vec();
        Ok(self)
    }

    /// Split `split` (`train`, `val`, `test`) of a YOLO dataset's `data.yaml` (see
    /// [`crate::yolo`]): the YAML's class names (or `opts.classes`, matched by name), images
    /// found as the YAML says, boxes from the label files beside them. Errors name the YAML, the
    /// label file and line, or the image.
    pub fn open_yolo(data_yaml: &Path, split: &str, opts: &OpenOptions) -> Result<Self> {
        let data = crate::yolo::read_data_yaml(data_yaml)?;
        Self::open_yolo_data(&data, split, opts)
    }

    /// [`DetectionDataset::open_yolo`] of a `data.yaml` read already.
    pub fn open_yolo_data(
        data: &crate::yolo::YoloData,
        split: &str,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let (records, origins) = crate::yolo::split_records(data, split)?;
        let ds = Self::with_origins(records, data.names.clone(), data.root.clone(), origins)?;
        let ds = match &opts.classes {
            Some(c) => ds.with_classes(c)?,
            None => ds,
        };
        ds.check_images(opts.skip_missing)
    }

    /// The tutorial's list file (`name ymin xmin ymax xmax class ...`) with its names file;
    /// image names are relative to `image_root`. Every image must exist (see
    /// [`DetectionDataset::open_list`] for the options).
    pub fn from_list(
        list_file: &Path,
        names_file: &Path,
        image_root: impl Into<PathBuf>,
    ) -> Result<Self> {
        Self::open_list(list_file, names_file, image_root, &OpenOptions::default())
    }

    /// [`DetectionDataset::from_list`] with [`OpenOptions`]: with `classes`, the names file's
    /// classes are matched by name to that list.
    pub fn open_list(
        list_file: &Path,
        names_file: &Path,
        image_root: impl Into<PathBuf>,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let names = annotations::read_names(names_file)?;
        let lines = annotations::read_list_lines(list_file, names.len()).map_err(|e| match e {
            // The fault may be the names file's: name it too.
            DatasetError::ClassOutOfRange {
                path,
                line,
                class,
                num_classes,
                ..
            } => DatasetError::ClassOutOfRange {
                path,
                line,
                class,
                num_classes,
                names_file: Some(names_file.to_path_buf()),
            },
            e => e,
        })?;
        if lines.is_empty() {
            return Err(DatasetError::Empty(format!(
                "list file {} has no image",
                list_file.display()
            )));
        }
        let origins = lines
            .iter()
            .map(|(l, _)| format!("{}:{l}", list_file.display()))
            .collect();
        let records = lines.into_iter().map(|(_, r)| r).collect();
        let ds = Self::with_origins(records, names, image_root.into(), origins)?;
        let ds = match &opts.classes {
            Some(c) => ds.with_classes(c)?,
            None => ds,
        };
        ds.check_images(opts.skip_missing)
    }

    /// A VOC root read directly (`Annotations/`, `ImageSets/Main/<split>.txt`, `JPEGImages/`),
    /// with the class list of [`annotations::read_voc`] (`classes.txt`, the 20 VOC names, or the
    /// names found). Every image must exist.
    pub fn from_voc(voc_root: &Path, split: &str) -> Result<Self> {
        Self::from_voc_with_classes(voc_root, split, None)
    }

    /// [`DetectionDataset::from_voc`] with explicit class names.
    pub fn from_voc_with_classes(
        voc_root: &Path,
        split: &str,
        class_names: Option<&[String]>,
    ) -> Result<Self> {
        let opts = OpenOptions {
            classes: class_names.map(<[String]>::to_vec),
            ..OpenOptions::default()
        };
        Ok(Self::open_voc(voc_root, &[split], &opts)?.remove(0))
    }

    /// Several splits of a VOC root with one class list (`opts.classes`, else `classes.txt`,
    /// else found from the objects of all `splits`), one dataset per split.
    pub fn open_voc(voc_root: &Path, splits: &[&str], opts: &OpenOptions) -> Result<Vec<Self>> {
        annotations::read_voc_splits(voc_root, splits, opts.classes.as_deref())?
            .into_iter()
            .map(|v| {
                Self::with_origins(
                    v.records,
                    v.class_names,
                    voc_root.join("JPEGImages"),
                    v.origins,
                )?
                .check_images(opts.skip_missing)
            })
            .collect()
    }

    /// A COCO instances JSON read directly; `file_name`s are relative to `image_root`. Every
    /// image must exist.
    pub fn from_coco(instances_json: &Path, image_root: impl Into<PathBuf>) -> Result<Self> {
        let root: PathBuf = image_root.into();
        Ok(Self::open_coco(&[(instances_json, &root)], &OpenOptions::default())?.remove(0))
    }

    /// Several COCO files `(instances JSON, image root)` with one class list (`opts.classes`
    /// matched by category name, else the union of the files' categories mapped by id), one
    /// dataset per file.
    pub fn open_coco(files: &[(&Path, &Path)], opts: &OpenOptions) -> Result<Vec<Self>> {
        let jsons: Vec<&Path> = files.iter().map(|(j, _)| *j).collect();
        annotations::read_coco_files(&jsons, opts.classes.as_deref())?
            .into_iter()
            .zip(files)
            .map(|(c, (_, root))| {
                Self::with_origins(c.records, c.class_names, root.to_path_buf(), c.origins)?
                    .check_images(opts.skip_missing)
            })
            .collect()
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Always false (an empty dataset is an error at construction).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Class names; label `i` is `class_names()[i - 1]`.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// Number of classes `C`.
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// The raw record of image `index` (panics when out of range, like slice indexing).
    pub fn get(&self, index: usize) -> &DetectionRecord {
        &self.records[index]
    }

    /// All records.
    pub fn records(&self) -> &[DetectionRecord] {
        &self.records
    }

    /// The folder the record names are relative to.
    pub fn image_root(&self) -> &Path {
        &self.image_root
    }

    /// The image file of item `index`.
    pub fn image_path(&self, index: usize) -> PathBuf {
        annotations::image_path(&self.image_root, &self.records[index].name)
    }

    /// Decodes image `index` as RGB.
    pub fn load_image(&self, index: usize) -> Result<RgbImage> {
        load_rgb(&self.image_path(index))
    }

    /// `(width, height)` of image `index`, read from the file's header only.
    pub fn image_size(&self, index: usize) -> Result<(u32, u32)> {
        crate::imageops::image_dimensions(&self.image_path(index))
    }

    /// Loads and transforms item `index`.
    pub fn item(
        &self,
        index: usize,
        transform: &DetectionTransform,
        rng: &mut StdRng,
    ) -> Result<TransformedItem> {
        let img = self.load_image(index)?;
        let r = &self.records[index];
        Ok(transform.apply(&img, &r.boxes, &r.labels, rng))
    }

    /// Writes the dataset as a list file and a names file (the converter's output).
    pub fn write_list(&self, list_file: &Path, names_file: &Path) -> Result<()> {
        annotations::write_list(list_file, &self.records)?;
        annotations::write_names(names_file, &self.class_names)
    }
}

/// A batch of detection items, ready for the encoder.
#[derive(Debug, Clone)]
pub struct DetectionBatch {
    /// `[B, 3, H, W]` f32 normalised RGB on the CPU. Every item is `H x W` in training and
    /// centre-crop evaluation; in whole-image evaluation items of other sizes sit at the
    /// top-left of the canvas, zeros around them (see `sizes`).
    pub images: Tensor,
    /// Per image: boxes `[ymin, xmin, ymax, xmax]` in input pixels (possibly none).
    pub boxes: Vec<Vec<[f32; 4]>>,
    /// Per image: labels `1..=C`, one per box.
    pub labels: Vec<Vec<u32>>,
    /// Per image: the record name (path relative to the image root).
    pub names: Vec<String>,
    /// Per image: the dataset index.
    pub indices: Vec<usize>,
    /// Per image: `(H, W)` of its pixels on the canvas.
    pub sizes: Vec<(usize, usize)>,
    /// Per image: `(H, W)` of the image file it was made from.
    pub source_sizes: Vec<(usize, usize)>,
    /// The epoch this batch belongs to.
    pub epoch: usize,
    /// The batch's index within its epoch.
    pub batch: usize,
}

/// What a detection item returns besides its pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionMeta {
    /// Boxes in the item's pixels.
    pub boxes: Vec<[f32; 4]>,
    /// Their labels.
    pub labels: Vec<u32>,
    /// `(H, W)` of the source image.
    pub source_size: (usize, usize),
}

/// A dataset with its transform, as a loader source.
#[derive(Debug)]
pub struct DetectionSource {
    /// The dataset.
    pub dataset: DetectionDataset,
    /// The item transform.
    pub transform: DetectionTransform,
    /// Training sizes drawn per batch (multi-scale training; empty: `transform.size`).
    pub sizes: Vec<u32>,
}

/// The output size of batch `batch` of `epoch`: one of `sizes` drawn from
/// [`batch_rng`]`(seed, epoch, batch)` (so every rank and every resumed run draws the same), or
/// `default` when `sizes` is empty.
pub fn batch_scale(sizes: &[u32], default: u32, seed: u64, epoch: usize, batch: usize) -> u32 {
    match sizes {
        [] => default,
        [s] => *s,
        _ => sizes[batch_rng(seed, epoch, batch).random_range(0..sizes.len())],
    }
}

impl ItemSource for DetectionSource {
    type Meta = DetectionMeta;
    type Batch = DetectionBatch;

    fn len(&self) -> usize {
        self.dataset.len()
    }

    fn item_size(
        &self,
        index: usize,
        seed: u64,
        epoch: usize,
        batch: usize,
    ) -> Result<(usize, usize)> {
        if self.transform.item_size_varies() {
            let (w, h) = self.dataset.image_size(index)?;
            return Ok(self.transform.output_size(w, h));
        }
        let s = if self.transform.train {
            batch_scale(&self.sizes, self.transform.size, seed, epoch, batch)
        } else {
            self.transform.size
        } as usize;
        Ok((s, s))
    }

    fn item_path(&self, index: usize) -> Option<PathBuf> {
        Some(self.dataset.image_path(index))
    }

    fn initial_skips(&self) -> Vec<Skip> {
        self.dataset.dropped().to_vec()
    }

    fn load_into(
        &self,
        index: usize,
        size: (usize, usize),
        rng: &mut StdRng,
        out: &mut [f32],
    ) -> Result<Self::Meta> {
        let img = self.dataset.load_image(index)?;
        let r = self.dataset.get(index);
        let t = if self.transform.item_size_varies() {
            if self.transform.output_size(img.width(), img.height()) != size {
                return Err(DatasetError::Image {
                    path: self.dataset.image_path(index),
                    message: format!(
                        "decodes to {}x{} pixels, not the size its header gave",
                        img.width(),
                        img.height()
                    ),
                });
            }
            self.transform
        } else {
            self.transform.at_size(size.0 as u32)
        };
        let (boxes, labels) = t.apply_into(&img, &r.boxes, &r.labels, rng, out);
        Ok(DetectionMeta {
            boxes,
            labels,
            source_size: (img.height() as usize, img.width() as usize),
        })
    }

    fn collate(
        &self,
        data: Vec<f32>,
        (h, w): (usize, usize),
        metas: Vec<ItemMeta<DetectionMeta>>,
        epoch: usize,
        batch: usize,
    ) -> Result<DetectionBatch> {
        let n = metas.len();
        let mut out = DetectionBatch {
            images: Tensor::from_vec(data, (n, 3, h, w), &Device::Cpu)?,
            boxes: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            names: Vec::with_capacity(n),
            indices: Vec::with_capacity(n),
            sizes: Vec::with_capacity(n),
            source_sizes: Vec::with_capacity(n),
            epoch,
            batch,
        };
        for m in metas {
            out.boxes.push(m.meta.boxes);
            out.labels.push(m.meta.labels);
            out.names.push(self.dataset.get(m.index).name.clone());
            out.indices.push(m.index);
            out.sizes.push(m.size);
            out.source_sizes.push(m.meta.source_size);
        }
        Ok(out)
    }
}

/// The detection loader: batches of [`DetectionBatch`].
///
/// ```no_run
/// use retinanet_dataset::{DetectionDataset, DetectionLoader, DetectionTransform, LoaderConfig};
/// let ds = DetectionDataset::from_list("train.txt".as_ref(), "names.txt".as_ref(), "images").unwrap();
/// let loader = DetectionLoader::new(ds, DetectionTransform::train(257, 25.0), LoaderConfig::new(16, 42)).unwrap();
/// for batch in loader.epoch(0) {
///     let batch = batch.unwrap();
///     assert_eq!(batch.images.dims()[1..], [3, 257, 257]);
/// }
/// ```
pub type DetectionLoader = Loader<DetectionSource>;

impl Loader<DetectionSource> {
    /// A loader over `dataset` with `transform`.
    pub fn new(
        dataset: DetectionDataset,
        transform: DetectionTransform,
        config: LoaderConfig,
    ) -> Result<Self> {
        Self::multi_scale(dataset, transform, Vec::new(), config)
    }

    /// A training loader whose batches are each made at one of `sizes` (see [`batch_scale`];
    /// empty: `transform.size` always).
    pub fn multi_scale(
        dataset: DetectionDataset,
        transform: DetectionTransform,
        sizes: Vec<u32>,
        config: LoaderConfig,
    ) -> Result<Self> {
        if transform.size == 0 || sizes.contains(&0) {
            return Err(DatasetError::Invalid(
                "transform size must be at least 1".into(),
            ));
        }
        if !sizes.is_empty() && !transform.train {
            return Err(DatasetError::Invalid(
                "multi-scale sizes are for training transforms".into(),
            ));
        }
        Loader::with_source(
            DetectionSource {
                dataset,
                transform,
                sizes,
            },
            config,
        )
    }

    /// The dataset.
    pub fn dataset(&self) -> &DetectionDataset {
        &self.source().dataset
    }
}
