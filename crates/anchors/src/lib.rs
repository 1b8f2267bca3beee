//! Anchor boxes for RetinaNet, exactly as the tutorial lays them out.
//!
//! For level `s` in `0..scales` the stride is `t = first_stride * 2^s`, the grid is
//! `((H - 1) / t + 1) x ((W - 1) / t + 1)` (integer division, which equals the detector's
//! feature-map size `ceil(H / t)`), anchor centres sit at `(h * t, w * t)` (top-left aligned)
//! and anchor `i` has size `2^s * a_hw[i]`. Order: level, row, column, anchor.
//!
//! A run may lay out its own anchors: [`AnchorConfig::from_sizes`] builds them the way
//! torchvision's `AnchorGenerator` and Detectron2's `ANCHOR_GENERATOR` describe them (a size per
//! level, aspect ratios, scales per octave), and `level_scales` lets the levels grow by other
//! factors than 2.
//!
//! ```
//! use retinanet_anchors::{AnchorConfig, gen_anchors};
//!
//! let cfg = AnchorConfig::default(); // a_hw = [[28, 28], [19.8, 39.6], [39.6, 19.8]], 4 scales, stride 8
//! let anchors = gen_anchors(&cfg, (257, 257));
//! assert_eq!(anchors.len(), 3 * (33 * 33 + 17 * 17 + 9 * 9 + 5 * 5));
//! assert_eq!(anchors.yxhw[0], [0.0, 0.0, 28.0, 28.0]);
//! assert_eq!(anchors.yxyx[0], [-14.0, -14.0, 14.0, 14.0]);
//! ```
//!
//! Plain Rust, no dependency: the encoder, the decoder and the detector's shape checks share it.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// The tutorial's anchor shapes `(h, w)` at the first level.
pub const TUTORIAL_A_HW: [[f64; 2]; 3] = [[28.0, 28.0], [19.8, 39.6], [39.6, 19.8]];

/// How anchors are laid out. `Default` is the tutorial's.
#[derive(Clone, Debug, PartialEq)]
pub struct AnchorConfig {
    /// Anchor `(height, width)` at the first level; level `s` scales them by `2^s` (or by
    /// `level_scales[s]`).
    pub a_hw: Vec<[f64; 2]>,
    /// Number of pyramid levels (P3..P6 for the tutorial: 4).
    pub scales: usize,
    /// Stride of the first level in pixels (8 for P3).
    pub first_stride: usize,
    /// Size factor of each level relative to the first (`scales` values, the first 1); `None`:
    /// `2^s`, the tutorial's.
    pub level_scales: Option<Vec<f64>>,
    /// How the boxes of a cell are made and where the cells sit.
    pub style: AnchorStyle,
}

/// How anchors are made from the layout.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum AnchorStyle {
    /// The tutorial's: shapes `level_scale(s) * a_hw`, exact (f64, one rounding to f32), cells
    /// every `first_stride * 2^s` pixels.
    #[default]
    Tutorial,
    /// torchvision's `AnchorGenerator`: for each level its own sizes (`sizes[s]`, already
    /// whole numbers as torchvision's `int(size * 2^(k / 3))`) times every aspect ratio `h / w`
    /// (ratio-major order), the half-sides computed in f32 and rounded to whole pixels; the
    /// cells of a level every `image side // grid side` pixels on each axis (torchvision's
    /// stride, which for P6 and P7 is not always 64 and 128). `a_hw` holds the first level's
    /// shapes in the same order.
    Torchvision {
        /// The sizes of each level.
        sizes: Vec<Vec<f64>>,
        /// Aspect ratios `h / w`.
        aspect_ratios: Vec<f64>,
    },
}

impl Default for AnchorConfig {
    fn default() -> Self {
        Self {
            a_hw: TUTORIAL_A_HW.to_vec(),
            scales: 4,
            first_stride: 8,
            level_scales: None,
            style: AnchorStyle::Tutorial,
        }
    }
}

