//! YOLO-format datasets, as labelling tools export them: a `data.yaml` (`names`, and `train` /
//! `val` / `test` splits, each an image folder, a text file listing images, or a list of those,
//! relative to `path` or to the YAML's folder), and one label file per image in the `labels`
//! folder beside `images` (`.../images/a/b.jpg` → `.../labels/a/b.txt`): a line
//! `class cx cy w h` per object, normalised to the image's size, class counted from 0 — or a
//! polygon `class x1 y1 x2 y2 ...` (segmentation exports), taken by its extent. An image
//! without a label file has no object.
//!
//! Boxes become this crate's `[ymin, xmin, ymax, xmax]` with inclusive maxima, as COCO's
//! `[x, y, w, h]` do (`[y, x, y + h - 1, x + w - 1]` in pixels), and back when writing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use yaml_rust2::{Yaml, YamlLoader};

use crate::annotations::DetectionRecord;
use crate::error::{DatasetError, Result};

/// Image file extensions YOLO folders are searched for.
const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"];

/// Normalised coordinates may stray this far outside [0, 1] (rounding in exporters) and are
/// clamped; beyond it a label is refused.
const SLACK: f64 = 1e-3;

/// What a `data.yaml` says.
#[derive(Debug, Clone, PartialEq)]
pub struct YoloData {
    /// The YAML file.
    pub yaml: PathBuf,
    /// The dataset root the splits are relative to (`path`, else the YAML's folder).
    pub root: PathBuf,
    /// Class names, in class-index order.
    pub names: Vec<String>,
    /// The splits' image files (as found; relative to `root` or absolute), by split name.
    pub splits: BTreeMap<String, Vec<PathBuf>>,
}

fn yerr(path: &Path, message: impl Into<String>) -> DatasetError {
    DatasetError::Annotation {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads `data.yaml` and finds the images of its splits.
pub fn read_data_yaml(yaml: &Path) -> Result<YoloData> {
    let text = std::fs::read_to_string(yaml).map_err(io(yaml))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let docs = YamlLoader::load_from_str(text).map_err(|e| {
        yerr(
            yaml,
            format!(
                "line {}, column {}: {}",
                e.marker().line(),
                e.marker().col() + 1,
                e.info()
            ),
        )
    })?;
    let Some(doc) = docs.first().filter(|d| d.as_hash().is_some()) else {
        return Err(yerr(yaml, "not a mapping of keys (names, train, val, ...)"));
    };
    let names = read_names(yaml, doc)?;
    let here = yaml.parent().unwrap_or(Path::new(""));
    let root = match &doc["path"] {
        Yaml::BadValue | Yaml::Null => here.to_path_buf(),
        Yaml::String(p) => {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                here.join(p)
            }
        }
        other => return Err(yerr(yaml, format!("`path` is {other:?}, not a folder"))),
    };
    let mut splits = BTreeMap::new();
    for key in ["train", "val", "test"] {
        let entries: Vec<&str> = match &doc[key] {
            Yaml::BadValue | Yaml::Null => continue,
            Yaml::String(s) => vec![s.as_str()],
            Yaml::Array(a) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| yerr(yaml, format!("`{key}` lists {v:?}, not a path")))
                })
                .collect::<Result<_>>()?,
            other => return Err(yerr(yaml, format!("`{key}` is {other:?}, not a path"))),
        };
        let mut images = Vec::new();
        for e in entries {
            images.extend(split_images(yaml, &root, key, e)?);
        }
        splits.insert(key.to_string(), images);
    }
    if splits.is_empty() {
        return Err(yerr(yaml, "names no split (train, val or test)"));
    }
    Ok(YoloData {
        yaml: yaml.to_path_buf(),
        root,
        names,
        splits,
    })
}

/// `names` as a list or a map from class index; `nc`, when given, must agree.
fn read_names(yaml: &Path, doc: &Yaml) -> Result<Vec<String>> {
    let names: Vec<String> = match &doc["names"] {
        Yaml::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| scalar(v).ok_or_else(|| yerr(yaml, format!("names[{i}] is {v:?}"))))
            .collect::<Result<_>>()?,
        Yaml::Hash(h) => {
            let mut by_index = BTreeMap::new();
            for (k, v) in h {
                let i = k
                    .as_i64()
                    .filter(|i| *i >= 0)
                    .ok_or_else(|| yerr(yaml, format!("names: key {k:?} is not a class index")))?;
                let n = scalar(v).ok_or_else(|| yerr(yaml, format!("names[{i}] is {v:?}")))?;
                by_index.insert(i as usize, n);
            }
            if let Some((expected, _)) = by_index.iter().enumerate().find(|(j, (i, _))| *j != **i) {
                return Err(yerr(
                    yaml,
                    format!("names: class {expected} is missing (indices must run 0, 1, 2, ...)"),
                ));
            }
            by_index.into_values().collect()
        }
        Yaml::BadValue => return Err(yerr(yaml, "no `names` (the class names)")),
        other => return Err(yerr(yaml, format!("`names` is {other:?}, not a list"))),
    };
    if names.is_empty() {
        return Err(yerr(yaml, "`names` is empty"));
    }
    let mut sorted = names.clone();
    sorted.sort();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(yerr(yaml, format!("names: `{}` appears twice", w[0])));
    }
    match &doc["nc"] {
        Yaml::Integer(n) if *n as usize != names.len() => Err(yerr(
            yaml,
            format!("nc = {n} but `names` has {} names", names.len()),
        )),
        Yaml::Integer(_) | Yaml::BadValue | Yaml::Null => Ok(names),
        other => Err(yerr(yaml, format!("`nc` is {other:?}, not a count"))),
    }
}

