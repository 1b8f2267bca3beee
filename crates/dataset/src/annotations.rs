//! Annotation formats: the tutorial's list file + names file, VOC and COCO readers, converters.
//!
//! All boxes are `[ymin, xmin, ymax, xmax]` in 0-based pixel coordinates with the maxima
//! inclusive (the pixel index of the last row/column), as the tutorial's VOC converter produces
//! (VOC's 1-based coordinates minus 1). COCO `[x, y, w, h]` becomes `[y, x, y + h - 1, x + w - 1]`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

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

/// Removes a leading UTF-8 byte-order mark: editors on Windows write one, and it would otherwise
/// become an invisible part of the first name in the file.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Reads a text file (UTF-8, an optional byte-order mark dropped). Line ends may be LF or CRLF:
/// every reader splits with `str::lines`, which takes both.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let mut text = std::fs::read_to_string(path).map_err(io_err(path))?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    std::fs::write(path, text).map_err(io_err(path))
}

/// What makes a `[ymin, xmin, ymax, xmax]` box unusable, if anything: a coordinate that is not
/// finite, or a maximum below its minimum (an inverted box). Zero-size boxes are fine.
pub fn box_problem(b: &[f32; 4]) -> Option<String> {
    const NAMES: [&str; 4] = ["ymin", "xmin", "ymax", "xmax"];
    if let Some(k) = b.iter().position(|v| !v.is_finite()) {
        return Some(format!("{} is {}", NAMES[k], b[k]));
    }
    if b[2] < b[0] {
        return Some(format!("ymax {} is below ymin {}", b[2], b[0]));
    }
    if b[3] < b[1] {
        return Some(format!("xmax {} is below xmin {}", b[3], b[1]));
    }
    None
}

/// Reads a names file: one class name per non-empty line; line `i` (1-based, blank lines
/// skipped) is label `i`. A name given twice is an error (labels map names one to one).
pub fn read_names(path: &Path) -> Result<Vec<String>> {
    let text = read_text(path)?;
    let mut names: Vec<String> = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (i, l) in text.lines().enumerate() {
        let name = l.trim();
        if name.is_empty() {
            continue;
        }
        if let Some(prev) = first_line.insert(name.to_string(), i + 1) {
            return Err(DatasetError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                message: format!("class name {name:?} is already on line {prev}"),
            });
        }
        names.push(name.to_string());
    }
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
/// that is not a finite number, an inverted box (`ymax < ymin` or `xmax < xmin`), a class
/// outside `1..=num_classes`. Blank lines are skipped; a line with only a name is an image
/// without objects. A byte-order mark and CRLF line ends are accepted.
pub fn read_list(path: &Path, num_classes: usize) -> Result<Vec<DetectionRecord>> {
    Ok(read_list_lines(path, num_classes)?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// [`read_list`] with the 1-based line number of each record.
pub fn read_list_lines(path: &Path, num_classes: usize) -> Result<Vec<(usize, DetectionRecord)>> {
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
        for (j, chunk) in values.chunks_exact(5).enumerate() {
            let mut b = [0f32; 4];
            for (k, v) in chunk[..4].iter().enumerate() {
                b[k] = v
                    .parse::<f32>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| perr(format!("box coordinate {v:?} is not a number")))?;
            }
            if let Some(problem) = box_problem(&b) {
                return Err(perr(format!(
                    "box {} [{} {} {} {}] (ymin xmin ymax xmax): {problem}",
                    j + 1,
                    chunk[0],
                    chunk[1],
                    chunk[2],
                    chunk[3]
                )));
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
                    names_file: None,
                });
            }
            rec.boxes.push(b);
            rec.labels.push(class as u32);
        }
        records.push((lineno, rec));
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
    /// Per record: its XML file and id, for messages about it.
    pub origins: Vec<String>,
}

/// The file that fixes a VOC root's class list when present: `<root>/classes.txt`, one name per
/// line (label `i` is line `i`).
pub fn voc_classes_file(root: &Path) -> PathBuf {
    root.join("classes.txt")
}

/// Image file extensions tried for a VOC id, in order, before the XML's `<filename>`.
pub const VOC_IMAGE_EXTENSIONS: [&str; 8] =
    ["jpg", "jpeg", "png", "JPG", "JPEG", "PNG", "bmp", "gif"];

/// Reads a VOC root (`Annotations/<id>.xml`, `ImageSets/Main/<split>.txt`, `JPEGImages/`).
///
/// Objects marked `difficult` are skipped; coordinates have 1 subtracted (VOC is 1-based).
/// The class list is, in this order: `class_names` when given (an object of another class is an
/// error naming the XML and the id); `<root>/classes.txt` when present; else [`VOC_CLASSES`]
/// when every object name is one of them, else the sorted set of names found.
///
/// The image of an id is `JPEGImages/<id>.jpg` (then the other [`VOC_IMAGE_EXTENSIONS`]); the
/// XML's `<filename>` is only a fallback, as exports often leave it stale.
pub fn read_voc(
    root: &Path,
    split: &str,
    class_names: Option<&[String]>,
) -> Result<VocAnnotations> {
    let mut v = read_voc_splits(root, &[split], class_names)?;
    Ok(v.remove(0))
}

