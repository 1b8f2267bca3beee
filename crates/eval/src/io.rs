//! Files: detections as JSON lines, ground truth as JSON lines or the tutorial's list file.
//!
//! **Detections file** (`.jsonl`): one JSON object per line and image,
//!
//! ```text
//! {"image": "000005.jpg", "boxes": [[ymin, xmin, ymax, xmax], ...], "labels": [1, 3], "scores": [0.92, 0.41]}
//! ```
//!
//! boxes in pixels of the image the ground truth refers to, labels `1..=C`, one finite score per
//! box. Blank lines are skipped. An image may be absent (it then has no detection) but must not
//! appear twice.
//!
//! **Ground-truth file**, either JSON lines of the same shape without `scores` and with the
//! optional per-box arrays `difficult` (bool, VOC), `crowd` (bool, COCO `iscrowd`) and `areas`
//! (number, COCO object area):
//!
//! ```text
//! {"image": "000005.jpg", "boxes": [[10, 20, 110, 220]], "labels": [9], "difficult": [false]}
//! ```
//!
//! or the tutorial's list file: one image per line, `name ymin xmin ymax xmax class ...` (five
//! numbers a box, class `1..=C`). A file whose first non-blank character is `{` is read as JSON
//! lines. Class names: one per line ([`read_names`]).
//!
//! Every file may start with a UTF-8 byte-order mark and use CRLF line ends. Errors name the
//! file and the line.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Detections, EvalError, Evaluator, GroundTruth};

/// One line of a detections file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectionRecord {
    /// Image name, as in the ground truth.
    pub image: String,
    /// `[ymin, xmin, ymax, xmax]` per detection.
    pub boxes: Vec<[f32; 4]>,
    /// Label `1..=C` per detection.
    pub labels: Vec<u32>,
    /// Score per detection.
    pub scores: Vec<f32>,
}

impl DetectionRecord {
    /// A borrowed view for the evaluators.
    pub fn as_detections(&self) -> Detections<'_> {
        Detections::new(&self.boxes, &self.labels, &self.scores)
    }
}

/// Ground truth of one image, as read from a file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroundTruthRecord {
    /// Image name.
    pub image: String,
    /// `[ymin, xmin, ymax, xmax]` per object.
    pub boxes: Vec<[f32; 4]>,
    /// Label `1..=C` per object.
    pub labels: Vec<u32>,
    /// VOC difficult flags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difficult: Option<Vec<bool>>,
    /// COCO `iscrowd` flags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crowd: Option<Vec<bool>>,
    /// COCO object areas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub areas: Option<Vec<f64>>,
}

impl GroundTruthRecord {
    /// A borrowed view for the evaluators.
    pub fn as_ground_truth(&self) -> GroundTruth<'_> {
        GroundTruth {
            boxes: &self.boxes,
            labels: &self.labels,
            difficult: self.difficult.as_deref(),
            crowd: self.crowd.as_deref(),
            areas: self.areas.as_deref(),
        }
    }
}

fn io_err(path: &Path, source: std::io::Error) -> EvalError {
    EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A text file's contents, a leading UTF-8 byte-order mark dropped (editors on Windows write
/// one; it would otherwise become part of the first name, or break the first JSON line).
fn read_text(path: &Path) -> Result<String, EvalError> {
    let mut text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

fn parse_err(path: &Path, line: usize, message: impl Into<String>) -> EvalError {
    EvalError::Parse {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Writes a detections file, one image per call.
pub struct DetectionsWriter<W: Write> {
    out: W,
}

impl DetectionsWriter<BufWriter<File>> {
    /// Creates (truncates) the file at `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Self, EvalError> {
        let path = path.as_ref();
        let f = File::create(path).map_err(|e| io_err(path, e))?;
        Ok(Self {
            out: BufWriter::new(f),
        })
    }
}

impl<W: Write> DetectionsWriter<W> {
    /// Writes to any sink.
    pub fn new(out: W) -> Self {
        Self { out }
    }

    /// Appends the detections of one image.
    pub fn write(
        &mut self,
        image: &str,
        boxes: &[[f32; 4]],
        labels: &[u32],
        scores: &[f32],
    ) -> std::io::Result<()> {
        #[derive(Serialize)]
        struct Line<'a> {
            image: &'a str,
            boxes: &'a [[f32; 4]],
            labels: &'a [u32],
            scores: &'a [f32],
        }
        serde_json::to_writer(
            &mut self.out,
            &Line {
                image,
                boxes,
                labels,
                scores,
            },
        )?;
        self.out.write_all(b"\n")
    }

    /// Flushes and returns the sink.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Streams a detections file: yields `(line number, record)`, one image at a time.
pub struct DetectionsReader {
    path: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
    line: usize,
}

impl DetectionsReader {
    /// Opens the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, EvalError> {
        let path = path.as_ref().to_path_buf();
        let f = File::open(&path).map_err(|e| io_err(&path, e))?;
        Ok(Self {
            path,
            lines: BufReader::new(f).lines(),
            line: 0,
        })
    }
}

impl Iterator for DetectionsReader {
    type Item = Result<(usize, DetectionRecord), EvalError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let text = match self.lines.next()? {
                Ok(t) => t,
                Err(e) => return Some(Err(io_err(&self.path, e))),
            };
            self.line += 1;
            let text = match (self.line, text.strip_prefix('\u{feff}')) {
                (1, Some(rest)) => rest.to_string(),
                _ => text,
            };
            if text.trim().is_empty() {
                continue;
            }
            return Some(
                serde_json::from_str::<DetectionRecord>(&text)
                    .map(|r| (self.line, r))
                    .map_err(|e| {
                        parse_err(&self.path, self.line, format!("bad detection record: {e}"))
                    }),
            );
        }
    }
}

