//! Detection datasets (list file, VOC, COCO) and their batches.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::rngs::StdRng;

use crate::annotations::{self, DetectionRecord};
use crate::error::{DatasetError, Result};
use crate::imageops::load_rgb;
use crate::loader::{ItemSource, Loader, LoaderConfig};
use crate::transform::{DetectionTransform, TransformedItem};

/// An annotated detection dataset: records, class names (label `i` is `class_names[i-1]`) and
/// the folder the record names are relative to.
#[derive(Debug, Clone)]
pub struct DetectionDataset {
    records: Vec<DetectionRecord>,
    class_names: Vec<String>,
    image_root: PathBuf,
}

impl DetectionDataset {
    /// Records with class names; every label must lie in `1..=class_names.len()`.
    pub fn from_records(
        records: Vec<DetectionRecord>,
        class_names: Vec<String>,
        image_root: impl Into<PathBuf>,
    ) -> Result<Self> {
        let image_root = image_root.into();
        if class_names.is_empty() {
            return Err(DatasetError::Empty("no class name".into()));
        }
        if records.is_empty() {
            return Err(DatasetError::Empty(format!(
                "no image (image root {})",
                image_root.display()
            )));
        }
        for r in &records {
            if r.boxes.len() != r.labels.len() {
                return Err(DatasetError::Invalid(format!(
                    "{}: {} boxes but {} labels",
                    r.name,
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
                    "{}: label {l} is outside 1..={}",
                    r.name,
                    class_names.len()
                )));
            }
        }
        Ok(DetectionDataset {
            records,
            class_names,
            image_root,
        })
    }

    /// The tutorial's list file (`name ymin xmin ymax xmax class ...`) with its names file;
    /// image names are relative to `image_root`.
    pub fn from_list(
        list_file: &Path,
        names_file: &Path,
        image_root: impl Into<PathBuf>,
    ) -> Result<Self> {
        let names = annotations::read_names(names_file)?;
        let records = annotations::read_list(list_file, names.len())?;
        if records.is_empty() {
            return Err(DatasetError::Empty(format!(
                "list file {} has no image",
                list_file.display()
            )));
        }
        Self::from_records(records, names, image_root)
    }

    /// A VOC root read directly (`Annotations/`, `ImageSets/Main/<split>.txt`, `JPEGImages/`),
    /// with the 20 VOC class names (or the names found, see [`annotations::read_voc`]).
    pub fn from_voc(voc_root: &Path, split: &str) -> Result<Self> {
        Self::from_voc_with_classes(voc_root, split, None)
    }

    /// [`DetectionDataset::from_voc`] with explicit class names.
    pub fn from_voc_with_classes(
        voc_root: &Path,
        split: &str,
        class_names: Option<&[String]>,
    ) -> Result<Self> {
        let voc = annotations::read_voc(voc_root, split, class_names)?;
        Self::from_records(voc.records, voc.class_names, voc_root.join("JPEGImages"))
    }

    /// A COCO instances JSON read directly; `file_name`s are relative to `image_root`.
    pub fn from_coco(instances_json: &Path, image_root: impl Into<PathBuf>) -> Result<Self> {
        let coco = annotations::read_coco(instances_json)?;
        Self::from_records(coco.records, coco.class_names, image_root)
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
    /// `[B, 3, S, S]` f32 normalised RGB on the CPU.
    pub images: Tensor,
    /// Per image: boxes `[ymin, xmin, ymax, xmax]` in input pixels (possibly none).
    pub boxes: Vec<Vec<[f32; 4]>>,
    /// Per image: labels `1..=C`, one per box.
    pub labels: Vec<Vec<u32>>,
    /// Per image: the record name (path relative to the image root).
    pub names: Vec<String>,
    /// Per image: the dataset index.
    pub indices: Vec<usize>,
    /// The epoch this batch belongs to.
    pub epoch: usize,
    /// The batch's index within its epoch.
    pub batch: usize,
}

/// A dataset with its transform, as a loader source.
#[derive(Debug)]
pub struct DetectionSource {
    /// The dataset.
    pub dataset: DetectionDataset,
    /// The item transform.
    pub transform: DetectionTransform,
}

impl ItemSource for DetectionSource {
    type Meta = (Vec<[f32; 4]>, Vec<u32>);
    type Batch = DetectionBatch;

    fn len(&self) -> usize {
        self.dataset.len()
    }

    fn item_len(&self) -> usize {
        let s = self.transform.size as usize;
        3 * s * s
    }

    fn load_into(&self, index: usize, rng: &mut StdRng, out: &mut [f32]) -> Result<Self::Meta> {
        let img = self.dataset.load_image(index)?;
        let r = self.dataset.get(index);
        Ok(self
            .transform
            .apply_into(&img, &r.boxes, &r.labels, rng, out))
    }

    fn collate(
        &self,
        data: Vec<f32>,
        metas: Vec<(usize, Self::Meta)>,
        epoch: usize,
        batch: usize,
    ) -> Result<DetectionBatch> {
        let s = self.transform.size as usize;
        let n = metas.len();
        let mut out = DetectionBatch {
            images: Tensor::from_vec(data, (n, 3, s, s), &Device::Cpu)?,
            boxes: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            names: Vec::with_capacity(n),
            indices: Vec::with_capacity(n),
            epoch,
            batch,
        };
        for (index, (boxes, labels)) in metas {
            out.boxes.push(boxes);
            out.labels.push(labels);
            out.names.push(self.dataset.get(index).name.clone());
            out.indices.push(index);
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
        if transform.size == 0 {
            return Err(DatasetError::Invalid(
                "transform size must be at least 1".into(),
            ));
        }
        Loader::with_source(DetectionSource { dataset, transform }, config)
    }

    /// The dataset.
    pub fn dataset(&self) -> &DetectionDataset {
        &self.source().dataset
    }
}
