//! Annotation formats: the tutorial's list file + names file, VOC and COCO readers, converters.
//!
//! All boxes are `[ymin, xmin, ymax, xmax]` in 0-based pixel coordinates with the maxima
//! inclusive (the pixel index of the last row/column), as the tutorial's VOC converter produces
//! (VOC's 1-based coordinates minus 1). COCO `[x, y, w, h]` becomes `[y, x, y + h - 1, x + w - 1]`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{DatasetError, Result, io_err};

/// The 20 PASCAL VOC classes in their usual order (labels 1..=20).
pub const VOC_CLASSES: [&str; 20] = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

/// One annotated image as read from a list file, VOC or COCO.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionRecord {
    /// Image path relative to the image root (as written in the list file).
    pub name: String,
    /// `[ymin, xmin, ymax, xmax]` boxes in pixels (maxima inclusive).
    pub boxes: Vec<[f32; 4]>,
    /// Labels `1..=C`, one per box.
    pub labels: Vec<u32>,
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    std::fs::write(path, text).map_err(io_err(path))
}

/// Reads a names file: one class name per non-empty line; line `i` (1-based, blank lines
/// skipped) is label `i`.
pub fn read_names(path: &Path) -> Result<Vec<String>> {
    let text = read_text(path)?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err(DatasetError::Empty(format!(
            "names file {} has no class name",
            path.display()
        )));
    }
    Ok(names)
}

/// Writes a names file (one name per line).
pub fn write_names(path: &Path, names: &[String]) -> Result<()> {
    let mut s = String::new();
    for n in names {
        s.push_str(n);
        s.push('\n');
    }
    write_text(path, &s)
}

/// Parses a list file (`name ymin xmin ymax xmax class ...` per line) against `num_classes`.
///
/// Errors carry the file and the 1-based line number: a box with fewer than 5 numbers, a value
/// that is not a number, a class outside `1..=num_classes`. Blank lines are skipped; a line with
/// only a name is an image without objects.
pub fn read_list(path: &Path, num_classes: usize) -> Result<Vec<DetectionRecord>> {
    let text = read_text(path)?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let perr = |message: String| DatasetError::Parse {
            path: path.to_path_buf(),
            line: lineno,
            message,
        };
        let mut tokens = line.split_whitespace();
        let Some(name) = tokens.next() else { continue };
        let values: Vec<&str> = tokens.collect();
        if !values.len().is_multiple_of(5) {
            return Err(perr(format!(
                "expected the image name then 5 values per box (ymin xmin ymax xmax class), got {} values",
                values.len()
            )));
        }
        let mut rec = DetectionRecord {
            name: name.to_string(),
            boxes: Vec::with_capacity(values.len() / 5),
            labels: Vec::with_capacity(values.len() / 5),
        };
        for chunk in values.chunks_exact(5) {
            let mut b = [0f32; 4];
            for (k, v) in chunk[..4].iter().enumerate() {
                b[k] = v
                    .parse::<f32>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| perr(format!("box coordinate {v:?} is not a number")))?;
            }
            let class: i64 = chunk[4]
                .parse::<i64>()
                .or_else(|_| {
                    // Some writers emit "3.0"; accept integral floats only.
                    chunk[4]
                        .parse::<f64>()
                        .ok()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
                        .map(|f| f as i64)
                        .ok_or(())
                })
                .map_err(|_| perr(format!("class {:?} is not an integer", chunk[4])))?;
            if class < 1 || class as u64 > num_classes as u64 {
                return Err(DatasetError::ClassOutOfRange {
                    path: path.to_path_buf(),
                    line: lineno,
                    class,
                    num_classes,
                });
            }
            rec.boxes.push(b);
            rec.labels.push(class as u32);
        }
        records.push(rec);
    }
    Ok(records)
}

/// Formats records as list-file text (the inverse of [`read_list`]).
pub fn format_list(records: &[DetectionRecord]) -> String {
    let mut s = String::new();
    for r in records {
        s.push_str(&r.name);
        for (b, l) in r.boxes.iter().zip(&r.labels) {
            let _ = write!(s, " {} {} {} {} {}", b[0], b[1], b[2], b[3], l);
        }
        s.push('\n');
    }
    s
}

/// Writes records as a list file.
pub fn write_list(path: &Path, records: &[DetectionRecord]) -> Result<()> {
    write_text(path, &format_list(records))
}