/// Reads a whole detections file.
pub fn read_detections(path: impl AsRef<Path>) -> Result<Vec<DetectionRecord>, EvalError> {
    DetectionsReader::open(path)?
        .map(|r| r.map(|(_, rec)| rec))
        .collect()
}

/// Reads class names, one per line (blank lines skipped, surrounding spaces trimmed). An empty
/// file, or a name given twice, is an error naming the file (and the line).
pub fn read_names(path: impl AsRef<Path>) -> Result<Vec<String>, EvalError> {
    let path = path.as_ref();
    let text = read_text(path)?;
    let mut names: Vec<String> = Vec::new();
    let mut lines: HashMap<&str, usize> = HashMap::new();
    for (i, l) in text.lines().enumerate() {
        let name = l.trim();
        if name.is_empty() {
            continue;
        }
        if let Some(prev) = lines.insert(name, i + 1) {
            return Err(parse_err(
                path,
                i + 1,
                format!("class name {name:?} is already on line {prev}"),
            ));
        }
        names.push(name.to_string());
    }
    if names.is_empty() {
        return Err(EvalError::File {
            path: path.to_path_buf(),
            message: "no class name (one name per line)".into(),
        });
    }
    Ok(names)
}

/// Reads ground truth from a JSON-lines file or a tutorial list file (see the module docs).
/// Returns `(line number, record)` pairs.
pub fn read_ground_truth(
    path: impl AsRef<Path>,
) -> Result<Vec<(usize, GroundTruthRecord)>, EvalError> {
    let path = path.as_ref();
    let text = read_text(path)?;
    let json = text.trim_start().starts_with('{');
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let rec = if json {
            serde_json::from_str::<GroundTruthRecord>(l)
                .map_err(|e| parse_err(path, line, format!("bad ground-truth record: {e}")))?
        } else {
            parse_list_line(l).map_err(|m| parse_err(path, line, m))?
        };
        out.push((line, rec));
    }
    Ok(out)
}

/// One line of the tutorial's list file: `name ymin xmin ymax xmax class ...`.
fn parse_list_line(l: &str) -> Result<GroundTruthRecord, String> {
    let mut it = l.split_whitespace();
    let image = it.next().ok_or("empty line")?.to_string();
    let fields: Vec<&str> = it.collect();
    if !fields.len().is_multiple_of(5) {
        return Err(format!(
            "{} numbers after the name, not a multiple of 5 (ymin xmin ymax xmax class)",
            fields.len()
        ));
    }
    let mut rec = GroundTruthRecord {
        image,
        ..Default::default()
    };
    for chunk in fields.chunks(5) {
        let mut b = [0f32; 4];
        for (v, s) in b.iter_mut().zip(chunk) {
            *v = s.parse().map_err(|_| format!("bad coordinate {s:?}"))?;
        }
        let label: u32 = chunk[4]
            .parse()
            .map_err(|_| format!("bad class {:?}", chunk[4]))?;
        rec.boxes.push(b);
        rec.labels.push(label);
    }
    Ok(rec)
}

/// Scores a detections file against a ground-truth file, feeding `evaluator` image by image
/// (detections are streamed, never held all at once). Images are added in the detections file's
/// order, then the ground-truth images that had no detections line, in their order. An image in
/// the detections that the ground truth lacks, or one listed twice, is an error.
pub fn evaluate_files(
    ground_truth: impl AsRef<Path>,
    detections: impl AsRef<Path>,
    evaluator: &mut Evaluator,
) -> Result<(), EvalError> {
    let (gt_path, det_path) = (ground_truth.as_ref(), detections.as_ref());
    let gts = read_ground_truth(gt_path)?;
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(gts.len());
    for (i, (line, g)) in gts.iter().enumerate() {
        if index.insert(&g.image, i).is_some() {
            return Err(parse_err(
                gt_path,
                *line,
                format!("image {:?} listed twice", g.image),
            ));
        }
        // Bad ground truth is reported against its own file, not the detections line.
        crate::input::validate(
            i,
            evaluator.names().len(),
            &g.as_ground_truth(),
            &Detections::default(),
        )
        .map_err(|e| EvalError::Record {
            path: gt_path.to_path_buf(),
            line: *line,
            name: g.image.clone(),
            source: Box::new(e),
        })?;
    }
    let mut seen = vec![false; gts.len()];
    for item in DetectionsReader::open(det_path)? {
        let (line, det) = item?;
        let &i = index.get(det.image.as_str()).ok_or_else(|| {
            parse_err(
                det_path,
                line,
                format!("image {:?} is not in {}", det.image, gt_path.display()),
            )
        })?;
        if std::mem::replace(&mut seen[i], true) {
            return Err(parse_err(
                det_path,
                line,
                format!("image {:?} listed twice", det.image),
            ));
        }
        evaluator
            .add(&gts[i].1.as_ground_truth(), &det.as_detections())
            .map_err(|e| EvalError::Record {
                path: det_path.to_path_buf(),
                line,
                name: det.image.clone(),
                source: Box::new(e),
            })?;
    }
    for (i, (line, g)) in gts.iter().enumerate() {
        if !seen[i] {
            evaluator
                .add(&g.as_ground_truth(), &Detections::default())
                .map_err(|e| EvalError::Record {
                    path: gt_path.to_path_buf(),
                    line: *line,
                    name: g.image.clone(),
                    source: Box::new(e),
                })?;
        }
    }
    Ok(())
}