/// torchvision's RetinaNet anchor sizes: for each of 32, 64, 128, 256, 512 the sizes
/// `int(x * 2^(k / 3))`, `k = 0, 1, 2` (truncated, as torchvision's `_default_anchorgen`).
pub fn torchvision_retinanet_sizes() -> Vec<Vec<f64>> {
    [32.0f64, 64.0, 128.0, 256.0, 512.0]
        .iter()
        .map(|&x| {
            (0..3)
                .map(|k| (x * (k as f64 / 3.0).exp2()).trunc())
                .collect()
        })
        .collect()
}

/// The shapes `(h, w)` of one cell: for each base shape, each of `scales_per_octave` octave
/// steps `2^(k / n)` (torchvision's order: shape-major).
pub fn octave_shapes(base: &[[f64; 2]], scales_per_octave: usize) -> Vec<[f64; 2]> {
    let n = scales_per_octave.max(1);
    let mut out = Vec::with_capacity(base.len() * n);
    for hw in base {
        for k in 0..n {
            // 2^0 is exactly 1: the tutorial's shapes pass through unchanged.
            let f = if k == 0 {
                1.0
            } else {
                (k as f64 / n as f64).exp2()
            };
            out.push([hw[0] * f, hw[1] * f]);
        }
    }
    out
}

/// The shape `(h, w)` of area `size^2` and aspect ratio `h / w = ratio` (torchvision's
/// convention).
pub fn shape_of(size: f64, ratio: f64) -> [f64; 2] {
    let r = ratio.sqrt();
    [size * r, size / r]
}

/// A configuration that cannot produce anchors.
#[derive(Debug, Clone, PartialEq)]
pub struct AnchorConfigError(String);

impl fmt::Display for AnchorConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid anchor config: {}", self.0)
    }
}

impl std::error::Error for AnchorConfigError {}

impl AnchorConfig {
    /// Anchors described as torchvision's `AnchorGenerator` and Detectron2's
    /// `ANCHOR_GENERATOR` do: level `s` has anchors of base size `sizes[s]` (the side of a
    /// square of the same area) for every aspect ratio `h / w` in `aspect_ratios` and every
    /// octave step `2^(k / scales_per_octave)`; one level per size.
    pub fn from_sizes(
        sizes: &[f64],
        aspect_ratios: &[f64],
        scales_per_octave: usize,
        first_stride: usize,
    ) -> Result<Self, AnchorConfigError> {
        let Some(&first) = sizes.first() else {
            return Err(AnchorConfigError("sizes is empty".into()));
        };
        for (i, &s) in sizes.iter().enumerate() {
            if !(s.is_finite() && s > 0.0) {
                return Err(AnchorConfigError(format!(
                    "sizes[{i}] = {s} must be finite and positive"
                )));
            }
        }
        for (i, &r) in aspect_ratios.iter().enumerate() {
            if !(r.is_finite() && r > 0.0) {
                return Err(AnchorConfigError(format!(
                    "aspect_ratios[{i}] = {r} must be finite and positive"
                )));
            }
        }
        if scales_per_octave == 0 {
            return Err(AnchorConfigError(
                "scales_per_octave must be at least 1".into(),
            ));
        }
        let base: Vec<[f64; 2]> = aspect_ratios.iter().map(|&r| shape_of(first, r)).collect();
        let scales: Vec<f64> = sizes.iter().map(|&s| s / first).collect();
        // Sizes that double level by level are the tutorial's layout: say so exactly.
        let doubling = scales
            .iter()
            .enumerate()
            .all(|(i, &f)| f == (1u64 << i) as f64);
        let cfg = Self {
            a_hw: octave_shapes(&base, scales_per_octave),
            scales: sizes.len(),
            first_stride,
            level_scales: (!doubling).then_some(scales),
            style: AnchorStyle::Tutorial,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// torchvision's `AnchorGenerator(sizes, aspect_ratios)` on levels from `first_stride`
    /// (one level per entry of `sizes`; every level the same number of sizes).
    pub fn torchvision(
        sizes: Vec<Vec<f64>>,
        aspect_ratios: Vec<f64>,
        first_stride: usize,
    ) -> Result<Self, AnchorConfigError> {
        let Some(first) = sizes.first() else {
            return Err(AnchorConfigError("sizes is empty".into()));
        };
        if let Some(i) = sizes
            .iter()
            .position(|l| l.len() != first.len() || l.is_empty())
        {
            return Err(AnchorConfigError(format!(
                "sizes[{i}] has {} sizes, sizes[0] {}: every level needs as many (and at least one)",
                sizes[i].len(),
                first.len()
            )));
        }
        for (i, l) in sizes.iter().enumerate() {
            if let Some(s) = l.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                return Err(AnchorConfigError(format!(
                    "sizes[{i}] holds {s}: sizes must be finite and positive"
                )));
            }
        }
        if aspect_ratios.is_empty() {
            return Err(AnchorConfigError("aspect_ratios is empty".into()));
        }
        if let Some(r) = aspect_ratios.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
            return Err(AnchorConfigError(format!(
                "aspect ratio {r} must be finite and positive"
            )));
        }
        let mut cfg = Self {
            a_hw: Vec::new(),
            scales: sizes.len(),
            first_stride,
            level_scales: None,
            style: AnchorStyle::Torchvision {
                sizes,
                aspect_ratios,
            },
        };
        cfg.a_hw = cfg.level_shapes(0);
        cfg.validate()?;
        Ok(cfg)
    }