/// A VOC dataset read from its root: records (image names relative to `JPEGImages/`) and the
/// class names.
#[derive(Debug, Clone)]
pub struct VocAnnotations {
    /// One record per image id of the split, in split-file order.
    pub records: Vec<DetectionRecord>,
    /// Class names; label `i` is `class_names[i - 1]`.
    pub class_names: Vec<String>,
}

/// Reads a VOC root (`Annotations/<id>.xml`, `ImageSets/Main/<split>.txt`, `JPEGImages/`).
///
/// Objects marked `difficult` are skipped; coordinates have 1 subtracted (VOC is 1-based).
/// `class_names`: `None` uses [`VOC_CLASSES`] when every object name is one of them, else the
/// sorted set of names found. With explicit names, an unknown object name is an error.
pub fn read_voc(
    root: &Path,
    split: &str,
    class_names: Option<&[String]>,
) -> Result<VocAnnotations> {
    let split_path = root
        .join("ImageSets")
        .join("Main")
        .join(format!("{split}.txt"));
    let ids: Vec<String> = read_text(&split_path)?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    if ids.is_empty() {
        return Err(DatasetError::Empty(format!(
            "VOC split file {} lists no image",
            split_path.display()
        )));
    }
    // (image name, [(object name, box)])
    let mut parsed = Vec::with_capacity(ids.len());
    for id in &ids {
        let xml_path = root.join("Annotations").join(format!("{id}.xml"));
        parsed.push(parse_voc_xml(&xml_path, id)?);
    }
    let names: Vec<String> = match class_names {
        Some(n) => n.to_vec(),
        None => {
            let found: std::collections::BTreeSet<&str> = parsed
                .iter()
                .flat_map(|(_, objs)| objs.iter().map(|(n, _)| n.as_str()))
                .collect();
            if found.iter().all(|n| VOC_CLASSES.contains(n)) {
                VOC_CLASSES.iter().map(|s| s.to_string()).collect()
            } else {
                found.into_iter().map(String::from).collect()
            }
        }
    };
    let index: HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32 + 1))
        .collect();
    let mut records = Vec::with_capacity(parsed.len());
    for ((name, objs), id) in parsed.into_iter().zip(&ids) {
        let mut rec = DetectionRecord {
            name,
            boxes: Vec::new(),
            labels: Vec::new(),
        };
        for (obj, b) in objs {
            let label = *index
                .get(obj.as_str())
                .ok_or_else(|| DatasetError::Annotation {
                    path: root.join("Annotations").join(format!("{id}.xml")),
                    message: format!(
                        "object class {obj:?} is not among the {} class names",
                        names.len()
                    ),
                })?;
            rec.boxes.push(b);
            rec.labels.push(label);
        }
        records.push(rec);
    }
    Ok(VocAnnotations {
        records,
        class_names: names,
    })
}

type VocObjects = Vec<(String, [f32; 4])>;

fn parse_voc_xml(path: &Path, id: &str) -> Result<(String, VocObjects)> {
    let text = read_text(path)?;
    let aerr = |message: String| DatasetError::Annotation {
        path: path.to_path_buf(),
        message,
    };
    let doc = roxmltree::Document::parse(&text).map_err(|e| aerr(format!("invalid XML: {e}")))?;
    let root = doc.root_element();
    let child_text = |node: roxmltree::Node, tag: &str| -> Option<String> {
        node.children()
            .find(|c| c.has_tag_name(tag))
            .and_then(|c| c.text())
            .map(|t| t.trim().to_string())
    };
    let filename = child_text(root, "filename")
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| format!("{id}.jpg"));
    let mut objs = Vec::new();
    for obj in root.children().filter(|c| c.has_tag_name("object")) {
        let difficult = child_text(obj, "difficult")
            .map(|d| d != "0" && !d.is_empty())
            .unwrap_or(false);
        if difficult {
            continue;
        }
        let name = child_text(obj, "name").ok_or_else(|| aerr("object without <name>".into()))?;
        let bnd = obj
            .children()
            .find(|c| c.has_tag_name("bndbox"))
            .ok_or_else(|| aerr(format!("object {name:?} without <bndbox>")))?;
        let coord = |tag: &str| -> Result<f32> {
            let t = child_text(bnd, tag)
                .ok_or_else(|| aerr(format!("object {name:?}: <bndbox> without <{tag}>")))?;
            t.parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| aerr(format!("object {name:?}: <{tag}> {t:?} is not a number")))
        };
        let (xmin, ymin, xmax, ymax) = (
            coord("xmin")?,
            coord("ymin")?,
            coord("xmax")?,
            coord("ymax")?,
        );
        objs.push((name, [ymin - 1.0, xmin - 1.0, ymax - 1.0, xmax - 1.0]));
    }
    Ok((filename, objs))
}