fn scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Real(r) => Some(r.clone()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The images one split entry names: a folder (searched recursively), a text file of image
/// paths (relative to `root`, or absolute), or one image.
fn split_images(yaml: &Path, root: &Path, key: &str, entry: &str) -> Result<Vec<PathBuf>> {
    let p = {
        let p = Path::new(entry);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        }
    };
    if p.is_dir() {
        let mut out = Vec::new();
        walk(&p, &mut out)?;
        out.sort();
        if out.is_empty() {
            return Err(yerr(
                yaml,
                format!("`{key}`: {} holds no image", p.display()),
            ));
        }
        return Ok(out);
    }
    if is_image(&p) {
        return Ok(vec![p]);
    }
    if p.is_file() {
        let text = std::fs::read_to_string(&p).map_err(io(&p))?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let list_dir = p.parent().unwrap_or(root);
        let images: Vec<PathBuf> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| {
                let q = Path::new(l);
                if q.is_absolute() {
                    q.to_path_buf()
                } else if let Some(rest) = l.strip_prefix("./") {
                    // Ultralytics' list files: `./images/...` relative to the list's folder.
                    list_dir.join(rest)
                } else {
                    root.join(q)
                }
            })
            .collect();
        if images.is_empty() {
            return Err(yerr(
                &p,
                format!("lists no image (`{key}` of {})", yaml.display()),
            ));
        }
        return Ok(images);
    }
    Err(yerr(
        yaml,
        format!("`{key}`: {} does not exist", p.display()),
    ))
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let p = e.map_err(io(dir))?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// The label file of an image: the last `images` folder of its path replaced by `labels`, the
/// extension by `.txt` (beside the image when its path has no `images` folder).
pub fn label_path(image: &Path) -> PathBuf {
    let parts: Vec<_> = image.components().collect();
    let mut out = PathBuf::new();
    let last = parts.iter().rposition(|c| c.as_os_str() == "images");
    for (i, c) in parts.iter().enumerate() {
        if Some(i) == last {
            out.push("labels");
        } else {
            out.push(c.as_os_str());
        }
    }
    out.with_extension("txt")
}

/// The boxes and labels (`1..=num_classes`) of one label file for an image of `width x height`
/// pixels; a missing file is an image without objects. Errors name the file and line.
pub fn read_label_file(
    path: &Path,
    width: u32,
    height: u32,
    num_classes: usize,
) -> Result<(Vec<[f32; 4]>, Vec<u32>)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(io(path)(e)),
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let (mut boxes, mut labels) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let perr = |message: String| DatasetError::Parse {
            path: path.to_path_buf(),
            line: line_no,
            message,
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let class: usize = fields[0]
            .parse()
            .map_err(|_| perr(format!("class `{}` is not a class index", fields[0])))?;
        if class >= num_classes {
            return Err(perr(format!(
                "class {class} is outside 0..={} (data.yaml names {num_classes} classes)",
                num_classes - 1
            )));
        }
        let v: Vec<f64> = fields[1..]
            .iter()
            .map(|f| {
                f.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| perr(format!("`{f}` is not a finite number")))
            })
            .collect::<Result<_>>()?;
        let in_range = |x: f64| (-SLACK..=1.0 + SLACK).contains(&x);
        if let Some(x) = v.iter().find(|x| !in_range(**x)) {
            return Err(perr(format!(
                "coordinate {x} is outside [0, 1] (YOLO labels are normalised to the image size)"
            )));
        }
        let (x0, y0, x1, y1) = match v.len() {
            4 => {
                let (cx, cy, w, h) = (v[0], v[1], v[2], v[3]);
                if w < 0.0 || h < 0.0 {
                    return Err(perr(format!("width {w} / height {h} is negative")));
                }
                (cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0)
            }
            k if k >= 6 && k % 2 == 0 => {
                let xs = v.iter().step_by(2);
                let ys = v.iter().skip(1).step_by(2);
                (
                    xs.clone().fold(f64::INFINITY, |m, &x| m.min(x)),
                    ys.clone().fold(f64::INFINITY, |m, &y| m.min(y)),
                    xs.fold(f64::NEG_INFINITY, |m, &x| m.max(x)),
                    ys.fold(f64::NEG_INFINITY, |m, &y| m.max(y)),
                )
            }
            k => {
                return Err(perr(format!(
                    "expected `class cx cy w h` (or a polygon `class x1 y1 x2 y2 x3 y3 ...`), got {k} numbers after the class"
                )));
            }
        };
        let (w, h) = (width as f64, height as f64);
        let px = |x: f64| (x.clamp(0.0, 1.0) * w) as f32;
        let py = |y: f64| (y.clamp(0.0, 1.0) * h) as f32;
        let (bx, by) = (px(x0), py(y0));
        let (bw, bh) = (px(x1) - bx, py(y1) - by);
        // As COCO's [x, y, w, h]: inclusive maxima, a box under a pixel stays zero-size.
        let inclusive = |lo: f32, size: f32| if size >= 1.0 { lo + size - 1.0 } else { lo };
        boxes.push([by, bx, inclusive(by, bh), inclusive(bx, bw)]);
        labels.push(class as u32 + 1);
    }
    Ok((boxes, labels))
}

