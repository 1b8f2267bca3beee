//! Synthetic shapes: the built-in default data of every pipeline.
//!
//! Scenes are generated deterministically from a seed and written once to a cache folder, in
//! the list-file format (detection) or as an ImageFolder (classification), so training reads
//! them through the same readers as real data. Generation writes into a temporary folder that is
//! renamed into place when complete, so an interrupted or concurrent run never leaves a partial
//! dataset behind.
//!
//! Detection scenes: a varied background (flat, gradient, noise or stripes), clutter (thin lines
//! and small dots, never labelled), and 1..=`max_objects` shapes of random colour and size
//! (`object_size`, by default 20 to 80 px: up to half the default 160 px scene). Shapes may
//! overlap, but a new shape may not hide more than half of an earlier one; each box is the exact
//! bounding box of the shape's visible pixels.
//!
//! The small-object mode ([`Background::Textured`], e.g. 400 px scenes with `min_objects` 10 to
//! `max_objects` 40 shapes of 8 to 30 px) draws many small shapes on multi-scale noise textures
//! with more clutter, each shape coloured to stand out from the background under it: a stand-in
//! for aerial or microscopy data that needs no download.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::Rng;
use rand::rngs::StdRng;
use rayon::prelude::*;

use crate::annotations::{DetectionRecord, write_list, write_names};
use crate::error::{DatasetError, Result, io_err};
use crate::loader::item_rng;

/// The kinds of shapes the generator draws (one class each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// Axis-aligned filled rectangle.
    Rectangle,
    /// Filled ellipse (circles included).
    Ellipse,
    /// Filled triangle (apex up or down).
    Triangle,
    /// A plus-shaped cross.
    Cross,
}

impl Shape {
    /// All shapes, in their default class order.
    pub const ALL: [Shape; 4] = [
        Shape::Rectangle,
        Shape::Ellipse,
        Shape::Triangle,
        Shape::Cross,
    ];

    /// Class name.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Rectangle => "rectangle",
            Shape::Ellipse => "ellipse",
            Shape::Triangle => "triangle",
            Shape::Cross => "cross",
        }
    }
}

/// The background of detection scenes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Background {
    /// Flat, gradient, noise or stripes (the default data).
    #[default]
    Plain,
    /// Multi-scale value-noise texture between two colours with fine grain, and clutter in
    /// proportion to the scene's area.
    Textured,
}

/// Generator settings. The cache folder name is derived from all of them, so changing any
/// setting generates a new dataset instead of reusing a stale one.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticConfig {
    /// Side of the square detection scenes (source images, before any transform).
    pub image_size: u32,
    /// Side of the square classification images.
    pub class_image_size: u32,
    /// Training images (detection) or training images per class (classification).
    pub num_train: usize,
    /// Held-out images (detection) or held-out images per class (classification).
    pub num_eval: usize,
    /// The classes, in label order (detection labels 1..=C, classification 0..C).
    pub classes: Vec<Shape>,
    /// Most objects in one detection scene.
    pub max_objects: usize,
    /// Fewest objects drawn for a scene (1; a shape that finds no free place after 20 tries is
    /// left out).
    pub min_objects: usize,
    /// The scenes' background.
    pub background: Background,
    /// Side range `[min, max]` of the detection shapes in scene pixels (drawn log-uniformly, so
    /// each octave is equally common).
    pub object_size: [f32; 2],
    /// Seed of everything.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            image_size: 160,
            class_image_size: 64,
            num_train: 2000,
            num_eval: 200,
            classes: Shape::ALL.to_vec(),
            max_objects: 5,
            min_objects: 1,
            background: Background::Plain,
            object_size: [20.0, 80.0],
            seed: 0,
        }
    }
}

