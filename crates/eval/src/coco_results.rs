//! COCO results files — what pycocotools' `COCO.loadRes` and most detection tools read: a JSON
//! array of `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}` against the ids of a
//! COCO instances file — written from detections and scored against that file.
//!
//! Boxes: this project's `[ymin, xmin, ymax, xmax]` have inclusive maxima (a COCO box
//! `[x, y, w, h]` is read as `[y, x, y + h - 1, x + w - 1]`), so a detection is written as
//! `[xmin, ymin, xmax - xmin + 1, ymax - ymin + 1]`. Scoring a results file takes both its boxes
//! and the instances' as pycocotools does (`[x, y, w, h]` as they are, the annotations' `area`
//! for the area ranges, `iscrowd`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::io::GroundTruthRecord;
use crate::{Detections, EvalError, Evaluator, Report};

/// One detection of a results file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CocoDetection {
    /// The COCO image id.
    pub image_id: u64,
    /// The COCO category id.
    pub category_id: u64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: [f64; 4],
    /// The score.
    pub score: f64,
}

impl CocoDetection {
    /// The results entry of one detection (`[ymin, xmin, ymax, xmax]`, inclusive maxima).
    pub fn from_yxyx(image_id: u64, category_id: u64, b: &[f32; 4], score: f32) -> Self {
        let (y0, x0, y1, x1) = (b[0] as f64, b[1] as f64, b[2] as f64, b[3] as f64);
        Self {
            image_id,
            category_id,
            bbox: [x0, y0, (x1 - x0 + 1.0).max(0.0), (y1 - y0 + 1.0).max(0.0)],
            score: score as f64,
        }
    }
}

#[derive(Deserialize)]
struct InstancesFile {
    images: Vec<Image>,
    #[serde(default)]
    annotations: Vec<Annotation>,
    categories: Vec<Category>,
}

#[derive(Deserialize)]
struct Image {
    id: u64,
    file_name: String,
}

#[derive(Deserialize)]
struct Annotation {
    image_id: u64,
    category_id: u64,
    bbox: [f64; 4],
    #[serde(default)]
    area: Option<f64>,
    #[serde(default)]
    iscrowd: u8,
}

#[derive(Deserialize)]
struct Category {
    id: u64,
    name: String,
}

/// A COCO instances file as results are written and scored against it.
#[derive(Clone, Debug)]
pub struct CocoGroundTruth {
    /// The file.
    pub path: PathBuf,
    /// `(image id, file_name)` in the file's order.
    pub images: Vec<(u64, String)>,
    /// `(category id, name)` by increasing id: label `i` is entry `i - 1`.
    pub categories: Vec<(u64, String)>,
    /// Per image (in `images`' order): its objects, boxes as pycocotools scores them.
    pub records: Vec<GroundTruthRecord>,
}

fn file_err(path: &Path, message: String) -> EvalError {
    EvalError::File {
        path: path.to_path_buf(),
        message,
    }
}

impl CocoGroundTruth {
    /// Reads an instances file; errors name it and the image or annotation at fault.
    pub fn read(path: &Path) -> Result<Self, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let f: InstancesFile = serde_json::from_str(text.trim_start_matches('\u{feff}'))
            .map_err(|e| file_err(path, format!("not a COCO instances file: {e}")))?;
        let mut categories: Vec<(u64, String)> = f
            .categories
            .iter()
            .map(|c| (c.id, c.name.clone()))
            .collect();
        categories.sort();
        if let Some(w) = categories.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(file_err(
                path,
                format!("category id {} appears twice", w[0].0),
            ));
        }
        if categories.is_empty() {
            return Err(file_err(path, "no category".into()));
        }
        let label: HashMap<u64, u32> = categories
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (*id, i as u32 + 1))
            .collect();
        let mut index = HashMap::with_capacity(f.images.len());
        let mut records = Vec::with_capacity(f.images.len());
        for (i, im) in f.images.iter().enumerate() {
            if index.insert(im.id, i).is_some() {
                return Err(file_err(path, format!("image id {} appears twice", im.id)));
            }
            records.push(GroundTruthRecord {
                image: im.file_name.clone(),
                crowd: Some(Vec::new()),
                areas: Some(Vec::new()),
                ..Default::default()
            });
        }
        for (k, a) in f.annotations.iter().enumerate() {
            let what = || format!("annotation #{k} (image {})", a.image_id);
            let &i = index
                .get(&a.image_id)
                .ok_or_else(|| file_err(path, format!("{}: no such image id", what())))?;
            let &l = label.get(&a.category_id).ok_or_else(|| {
                file_err(
                    path,
                    format!("{}: category {} is not listed", what(), a.category_id),
                )
            })?;
            let [x, y, w, h] = a.bbox;
            if !(a.bbox.iter().all(|v| v.is_finite()) && w >= 0.0 && h >= 0.0) {
                return Err(file_err(
                    path,
                    format!("{}: bbox {:?} is invalid", what(), a.bbox),
                ));
            }
            let r = &mut records[i];
            r.boxes
                .push([y as f32, x as f32, (y + h) as f32, (x + w) as f32]);
            r.labels.push(l);
            r.crowd.as_mut().expect("set above").push(a.iscrowd != 0);
            r.areas
                .as_mut()
                .expect("set above")
                .push(a.area.unwrap_or(w * h));
        }
        Ok(Self {
            path: path.to_path_buf(),
            images: f
                .images
                .iter()
                .map(|im| (im.id, im.file_name.clone()))
                .collect(),
            categories,
            records,
        })
    }

    /// Class names by label.
    pub fn class_names(&self) -> Vec<String> {
        self.categories.iter().map(|c| c.1.clone()).collect()
    }

    /// The id of an image by its `file_name`, or by its last path component when that is
    /// unique in the file.
    pub fn image_id(&self, file: &str) -> Option<u64> {
        if let Some((id, _)) = self.images.iter().find(|(_, f)| f == file) {
            return Some(*id);
        }
        let base = |s: &str| Path::new(s).file_name().map(|n| n.to_owned());
        let want = base(file)?;
        let mut hits = self
            .images
            .iter()
            .filter(|(_, f)| base(f).as_ref() == Some(&want));
        match (hits.next(), hits.next()) {
            (Some((id, _)), None) => Some(*id),
            _ => None,
        }
    }

    /// The id of the category named `name`.
    pub fn category_id(&self, name: &str) -> Option<u64> {
        self.categories.iter().find(|c| c.1 == name).map(|c| c.0)
    }
}