    /// torchvision's `retinanet_resnet50_fpn` anchors: 9 per cell on P3..P7.
    pub fn torchvision_retinanet() -> Self {
        Self::torchvision(torchvision_retinanet_sizes(), vec![0.5, 1.0, 2.0], 8)
            .expect("a valid layout")
    }

    /// The boxes `[y0, x0, y1, x1]` of one cell of level `s` relative to its point.
    pub fn cell_boxes(&self, level: usize) -> Vec<[f64; 4]> {
        match &self.style {
            AnchorStyle::Tutorial => self
                .level_shapes(level)
                .iter()
                .map(|&[h, w]| [-h / 2.0, -w / 2.0, h / 2.0, w / 2.0])
                .collect(),
            AnchorStyle::Torchvision {
                sizes,
                aspect_ratios,
            } => {
                // torchvision's arithmetic, in f32: h_ratio = sqrt(r), w_ratio = 1 / h_ratio,
                // half-sides (ratio * size) / 2 rounded half to even.
                let mut out = Vec::with_capacity(aspect_ratios.len() * sizes[level].len());
                for &r in aspect_ratios {
                    let hr = (r as f32).sqrt();
                    let wr = 1.0 / hr;
                    for &s in &sizes[level] {
                        let (w, h) = (wr * s as f32, hr * s as f32);
                        let (hw, hh) = ((w / 2.0).round_ties_even(), (h / 2.0).round_ties_even());
                        out.push([-hh as f64, -hw as f64, hh as f64, hw as f64]);
                    }
                }
                out
            }
        }
    }

    /// The size factor of level `s` relative to the first: `2^s` unless `level_scales` says
    /// otherwise.
    #[inline]
    pub fn level_scale(&self, level: usize) -> f64 {
        match &self.level_scales {
            Some(v) => v[level],
            None => (1u64 << level) as f64,
        }
    }

    /// The anchor shapes `(h, w)` of level `s`.
    pub fn level_shapes(&self, level: usize) -> Vec<[f64; 2]> {
        if let AnchorStyle::Torchvision { .. } = self.style {
            return self
                .cell_boxes(level)
                .iter()
                .map(|b| [b[2] - b[0], b[3] - b[1]])
                .collect();
        }
        let f = self.level_scale(level);
        self.a_hw.iter().map(|hw| [f * hw[0], f * hw[1]]).collect()
    }