/// Several splits of one VOC root with one class list (see [`read_voc`] for how it is chosen;
/// without `class_names` or `classes.txt` it is found from the objects of *all* `splits`, so a
/// class seen in only one split still gets the same label in every split).
pub fn read_voc_splits(
    root: &Path,
    splits: &[&str],
    class_names: Option<&[String]>,
) -> Result<Vec<VocAnnotations>> {
    let parsed: Vec<Vec<VocImage>> = splits
        .iter()
        .map(|split| read_voc_split(root, split))
        .collect::<Result<_>>()?;
    let classes_file = voc_classes_file(root);
    let names: Vec<String> = match class_names {
        Some(n) => n.to_vec(),
        None if classes_file.is_file() => read_names(&classes_file)?,
        None => {
            let found: std::collections::BTreeSet<&str> = parsed
                .iter()
                .flatten()
                .flat_map(|img| img.objects.iter().map(|(n, _)| n.as_str()))
                .collect();
            if found.iter().all(|n| VOC_CLASSES.contains(n)) {
                VOC_CLASSES.iter().map(|s| s.to_string()).collect()
            } else {
                found.into_iter().map(String::from).collect()
            }
        }
    };
    if names.is_empty() {
        return Err(DatasetError::Empty(format!(
            "VOC root {} has no object and no class list",
            root.display()
        )));
    }
    let index: HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32 + 1))
        .collect();
    let mut out = Vec::with_capacity(parsed.len());
    for images in parsed {
        let mut records = Vec::with_capacity(images.len());
        let mut origins = Vec::with_capacity(images.len());
        for img in images {
            let mut rec = DetectionRecord {
                name: img.image,
                boxes: Vec::with_capacity(img.objects.len()),
                labels: Vec::with_capacity(img.objects.len()),
            };
            for (obj, b) in img.objects {
                let label = *index
                    .get(obj.as_str())
                    .ok_or_else(|| DatasetError::UnknownClass {
                        location: img.origin.clone(),
                        class: obj.clone(),
                        classes: names.clone(),
                    })?;
                rec.boxes.push(b);
                rec.labels.push(label);
            }
            records.push(rec);
            origins.push(img.origin);
        }
        out.push(VocAnnotations {
            records,
            class_names: names.clone(),
            origins,
        });
    }
    Ok(out)
}

/// One image of a VOC split: its image name (relative to `JPEGImages/`), the XML and id for
/// messages, and its non-difficult objects.
struct VocImage {
    image: String,
    origin: String,
    objects: Vec<(String, [f32; 4])>,
}

fn read_voc_split(root: &Path, split: &str) -> Result<Vec<VocImage>> {
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
    let images = root.join("JPEGImages");
    let parsed: Vec<Result<VocImage>> = ids
        .par_iter()
        .map(|id| {
            let xml = root.join("Annotations").join(format!("{id}.xml"));
            let (filename, objects) = parse_voc_xml(&xml, id, &split_path)?;
            let (image, origin) = match resolve_voc_image(&images, id, filename.as_deref()) {
                Ok(name) => (name, format!("{} (id {id})", xml.display())),
                // The missing-image check names this record: say what was tried.
                Err(tried) => (
                    format!("{id}.jpg"),
                    format!("{} (id {id}; {tried})", xml.display()),
                ),
            };
            Ok(VocImage {
                image,
                origin,
                objects,
            })
        })
        .collect();
    parsed.into_iter().collect()
}

/// The image of VOC id `id`, relative to `images`: `<id>.<ext>` for the first existing
/// extension, else the XML's `<filename>` if that exists; else what was tried.
fn resolve_voc_image(
    images: &Path,
    id: &str,
    filename: Option<&str>,
) -> std::result::Result<String, String> {
    for ext in VOC_IMAGE_EXTENSIONS {
        let name = format!("{id}.{ext}");
        if images.join(&name).is_file() {
            return Ok(name);
        }
    }
    let tried = format!(
        "no JPEGImages/{id}.{{{}}}",
        VOC_IMAGE_EXTENSIONS[..3].join(",")
    );
    match filename {
        Some(f) if images.join(f).is_file() => Ok(f.to_string()),
        Some(f) => Err(format!("{tried}, nor its <filename> {f:?}")),
        None => Err(tried),
    }
}

type VocObjects = Vec<(String, [f32; 4])>;