/// Writes a results file (a JSON array, as pycocotools' `loadRes` reads).
pub fn write_results(path: &Path, dets: &[CocoDetection]) -> Result<(), EvalError> {
    let text = serde_json::to_string(dets).map_err(|e| file_err(path, e.to_string()))?;
    std::fs::write(path, text).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a results file; an entry with a non-finite value or a negative size is an error
/// naming the file and the entry.
pub fn read_results(path: &Path) -> Result<Vec<CocoDetection>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let dets: Vec<CocoDetection> = serde_json::from_str(text.trim_start_matches('\u{feff}'))
        .map_err(|e| file_err(path, format!("not a COCO results array: {e}")))?;
    for (k, d) in dets.iter().enumerate() {
        let [_, _, w, h] = d.bbox;
        if !(d.bbox.iter().all(|v| v.is_finite()) && w >= 0.0 && h >= 0.0 && d.score.is_finite()) {
            return Err(file_err(
                path,
                format!(
                    "entry #{k}: bbox {:?} / score {} is invalid",
                    d.bbox, d.score
                ),
            ));
        }
    }
    Ok(dets)
}

/// One image's boxes, labels and scores.
type ImageDetections = (Vec<[f32; 4]>, Vec<u32>, Vec<f32>);

/// The VOC and COCO-style report of the detections of `results` (read from `results_path`)
/// against `gt`: every image of `gt` is scored, with or without detections. A detection of an
/// image id or category id `gt` does not have is an error naming the entry.
pub fn score_results(
    gt: &CocoGroundTruth,
    results: &[CocoDetection],
    results_path: &Path,
) -> Result<Report, EvalError> {
    let image: HashMap<u64, usize> = gt
        .images
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id, i))
        .collect();
    let label: HashMap<u64, u32> = gt
        .categories
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id, i as u32 + 1))
        .collect();
    let mut per_image: BTreeMap<usize, ImageDetections> = BTreeMap::new();
    for (k, d) in results.iter().enumerate() {
        let &i = image.get(&d.image_id).ok_or_else(|| {
            file_err(
                results_path,
                format!(
                    "entry #{k}: image id {} is not in {}",
                    d.image_id,
                    gt.path.display()
                ),
            )
        })?;
        let &l = label.get(&d.category_id).ok_or_else(|| {
            file_err(
                results_path,
                format!(
                    "entry #{k}: category id {} is not in {}",
                    d.category_id,
                    gt.path.display()
                ),
            )
        })?;
        let [x, y, w, h] = d.bbox;
        let e = per_image.entry(i).or_default();
        e.0.push([y as f32, x as f32, (y + h) as f32, (x + w) as f32]);
        e.1.push(l);
        e.2.push(d.score as f32);
    }
    let mut ev = Evaluator::new(gt.class_names());
    let empty = (Vec::new(), Vec::new(), Vec::new());
    for (i, g) in gt.records.iter().enumerate() {
        let d = per_image.get(&i).unwrap_or(&empty);
        ev.add(&g.as_ground_truth(), &Detections::new(&d.0, &d.1, &d.2))?;
    }
    Ok(ev.finish())
}
