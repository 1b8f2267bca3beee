//! Anchor boxes for RetinaNet, exactly as the tutorial lays them out.
//!
//! For level `s` in `0..scales` the stride is `t = first_stride * 2^s`, the grid is
//! `((H - 1) / t + 1) x ((W - 1) / t + 1)` (integer division, which equals the detector's
//! feature-map size `ceil(H / t)`), anchor centres sit at `(h * t, w * t)` (top-left aligned)
//! and anchor `i` has size `2^s * a_hw[i]`. Order: level, row, column, anchor.
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
    /// Anchor `(height, width)` at the first level; level `s` scales them by `2^s`.
    pub a_hw: Vec<[f64; 2]>,
    /// Number of pyramid levels (P3..P6 for the tutorial: 4).
    pub scales: usize,
    /// Stride of the first level in pixels (8 for P3).
    pub first_stride: usize,
}

impl Default for AnchorConfig {
    fn default() -> Self {
        Self {
            a_hw: TUTORIAL_A_HW.to_vec(),
            scales: 4,
            first_stride: 8,
        }
    }
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
    /// Checks that the config describes real anchors: at least one shape, finite positive
    /// sizes, at least one level and a non-zero stride.
    pub fn validate(&self) -> Result<(), AnchorConfigError> {
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
        let t = cfg.stride(s) as f64;
        let scale = (1u64 << s) as f64;
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
/// anchors for every image. Thread-safe.
#[derive(Debug)]
pub struct AnchorCache {
    cfg: AnchorConfig,
    map: Mutex<HashMap<(usize, usize), Arc<Anchors>>>,
}

impl AnchorCache {
    /// A cache for `cfg`.
    ///
    /// # Panics
    /// If `cfg` fails [`AnchorConfig::validate`].
    pub fn new(cfg: AnchorConfig) -> Self {
        if let Err(e) = cfg.validate() {
            panic!("{e}");
        }
        Self {
            cfg,
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
        map.entry(img_size)
            .or_insert_with(|| Arc::new(gen_anchors(&self.cfg, img_size)))
            .clone()
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
            map: Mutex::new(map),
        }
    }
}