/// A COCO instances file read as records (image names = `file_name`) and class names.
#[derive(Debug, Clone)]
pub struct CocoAnnotations {
    /// One record per image, in the file's image order (images without annotations included).
    pub records: Vec<DetectionRecord>,
    /// Category names sorted by category id; label `i` is `class_names[i - 1]`.
    pub class_names: Vec<String>,
    /// The COCO category id of each label (`category_ids[label - 1]`).
    pub category_ids: Vec<u64>,
}

#[derive(serde::Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    #[serde(default)]
    annotations: Vec<CocoAnn>,
    categories: Vec<CocoCat>,
}
#[derive(serde::Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
}
#[derive(serde::Deserialize)]
struct CocoAnn {
    image_id: u64,
    bbox: [f64; 4],
    category_id: u64,
    #[serde(default)]
    iscrowd: u8,
}
#[derive(serde::Deserialize)]
struct CocoCat {
    id: u64,
    name: String,
}

/// Reads a COCO instances JSON file. Crowd annotations (`iscrowd = 1`) are skipped; categories
/// map to labels `1..=C` in increasing category id.
pub fn read_coco(path: &Path) -> Result<CocoAnnotations> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let coco: CocoFile = serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| {
        DatasetError::Annotation {
            path: path.to_path_buf(),
            message: format!("invalid COCO JSON: {e}"),
        }
    })?;
    let aerr = |message: String| DatasetError::Annotation {
        path: path.to_path_buf(),
        message,
    };
    let cats: BTreeMap<u64, String> = coco
        .categories
        .into_iter()
        .map(|c| (c.id, c.name))
        .collect();
    if cats.is_empty() {
        return Err(aerr("no category".into()));
    }
    let label_of: HashMap<u64, u32> = cats
        .keys()
        .enumerate()
        .map(|(i, &id)| (id, i as u32 + 1))
        .collect();
    let mut by_image: HashMap<u64, usize> = HashMap::new();
    let mut records = Vec::with_capacity(coco.images.len());
    for img in coco.images {
        by_image.insert(img.id, records.len());
        records.push(DetectionRecord {
            name: img.file_name,
            boxes: Vec::new(),
            labels: Vec::new(),
        });
    }
    for ann in coco.annotations {
        if ann.iscrowd != 0 {
            continue;
        }
        let &r = by_image
            .get(&ann.image_id)
            .ok_or_else(|| aerr(format!("annotation for unknown image id {}", ann.image_id)))?;
        let &label = label_of.get(&ann.category_id).ok_or_else(|| {
            aerr(format!(
                "annotation with unknown category id {}",
                ann.category_id
            ))
        })?;
        let [x, y, w, h] = ann.bbox;
        let rec = &mut records[r];
        rec.boxes.push([
            y as f32,
            x as f32,
            (y + h - 1.0) as f32,
            (x + w - 1.0) as f32,
        ]);
        rec.labels.push(label);
    }
    Ok(CocoAnnotations {
        records,
        category_ids: cats.keys().copied().collect(),
        class_names: cats.into_values().collect(),
    })
}

/// Converts a VOC split to a list file + names file (as the tutorial's converter does).
/// Returns the number of images written.
pub fn voc_to_list(
    voc_root: &Path,
    split: &str,
    class_names: Option<&[String]>,
    list_out: &Path,
    names_out: &Path,
) -> Result<usize> {
    let voc = read_voc(voc_root, split, class_names)?;
    write_list(list_out, &voc.records)?;
    write_names(names_out, &voc.class_names)?;
    Ok(voc.records.len())
}

/// Converts a COCO instances JSON to a list file + names file. Returns the number of images.
pub fn coco_to_list(coco_json: &Path, list_out: &Path, names_out: &Path) -> Result<usize> {
    let coco = read_coco(coco_json)?;
    write_list(list_out, &coco.records)?;
    write_names(names_out, &coco.class_names)?;
    Ok(coco.records.len())
}

/// A path joined to a root, for image names from annotations.
pub(crate) fn image_path(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}