/// The records of one split: image paths (relative to `root` where they lie under it) and the
/// boxes of their label files, read in parallel. `origins[i]` names record `i`'s label file.
/// A missing image gives a record without boxes (the caller's existence check names it); an
/// image whose size cannot be read is an error naming it.
pub fn split_records(data: &YoloData, split: &str) -> Result<(Vec<DetectionRecord>, Vec<String>)> {
    let Some(images) = data.splits.get(split) else {
        return Err(yerr(
            &data.yaml,
            format!(
                "has no split `{split}` (it has {})",
                data.splits.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    };
    let out: Vec<(DetectionRecord, String)> = images
        .par_iter()
        .map(|img| {
            let label = label_path(img);
            let name = img
                .strip_prefix(&data.root)
                .unwrap_or(img)
                .to_string_lossy()
                .into_owned();
            let (boxes, labels) = if img.exists() {
                let (w, h) = image::image_dimensions(img).map_err(|e| DatasetError::Image {
                    path: img.clone(),
                    message: format!("cannot read its size: {e}"),
                })?;
                read_label_file(&label, w, h, data.names.len())?
            } else {
                (Vec::new(), Vec::new())
            };
            Ok((
                DetectionRecord {
                    name,
                    boxes,
                    labels,
                },
                label.display().to_string(),
            ))
        })
        .collect::<Result<_>>()?;
    Ok(out.into_iter().unzip())
}

/// Writes records as a YOLO dataset in `out`: `images/<split>/` (hard links to the images, or
/// copies where links cannot be made), `labels/<split>/*.txt` and `data.yaml`. `splits` pairs a
/// split name with its records, their image root and image sizes are read from the files.
pub fn write_yolo(
    out: &Path,
    names: &[String],
    splits: &[(&str, &[DetectionRecord], &Path)],
) -> Result<PathBuf> {
    let mut yaml = String::from("# written by retinanet-rs\npath: .\n");
    for (split, records, image_root) in splits {
        for r in *records {
            let src = image_root.join(&r.name);
            let rel = Path::new(&r.name);
            let img = out.join("images").join(split).join(rel);
            if let Some(d) = img.parent() {
                std::fs::create_dir_all(d).map_err(io(d))?;
            }
            if !img.exists() && std::fs::hard_link(&src, &img).is_err() {
                std::fs::copy(&src, &img).map_err(io(&src))?;
            }
            let (w, h) = image::image_dimensions(&src).map_err(|e| DatasetError::Image {
                path: src.clone(),
                message: format!("cannot read its size: {e}"),
            })?;
            let mut text = String::new();
            for (b, &l) in r.boxes.iter().zip(&r.labels) {
                let (bw, bh) = (b[3] - b[1] + 1.0, b[2] - b[0] + 1.0);
                let (cx, cy) = (b[1] + bw / 2.0, b[0] + bh / 2.0);
                text.push_str(&format!(
                    "{} {:.6} {:.6} {:.6} {:.6}\n",
                    l - 1,
                    cx / w as f32,
                    cy / h as f32,
                    bw / w as f32,
                    bh / h as f32
                ));
            }
            let label = label_path(&img);
            if let Some(d) = label.parent() {
                std::fs::create_dir_all(d).map_err(io(d))?;
            }
            std::fs::write(&label, text).map_err(io(&label))?;
        }
        yaml.push_str(&format!("{split}: images/{split}\n"));
    }
    yaml.push_str(&format!("nc: {}\nnames:\n", names.len()));
    for n in names {
        yaml.push_str(&format!("  - {}\n", yaml_quote(n)));
    }
    let p = out.join("data.yaml");
    std::fs::write(&p, yaml).map_err(io(&p))?;
    Ok(p)
}

/// A YAML scalar in double quotes (names may hold `:` or `#`).
fn yaml_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}