fn parse_voc_xml(path: &Path, id: &str, split_path: &Path) -> Result<(Option<String>, VocObjects)> {
    let aerr = |message: String| DatasetError::Annotation {
        path: path.to_path_buf(),
        message: format!("id {id}: {message}"),
    };
    let text = match read_text(path) {
        Ok(t) => t,
        Err(DatasetError::Io { source, .. }) => {
            return Err(aerr(format!(
                "cannot read the annotation of this id (listed in {}): {source}",
                split_path.display()
            )));
        }
        Err(e) => return Err(e),
    };
    let doc = roxmltree::Document::parse(&text).map_err(|e| aerr(format!("invalid XML: {e}")))?;
    let root = doc.root_element();
    let child_text = |node: roxmltree::Node, tag: &str| -> Option<String> {
        node.children()
            .find(|c| c.has_tag_name(tag))
            .and_then(|c| c.text())
            .map(|t| t.trim().to_string())
    };
    let filename = child_text(root, "filename").filter(|f| !f.is_empty());
    let mut objs = Vec::new();
    for (k, obj) in root
        .children()
        .filter(|c| c.has_tag_name("object"))
        .enumerate()
    {
        let k = k + 1;
        let difficult = child_text(obj, "difficult")
            .map(|d| d != "0" && !d.is_empty())
            .unwrap_or(false);
        if difficult {
            continue;
        }
        let name = child_text(obj, "name")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| aerr(format!("object {k} has no <name>")))?;
        let bnd = obj
            .children()
            .find(|c| c.has_tag_name("bndbox"))
            .ok_or_else(|| aerr(format!("object {k} ({name:?}) has no <bndbox>")))?;
        let coord = |tag: &str| -> Result<f32> {
            let t = child_text(bnd, tag)
                .ok_or_else(|| aerr(format!("object {k} ({name:?}): <bndbox> has no <{tag}>")))?;
            t.parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    aerr(format!(
                        "object {k} ({name:?}): <{tag}> {t:?} is not a number"
                    ))
                })
        };
        let (xmin, ymin, xmax, ymax) = (
            coord("xmin")?,
            coord("ymin")?,
            coord("xmax")?,
            coord("ymax")?,
        );
        let b = [ymin - 1.0, xmin - 1.0, ymax - 1.0, xmax - 1.0];
        if let Some(problem) = box_problem(&b) {
            return Err(aerr(format!(
                "object {k} ({name:?}): <bndbox> xmin {xmin} ymin {ymin} xmax {xmax} ymax {ymax} is inverted ({problem})"
            )));
        }
        objs.push((name, b));
    }
    Ok((filename, objs))
}

/// A COCO instances file read as records (image names = `file_name`) and class names.
#[derive(Debug, Clone)]
pub struct CocoAnnotations {
    /// One record per image, in the file's image order (images without annotations included).
    pub records: Vec<DetectionRecord>,
    /// Class names; label `i` is `class_names[i - 1]`. Read alone, the file's categories sorted
    /// by category id.
    pub class_names: Vec<String>,
    /// The COCO category id of each label (`category_ids[label - 1]`); `0` (no COCO id) for a
    /// class of an explicit class list that this file has no category for.
    pub category_ids: Vec<u64>,
    /// Per record: the file and image id, for messages about it.
    pub origins: Vec<String>,
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
    #[serde(default)]
    id: Option<u64>,
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

fn parse_coco(path: &Path) -> Result<CocoFile> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| DatasetError::Annotation {
        path: path.to_path_buf(),
        message: format!("invalid COCO JSON: {e}"),
    })
}

/// The categories of a parsed file by id; a repeated id is an error.
fn coco_categories(path: &Path, coco: &CocoFile) -> Result<BTreeMap<u64, String>> {
    let mut cats = BTreeMap::new();
    for c in &coco.categories {
        if let Some(prev) = cats.insert(c.id, c.name.clone()) {
            return Err(DatasetError::Annotation {
                path: path.to_path_buf(),
                message: format!(
                    "category id {} is given twice ({prev:?} and {:?})",
                    c.id, c.name
                ),
            });
        }
    }
    if cats.is_empty() {
        return Err(DatasetError::Annotation {
            path: path.to_path_buf(),
            message: "no category".into(),
        });
    }
    Ok(cats)
}

/// Reads a COCO instances JSON file. Crowd annotations (`iscrowd = 1`) are skipped; categories
/// map to labels `1..=C` in increasing category id.
pub fn read_coco(path: &Path) -> Result<CocoAnnotations> {
    let mut v = read_coco_files(&[path], None)?;
    Ok(v.remove(0))
}