    /// Checks that the config describes real anchors: at least one shape, finite positive
    /// sizes, at least one level and a non-zero stride.
    pub fn validate(&self) -> Result<(), AnchorConfigError> {
        if let AnchorStyle::Torchvision { sizes, .. } = &self.style
            && sizes.len() != self.scales
        {
            return Err(AnchorConfigError(format!(
                "{} levels of sizes for {} levels",
                sizes.len(),
                self.scales
            )));
        }
        if self.a_hw.is_empty() {
            return Err(AnchorConfigError("a_hw is empty".into()));
        }
        for (i, hw) in self.a_hw.iter().enumerate() {
            if !(hw[0].is_finite() && hw[1].is_finite() && hw[0] > 0.0 && hw[1] > 0.0) {
                return Err(AnchorConfigError(format!(
                    "a_hw[{i}] = {hw:?} must be finite and positive"
                )));
            }
        }
        if self.scales == 0 {
            return Err(AnchorConfigError("scales must be at least 1".into()));
        }
        if self.first_stride == 0 {
            return Err(AnchorConfigError("first_stride must be at least 1".into()));
        }
        if self.scales > 16 {
            return Err(AnchorConfigError(format!(
                "scales = {} is beyond any image size",
                self.scales
            )));
        }
        let top = self.first_stride.checked_mul(1usize << (self.scales - 1));
        if top.is_none_or(|t| t > 1 << 20) {
            return Err(AnchorConfigError(format!(
                "first_stride = {} over {} levels is beyond any image size",
                self.first_stride, self.scales
            )));
        }
        if let Some(v) = &self.level_scales {
            if v.len() != self.scales {
                return Err(AnchorConfigError(format!(
                    "level_scales has {} values for {} levels",
                    v.len(),
                    self.scales
                )));
            }
            for (i, &f) in v.iter().enumerate() {
                if !(f.is_finite() && f > 0.0) {
                    return Err(AnchorConfigError(format!(
                        "level_scales[{i}] = {f} must be finite and positive"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Anchors per grid cell.
    pub fn anchors_per_cell(&self) -> usize {
        self.a_hw.len()
    }

    /// Stride of level `s`.
    pub fn stride(&self, level: usize) -> usize {
        self.first_stride << level
    }

    /// Grid size `(fh, fw)` of every level for an image of `(H, W)`.
    pub fn grid_sizes(&self, img_size: (usize, usize)) -> Vec<(usize, usize)> {
        (0..self.scales)
            .map(|s| {
                let t = self.stride(s);
                (grid_len(img_size.0, t), grid_len(img_size.1, t))
            })
            .collect()
    }

    /// Total number of anchors for an image of `(H, W)`.
    pub fn num_anchors(&self, img_size: (usize, usize)) -> usize {
        self.grid_sizes(img_size)
            .iter()
            .map(|(h, w)| h * w * self.a_hw.len())
            .sum()
    }
}

fn grid_len(side: usize, stride: usize) -> usize {
    // (side - 1) / t + 1; an empty side has an empty grid.
    if side == 0 {
        0
    } else {
        (side - 1) / stride + 1
    }
}

/// The anchors of one image size, in the detector's output order.
#[derive(Clone, Debug, PartialEq)]
pub struct Anchors {
    /// `[ymin, xmin, ymax, xmax]` per anchor.
    pub yxyx: Vec<[f32; 4]>,
    /// `[y, x, h, w]` (centre and size) per anchor.
    pub yxhw: Vec<[f32; 4]>,
    /// Image size `(H, W)` these anchors were made for.
    pub img_size: (usize, usize),
    /// Anchor index range of each level: level `s` is `level_ranges[s].0..level_ranges[s].1`.
    pub level_ranges: Vec<(usize, usize)>,
}

impl Anchors {
    /// Number of anchors.
    pub fn len(&self) -> usize {
        self.yxyx.len()
    }

    /// Whether there is no anchor (an empty image).
    pub fn is_empty(&self) -> bool {
        self.yxyx.is_empty()
    }
}

/// Generates the anchors of an image of size `(H, W)`.
///
/// Coordinates are computed in f64 and rounded once to f32, as the reference does.
///
/// # Panics
/// If `cfg` fails [`AnchorConfig::validate`]; call it first for user-supplied configs.
pub fn gen_anchors(cfg: &AnchorConfig, img_size: (usize, usize)) -> Anchors {
    if let Err(e) = cfg.validate() {
        panic!("{e}");
    }
    let n = cfg.num_anchors(img_size);
    let mut yxyx = Vec::with_capacity(n);
    let mut yxhw = Vec::with_capacity(n);
    let mut level_ranges = Vec::with_capacity(cfg.scales);
    for (s, (fh, fw)) in cfg.grid_sizes(img_size).into_iter().enumerate() {
        let start = yxyx.len();
        if let AnchorStyle::Torchvision { .. } = cfg.style {
            // torchvision: integer strides `image // grid` per axis, boxes in f32 (whole
            // numbers, exact), centre and size as its box coder takes them.
            let (ty, tx) = (img_size.0 / fh.max(1), img_size.1 / fw.max(1));
            let cell: Vec<[f32; 4]> = cfg
                .cell_boxes(s)
                .iter()
                .map(|b| b.map(|v| v as f32))
                .collect();
            for h in 0..fh {
                let ay = (h * ty) as f32;
                for w in 0..fw {
                    let ax = (w * tx) as f32;
                    for b in &cell {
                        let bb = [ay + b[0], ax + b[1], ay + b[2], ax + b[3]];
                        let (bh, bw) = (bb[2] - bb[0], bb[3] - bb[1]);
                        yxyx.push(bb);
                        yxhw.push([bb[0] + 0.5 * bh, bb[1] + 0.5 * bw, bh, bw]);
                    }
                }
            }
            level_ranges.push((start, yxyx.len()));
            continue;
        }
        let t = cfg.stride(s) as f64;
        let scale = cfg.level_scale(s);
        for h in 0..fh {
            let ay = h as f64 * t;
            for w in 0..fw {
                let ax = w as f64 * t;
                for hw in &cfg.a_hw {
                    let (ah, aw) = (scale * hw[0], scale * hw[1]);
                    yxyx.push([
                        (ay - ah / 2.0) as f32,
                        (ax - aw / 2.0) as f32,
                        (ay + ah / 2.0) as f32,
                        (ax + aw / 2.0) as f32,
                    ]);
                    yxhw.push([ay as f32, ax as f32, ah as f32, aw as f32]);
                }
            }
        }
        level_ranges.push((start, yxyx.len()));
    }
    Anchors {
        yxyx,
        yxhw,
        img_size,
        level_ranges,
    }
}

/// Anchors by image size, computed once per size and shared (`Arc`) afterwards.
///
/// The decoder sees images of any size at inference; this keeps it from rebuilding the same
/// anchors for every image. It holds at most `capacity` sizes (whole-image evaluation of a
/// photo collection meets hundreds, a few megabytes each) and forgets the least recently used
/// one beyond that. Thread-safe.
#[derive(Debug)]
pub struct AnchorCache {
    cfg: AnchorConfig,
    capacity: usize,
    map: Mutex<CacheMap>,
}

/// Anchors by size, each with the tick of its last use.
type CacheMap = HashMap<(usize, usize), (Arc<Anchors>, u64)>;

/// Sizes an [`AnchorCache::new`] cache holds.
pub const DEFAULT_CACHE_SIZES: usize = 64;

impl AnchorCache {
    /// A cache for `cfg` holding up to [`DEFAULT_CACHE_SIZES`] sizes.
    ///
    /// # Panics
    /// If `cfg` fails [`AnchorConfig::validate`].
    pub fn new(cfg: AnchorConfig) -> Self {
        Self::with_capacity(cfg, DEFAULT_CACHE_SIZES)
    }

    /// A cache for `cfg` holding up to `capacity` (at least 1) sizes.
    ///
    /// # Panics
    /// If `cfg` fails [`AnchorConfig::validate`].
    pub fn with_capacity(cfg: AnchorConfig, capacity: usize) -> Self {
        if let Err(e) = cfg.validate() {
            panic!("{e}");
        }
        Self {
            cfg,
            capacity: capacity.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The config the anchors are made from.
    pub fn config(&self) -> &AnchorConfig {
        &self.cfg
    }

    /// The anchors of `(H, W)`, generated on first use.
    pub fn get(&self, img_size: (usize, usize)) -> Arc<Anchors> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let tick = map.values().map(|v| v.1).max().unwrap_or(0) + 1;
        if let Some(e) = map.get_mut(&img_size) {
            e.1 = tick;
            return e.0.clone();
        }
        if map.len() >= self.capacity
            && let Some(old) = map.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k)
        {
            map.remove(&old);
        }
        let a = Arc::new(gen_anchors(&self.cfg, img_size));
        map.insert(img_size, (a.clone(), tick));
        a
    }

    /// Number of sizes held.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no size is held yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Clone for AnchorCache {
    fn clone(&self) -> Self {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Self {
            cfg: self.cfg.clone(),
            capacity: self.capacity,
            map: Mutex::new(map),
        }
    }
}