impl SyntheticConfig {
    fn validate(&self) -> Result<()> {
        if self.image_size < 32 || self.class_image_size < 16 {
            return Err(DatasetError::Invalid(format!(
                "synthetic image sizes must be at least 32 (detection) and 16 (classification), got {} and {}",
                self.image_size, self.class_image_size
            )));
        }
        if self.classes.is_empty()
            || self.num_train == 0
            || self.num_eval == 0
            || self.max_objects == 0
        {
            return Err(DatasetError::Invalid(
                "synthetic data needs at least one class, one train image, one eval image and max_objects >= 1".into(),
            ));
        }
        if !(1..=self.max_objects).contains(&self.min_objects) {
            return Err(DatasetError::Invalid(format!(
                "synthetic min_objects = {} must lie in 1..=max_objects ({})",
                self.min_objects, self.max_objects
            )));
        }
        let [lo, hi] = self.object_size;
        if !(lo >= 4.0 && lo <= hi && hi <= self.image_size as f32 - 2.0) {
            return Err(DatasetError::Invalid(format!(
                "synthetic object_size = [{lo}, {hi}] must satisfy 4 <= min <= max <= image_size - 2 = {}",
                self.image_size as f32 - 2.0
            )));
        }
        Ok(())
    }

    fn key(&self, kind: &str) -> String {
        // Classification images do not use the object sizes: leave them out of that key.
        let mut sizes = if kind == "cls" {
            String::new()
        } else {
            format!("|{:?}", self.object_size)
        };
        // Settings added later enter the key only when set, so the default data keeps its
        // folder.
        if kind != "cls" && (self.min_objects != 1 || self.background != Background::Plain) {
            sizes.push_str(&format!("|{}|{:?}", self.min_objects, self.background));
        }
        let desc = format!(
            "{kind}|{}|{}|{}|{}|{:?}|{}|{}{sizes}|v1",
            self.image_size,
            self.class_image_size,
            self.num_train,
            self.num_eval,
            self.classes,
            self.max_objects,
            self.seed
        );
        // FNV-1a: a stable, dependency-free fingerprint for the folder name.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in desc.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let size = if kind == "cls" {
            self.class_image_size
        } else {
            self.image_size
        };
        format!("shapes-{kind}-{size}-s{}-{h:016x}", self.seed)
    }

    fn class_names(&self) -> Vec<String> {
        self.classes.iter().map(|s| s.name().to_string()).collect()
    }
}

/// Paths of a generated detection dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticDetection {
    /// The dataset folder.
    pub dir: PathBuf,
    /// Training list file.
    pub train_list: PathBuf,
    /// Held-out list file.
    pub eval_list: PathBuf,
    /// Names file.
    pub names_file: PathBuf,
    /// Image root the list files' names are relative to.
    pub image_root: PathBuf,
}

/// Paths of a generated classification dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticClassification {
    /// The dataset folder.
    pub dir: PathBuf,
    /// Training ImageFolder root.
    pub train_root: PathBuf,
    /// Held-out ImageFolder root.
    pub eval_root: PathBuf,
}

const DONE: &str = "COMPLETE";