/// Several COCO files (e.g. train and val) with one class list: `class_names` when given
/// (categories are matched by name; an annotation of another category is an error), else the
/// union of the files' categories, mapped once by id (labels in increasing id). A category id
/// that two files name differently, or two ids with one name, is an error.
///
/// Boxes: `[x, y, w, h]` becomes `[y, x, y + h - 1, x + w - 1]`; a negative or non-finite
/// `w`/`h` is an error, and a size below one pixel gives a zero-size box (not an inverted one).
pub fn read_coco_files(
    paths: &[&Path],
    class_names: Option<&[String]>,
) -> Result<Vec<CocoAnnotations>> {
    let files: Vec<CocoFile> = paths.iter().map(|p| parse_coco(p)).collect::<Result<_>>()?;
    let mut per_file = Vec::with_capacity(files.len());
    // Union of the categories by id, with the file each came from first.
    let mut union: BTreeMap<u64, (String, &Path)> = BTreeMap::new();
    for (path, coco) in paths.iter().zip(&files) {
        let cats = coco_categories(path, coco)?;
        for (&id, name) in &cats {
            match union.get(&id) {
                Some((other, p)) if other != name => {
                    return Err(DatasetError::Annotation {
                        path: path.to_path_buf(),
                        message: format!(
                            "category id {id} is {name:?} here but {other:?} in {}",
                            p.display()
                        ),
                    });
                }
                Some(_) => {}
                None => {
                    union.insert(id, (name.clone(), path));
                }
            }
        }
        per_file.push(cats);
    }
    let mut by_name: HashMap<&str, u64> = HashMap::new();
    for (&id, (name, path)) in &union {
        if let Some(other) = by_name.insert(name.as_str(), id) {
            return Err(DatasetError::Annotation {
                path: path.to_path_buf(),
                message: format!("categories {other} and {id} are both named {name:?}"),
            });
        }
    }
    let names: Vec<String> = match class_names {
        Some(n) => n.to_vec(),
        None => union.values().map(|(n, _)| n.clone()).collect(),
    };
    let label_of_name: HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32 + 1))
        .collect();
    let mut out = Vec::with_capacity(files.len());
    for ((path, coco), cats) in paths.iter().zip(files).zip(per_file) {
        let aerr = |message: String| DatasetError::Annotation {
            path: path.to_path_buf(),
            message,
        };
        let mut by_image: HashMap<u64, usize> = HashMap::new();
        let mut records = Vec::with_capacity(coco.images.len());
        let mut origins = Vec::with_capacity(coco.images.len());
        for img in coco.images {
            if by_image.insert(img.id, records.len()).is_some() {
                return Err(aerr(format!("image id {} is given twice", img.id)));
            }
            origins.push(format!(
                "{} (image id {}, {:?})",
                path.display(),
                img.id,
                img.file_name
            ));
            records.push(DetectionRecord {
                name: img.file_name,
                boxes: Vec::new(),
                labels: Vec::new(),
            });
        }
        for (k, ann) in coco.annotations.into_iter().enumerate() {
            if ann.iscrowd != 0 {
                continue;
            }
            let what = match ann.id {
                Some(id) => format!("annotation id {id}"),
                None => format!("annotation {} (no id)", k + 1),
            };
            let &r = by_image
                .get(&ann.image_id)
                .ok_or_else(|| aerr(format!("{what} is for unknown image id {}", ann.image_id)))?;
            let cat = cats.get(&ann.category_id).ok_or_else(|| {
                aerr(format!(
                    "{what} has unknown category id {}",
                    ann.category_id
                ))
            })?;
            let &label =
                label_of_name
                    .get(cat.as_str())
                    .ok_or_else(|| DatasetError::UnknownClass {
                        location: format!("{} ({what})", origins[r]),
                        class: cat.clone(),
                        classes: names.clone(),
                    })?;
            let [x, y, w, h] = ann.bbox;
            if !(ann.bbox.iter().all(|v| v.is_finite()) && w >= 0.0 && h >= 0.0) {
                return Err(aerr(format!(
                    "{what}: bbox [x, y, w, h] = {:?} needs finite values and w, h >= 0",
                    ann.bbox
                )));
            }
            // Inclusive maxima: a box under one pixel wide is a zero-size box at its corner.
            let inclusive_max = |lo: f64, size: f64| if size >= 1.0 { lo + size - 1.0 } else { lo };
            let b = [
                y as f32,
                x as f32,
                inclusive_max(y, h) as f32,
                inclusive_max(x, w) as f32,
            ];
            if let Some(problem) = box_problem(&b) {
                return Err(aerr(format!("{what}: bbox {:?}: {problem}", ann.bbox)));
            }
            let rec = &mut records[r];
            rec.boxes.push(b);
            rec.labels.push(label);
        }
        let category_ids = names
            .iter()
            .map(|n| cats.iter().find(|(_, c)| *c == n).map_or(0, |(&id, _)| id))
            .collect();
        out.push(CocoAnnotations {
            records,
            class_names: names.clone(),
            category_ids,
            origins,
        });
    }
    Ok(out)
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