/// Generates `dir` with `fill` unless it already exists complete: `fill` writes into a fresh
/// temporary folder that is then renamed to `dir`.
fn ensure_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if dir.join(DONE).is_file() {
        return Ok(());
    }
    let parent = dir.parent().expect("cache folder has a parent");
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("data");
    let tmp = parent.join(format!(".tmp-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let result = fill(&tmp)
        .and_then(|_| std::fs::write(tmp.join(DONE), "ok\n").map_err(io_err(tmp.join(DONE))));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // A leftover incomplete folder (from an older crash) is replaced.
    if dir.exists() && !dir.join(DONE).is_file() {
        let _ = std::fs::remove_dir_all(dir);
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Someone else finished first: theirs is identical (same seed and settings).
        if dir.join(DONE).is_file() {
            return Ok(());
        }
        return Err(DatasetError::Io {
            path: dir.to_path_buf(),
            source: e,
        });
    }
    Ok(())
}

fn save_jpeg(img: &RgbImage, path: &Path) -> Result<()> {
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut w = std::io::BufWriter::new(file);
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut w, 92);
    img.write_with_encoder(enc)
        .map_err(|e| DatasetError::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Makes sure the synthetic detection dataset for `config` exists under `cache_dir` (generating
/// it on first use) and returns its paths.
///
/// ```no_run
/// use retinanet_dataset::{DetectionDataset, synthetic};
/// let cfg = synthetic::SyntheticConfig::default();
/// let p = synthetic::ensure_detection("cache".as_ref(), &cfg).unwrap();
/// let train = DetectionDataset::from_list(&p.train_list, &p.names_file, &p.image_root).unwrap();
/// assert_eq!(train.len(), cfg.num_train);
/// ```
pub fn ensure_detection(cache_dir: &Path, config: &SyntheticConfig) -> Result<SyntheticDetection> {
    config.validate()?;
    let dir = cache_dir.join(config.key("det"));
    ensure_dir(&dir, |tmp| {
        write_names(&tmp.join("names.txt"), &config.class_names())?;
        for (split, n, split_id) in [
            ("train", config.num_train, 0u64),
            ("eval", config.num_eval, 1),
        ] {
            let img_dir = tmp.join("images").join(split);
            std::fs::create_dir_all(&img_dir).map_err(io_err(&img_dir))?;
            let records: Vec<DetectionRecord> = (0..n)
                .into_par_iter()
                .map(|i| {
                    let mut rng = item_rng(config.seed ^ (split_id << 32), 0xde7, i);
                    let (img, boxes, labels) = detection_scene(config, &mut rng);
                    let name = format!("{split}/{i:05}.jpg");
                    save_jpeg(&img, &tmp.join("images").join(&name))?;
                    Ok(DetectionRecord {
                        name,
                        boxes,
                        labels,
                    })
                })
                .collect::<Result<_>>()?;
            write_list(&tmp.join(format!("{split}.txt")), &records)?;
        }
        Ok(())
    })?;
    Ok(SyntheticDetection {
        train_list: dir.join("train.txt"),
        eval_list: dir.join("eval.txt"),
        names_file: dir.join("names.txt"),
        image_root: dir.join("images"),
        dir,
    })
}

/// Makes sure the synthetic classification dataset (one shape per image, ImageFolder layout
/// `root/<shape>/<n>.jpg`) exists under `cache_dir` and returns its train and eval roots.
pub fn ensure_classification(
    cache_dir: &Path,
    config: &SyntheticConfig,
) -> Result<SyntheticClassification> {
    config.validate()?;
    let dir = cache_dir.join(config.key("cls"));
    ensure_dir(&dir, |tmp| {
        for (split, n, split_id) in [
            ("train", config.num_train, 0u64),
            ("eval", config.num_eval, 1),
        ] {
            for (ci, shape) in config.classes.iter().enumerate() {
                let d = tmp.join(split).join(shape.name());
                std::fs::create_dir_all(&d).map_err(io_err(&d))?;
                (0..n).into_par_iter().try_for_each(|i| {
                    let mut rng = item_rng(
                        config.seed ^ (split_id << 32) ^ ((ci as u64) << 40),
                        0xc15,
                        i,
                    );
                    let img = classification_image(config.class_image_size, *shape, &mut rng);
                    save_jpeg(&img, &d.join(format!("{i:05}.jpg")))
                })?;
            }
        }
        Ok(())
    })?;
    Ok(SyntheticClassification {
        train_root: dir.join("train"),
        eval_root: dir.join("eval"),
        dir,
    })
}

fn random_color(rng: &mut StdRng) -> [f32; 3] {
    [
        rng.random_range(0.0..255.0),
        rng.random_range(0.0..255.0),
        rng.random_range(0.0..255.0),
    ]
}

fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// A background: interleaved f32 RGB, and its mean colour.
fn background(w: usize, h: usize, rng: &mut StdRng) -> (Vec<f32>, [f32; 3]) {
    let mut buf = vec![0f32; w * h * 3];
    let c0 = random_color(rng);
    let c1 = random_color(rng);
    let kind = rng.random_range(0..4);
    let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (ca, sa) = (angle.cos(), angle.sin());
    let period: f32 = rng.random_range(8.0..24.0);
    let noise: f32 = rng.random_range(8.0..30.0);
    for y in 0..h {
        for x in 0..w {
            let t = match kind {
                0 => 0.0,
                1 => {
                    let p = (x as f32 * ca + y as f32 * sa) / (w.max(h) as f32 * 1.5) + 0.5;
                    p.clamp(0.0, 1.0)
                }
                2 => 0.0,
                _ => {
                    let p = (x as f32 * ca + y as f32 * sa) / period;
                    if p.rem_euclid(1.0) < 0.5 { 0.0 } else { 0.35 }
                }
            };
            let n = if kind == 2 {
                rng.random_range(-noise..noise)
            } else {
                0.0
            };
            for c in 0..3 {
                buf[(y * w + x) * 3 + c] = (c0[c] * (1.0 - t) + c1[c] * t + n).clamp(0.0, 255.0);
            }
        }
    }
    let mut mean = [0f32; 3];
    for p in buf.chunks_exact(3) {
        for c in 0..3 {
            mean[c] += p[c];
        }
    }
    let n = (w * h) as f32;
    (buf, mean.map(|m| m / n))
}

/// A textured background: value noise at three scales (cells of 48, 16 and 6 px) blending two
/// colours, plus per-pixel grain; interleaved f32 RGB.
fn textured_background(w: usize, h: usize, rng: &mut StdRng) -> Vec<f32> {
    let c0 = random_color(rng);
    let c1 = random_color(rng);
    let grain: f32 = rng.random_range(4.0..16.0);
    let mut t = vec![0f32; w * h];
    for (cell, weight) in [(48usize, 0.55f32), (16, 0.3), (6, 0.15)] {
        let (gw, gh) = (w / cell + 2, h / cell + 2);
        let grid: Vec<f32> = (0..gw * gh).map(|_| rng.random_range(0.0..1.0)).collect();
        for y in 0..h {
            let fy = y as f32 / cell as f32;
            let (y0, ty) = (fy.floor() as usize, fy.fract());
            for x in 0..w {
                let fx = x as f32 / cell as f32;
                let (x0, tx) = (fx.floor() as usize, fx.fract());
                let g = |yy: usize, xx: usize| grid[yy * gw + xx];
                let top = g(y0, x0) * (1.0 - tx) + g(y0, x0 + 1) * tx;
                let bottom = g(y0 + 1, x0) * (1.0 - tx) + g(y0 + 1, x0 + 1) * tx;
                t[y * w + x] += weight * (top * (1.0 - ty) + bottom * ty);
            }
        }
    }
    let mut buf = vec![0f32; w * h * 3];
    for (i, &v) in t.iter().enumerate() {
        let n = rng.random_range(-grain..grain);
        for c in 0..3 {
            buf[i * 3 + c] = (c0[c] * (1.0 - v) + c1[c] * v + n).clamp(0.0, 255.0);
        }
    }
    buf
}

/// Mean colour of `buf` (interleaved, `w` wide) over the box `[x0, x1) x [y0, y1)`.
fn mean_colour(buf: &[f32], w: usize, (x0, y0, x1, y1): (usize, usize, usize, usize)) -> [f32; 3] {
    let mut m = [0f32; 3];
    let mut n = 0usize;
    for y in y0..y1 {
        for x in x0..x1 {
            for c in 0..3 {
                m[c] += buf[(y * w + x) * 3 + c];
            }
            n += 1;
        }
    }
    m.map(|v| v / n.max(1) as f32)
}

/// Unlabelled clutter: thin lines and small dots, up to `max` of them.
fn clutter(buf: &mut [f32], w: usize, h: usize, rng: &mut StdRng) {
    clutter_n(buf, w, h, 6, rng)
}

fn clutter_n(buf: &mut [f32], w: usize, h: usize, max: usize, rng: &mut StdRng) {
    let n = rng.random_range(0..=max);
    for _ in 0..n {
        let col = random_color(rng);
        if rng.random_bool(0.5) {
            // A 1 px line segment.
            let (x0, y0) = (
                rng.random_range(0.0..w as f32),
                rng.random_range(0.0..h as f32),
            );
            let (x1, y1) = (
                rng.random_range(0.0..w as f32),
                rng.random_range(0.0..h as f32),
            );
            let steps = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
            for s in 0..=steps {
                let t = s as f32 / steps as f32;
                let (x, y) = ((x0 + (x1 - x0) * t) as usize, (y0 + (y1 - y0) * t) as usize);
                if x < w && y < h {
                    buf[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&col);
                }
            }
        } else {
            let r: f32 = rng.random_range(1.0..3.5);
            let (cx, cy) = (
                rng.random_range(0.0..w as f32),
                rng.random_range(0.0..h as f32),
            );
            for y in (cy - r).max(0.0) as usize..((cy + r).ceil() as usize).min(h) {
                for x in (cx - r).max(0.0) as usize..((cx + r).ceil() as usize).min(w) {
                    if (x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2) <= r * r {
                        buf[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&col);
                    }
                }
            }
        }
    }
}

/// A shape placed in a `bw x bh` frame at `(bx, by)`: the pixel-centre inside test.
struct Placed {
    shape: Shape,
    bx: f32,
    by: f32,
    bw: f32,
    bh: f32,
    /// Triangle: apex x as a fraction of the width; cross: bar thickness fraction.
    param: f32,
    /// Triangle: apex at the bottom.
    flip: bool,
}

impl Placed {
    fn random(
        shape: Shape,
        size_lo: f32,
        size_hi: f32,
        w: usize,
        h: usize,
        rng: &mut StdRng,
    ) -> Placed {
        // Log-uniform size so small objects are as common as large ones.
        let s = (rng.random_range(size_lo.ln()..=size_hi.ln())).exp();
        let aspect: f32 = match shape {
            Shape::Cross => rng.random_range(0.8..1.25),
            _ => rng.random_range(0.6..1.6),
        };
        let bw = (s * aspect.sqrt()).clamp(size_lo, w as f32 - 2.0);
        let bh = (s / aspect.sqrt()).clamp(size_lo, h as f32 - 2.0);
        let bx = rng.random_range(0.0..(w as f32 - bw).max(1.0));
        let by = rng.random_range(0.0..(h as f32 - bh).max(1.0));
        let param = match shape {
            Shape::Triangle => rng.random_range(0.2..0.8),
            Shape::Cross => rng.random_range(0.25..0.4),
            _ => 0.0,
        };
        Placed {
            shape,
            bx,
            by,
            bw,
            bh,
            param,
            flip: rng.random_bool(0.5),
        }
    }

    fn contains(&self, px: f32, py: f32) -> bool {
        // Local coordinates in [0, 1].
        let u = (px - self.bx) / self.bw;
        let v = (py - self.by) / self.bh;
        if !(0.0..=1.0).contains(&u) || !(0.0..=1.0).contains(&v) {
            return false;
        }
        match self.shape {
            Shape::Rectangle => true,
            Shape::Ellipse => (u - 0.5).powi(2) + (v - 0.5).powi(2) <= 0.25,
            Shape::Triangle => {
                let v = if self.flip { 1.0 - v } else { v };
                // Apex at (param, 0), base from (0, 1) to (1, 1): inside if between the sides.
                let left = self.param * (1.0 - v);
                let right = self.param + (1.0 - self.param) * v;
                u >= left && u <= right
            }
            Shape::Cross => {
                let t = self.param / 2.0;
                (u - 0.5).abs() <= t || (v - 0.5).abs() <= t
            }
        }
    }

    /// Pixels (row-major indices) covered by the shape.
    fn pixels(&self, w: usize, h: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let x0 = self.bx.floor().max(0.0) as usize;
        let y0 = self.by.floor().max(0.0) as usize;
        let x1 = ((self.bx + self.bw).ceil() as usize).min(w);
        let y1 = ((self.by + self.bh).ceil() as usize).min(h);
        for y in y0..y1 {
            for x in x0..x1 {
                if self.contains(x as f32 + 0.5, y as f32 + 0.5) {
                    out.push(y * w + x);
                }
            }
        }
        out
    }
}

fn shape_color(bg_mean: [f32; 3], rng: &mut StdRng) -> [f32; 3] {
    let mut col = random_color(rng);
    for _ in 0..10 {
        if dist(col, bg_mean) > 90.0 {
            break;
        }
        col = random_color(rng);
    }
    col
}

fn to_image(buf: &[f32], w: usize, h: usize) -> RgbImage {
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = (y as usize * w + x as usize) * 3;
        Rgb([buf[i] as u8, buf[i + 1] as u8, buf[i + 2] as u8])
    })
}

/// One detection scene: image, boxes (exact bounds of each shape's visible pixels), labels.
pub fn detection_scene(
    config: &SyntheticConfig,
    rng: &mut StdRng,
) -> (RgbImage, Vec<[f32; 4]>, Vec<u32>) {
    let (w, h) = (config.image_size as usize, config.image_size as usize);
    let textured = config.background == Background::Textured;
    let (mut buf, mean) = if textured {
        (textured_background(w, h, rng), [0.0; 3])
    } else {
        background(w, h, rng)
    };
    if textured {
        // As much clutter per pixel as the default 160 px scenes have.
        clutter_n(&mut buf, w, h, (6 * w * h).div_ceil(160 * 160), rng);
    } else {
        clutter(&mut buf, w, h, rng);
    }
    // owner[p] = index of the object whose pixel p is (usize::MAX: background).
    let mut owner = vec![usize::MAX; w * h];
    // Visible and full pixel counts per object.
    let mut areas: Vec<usize> = Vec::new();
    let mut full: Vec<usize> = Vec::new();
    let mut labels = Vec::new();
    let n = rng.random_range(config.min_objects..=config.max_objects);
    let [lo, hi] = config.object_size;
    // Shapes need 30 pixels to be told apart; small-object scenes allow less in proportion.
    let min_px = (0.3 * lo * lo).min(30.0) as usize;
    for _ in 0..n {
        let ci = rng.random_range(0..config.classes.len());
        for _try in 0..20 {
            let p = Placed::random(config.classes[ci], lo, hi, w, h, rng);
            let px = p.pixels(w, h);
            if px.len() < min_px {
                continue;
            }
            // Reject if it would hide more than half of an earlier object.
            let mut hidden = vec![0usize; areas.len()];
            for &q in &px {
                if owner[q] != usize::MAX {
                    hidden[owner[q]] += 1;
                }
            }
            // An earlier object must keep at least half of its full area visible.
            if (0..areas.len()).any(|k| hidden[k] > 0 && 2 * (areas[k] - hidden[k]) < full[k]) {
                continue;
            }
            // On a texture the shape must stand out from what lies under it.
            let under = if textured {
                let x0 = p.bx.floor().max(0.0) as usize;
                let y0 = p.by.floor().max(0.0) as usize;
                let x1 = ((p.bx + p.bw).ceil() as usize).min(w);
                let y1 = ((p.by + p.bh).ceil() as usize).min(h);
                mean_colour(&buf, w, (x0, y0, x1, y1))
            } else {
                mean
            };
            let col = shape_color(under, rng);
            let k = areas.len();
            for &q in &px {
                owner[q] = k;
                buf[q * 3..q * 3 + 3].copy_from_slice(&col);
            }
            for (j, a) in areas.iter_mut().enumerate() {
                *a -= hidden[j];
            }
            areas.push(px.len());
            full.push(px.len());
            labels.push(ci as u32 + 1);
            break;
        }
    }
    // Exact bounds of the visible pixels of each object.
    let mut bounds = vec![[usize::MAX, usize::MAX, 0usize, 0usize]; areas.len()];
    for (q, &o) in owner.iter().enumerate() {
        if o != usize::MAX {
            let (y, x) = (q / w, q % w);
            let b = &mut bounds[o];
            b[0] = b[0].min(y);
            b[1] = b[1].min(x);
            b[2] = b[2].max(y);
            b[3] = b[3].max(x);
        }
    }
    let boxes = bounds
        .iter()
        .map(|b| [b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32])
        .collect();
    (to_image(&buf, w, h), boxes, labels)
}

/// One classification image: a single `shape` on a background with clutter.
pub fn classification_image(size: u32, shape: Shape, rng: &mut StdRng) -> RgbImage {
    let s = size as usize;
    let (mut buf, mean) = background(s, s, rng);
    clutter(&mut buf, s, s, rng);
    let p = Placed::random(shape, size as f32 * 0.35, size as f32 * 0.85, s, s, rng);
    let col = shape_color(mean, rng);
    for q in p.pixels(s, s) {
        buf[q * 3..q * 3 + 3].copy_from_slice(&col);
    }
    to_image(&buf, s, s)
}
