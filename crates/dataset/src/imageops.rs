//! Image decoding, one-pass crop + flip + resize resampling, normalisation.
//!
//! The resampler is a separable bilinear (triangle) filter whose support widens when
//! downscaling, like PIL's antialiased `BILINEAR` that torchvision uses on PIL images. Cropping,
//! horizontal flipping and resizing are folded into the per-axis weight tables, so each training
//! item is resampled exactly once, straight from the decoded image.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::error::{DatasetError, Result};

/// ImageNet channel means (RGB) used by [`normalize_chw`].
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB) used by [`normalize_chw`].
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Decodes an image file to RGB (grey, grey+alpha, RGBA and 16-bit images are converted).
///
/// The format is guessed from the content, not the extension. A file cut short is an error,
/// never a partly grey image (see [`decode_rgb`]). Errors name the file.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(crate::error::io_err(path))?;
    decode_rgb(&bytes).map_err(|message| DatasetError::Image {
        path: path.to_path_buf(),
        message,
    })
}

/// `(width, height)` of an image file from its header alone (the format guessed from the
/// content). Errors name the file.
pub fn image_dimensions(path: &Path) -> Result<(u32, u32)> {
    let bad = |message: String| DatasetError::Image {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(crate::error::io_err(path))?;
    image::ImageReader::new(std::io::BufReader::new(file))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?
        .into_dimensions()
        .map_err(|e| bad(e.to_string()))
}

/// Decodes image file contents to RGB; the error is the decoder's message.
///
/// The JPEG decoder fills whatever a truncated file lacks with grey and reports success, so a
/// JPEG is first checked to reach its end-of-image marker ([`jpeg_truncation`]). The PNG, GIF
/// and BMP decoders already fail on missing image data.
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF])
        && let Some(problem) = jpeg_truncation(bytes)
    {
        return Err(problem);
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let img = reader.decode().map_err(|e| e.to_string())?;
    Ok(match img {
        image::DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// Why a JPEG stream (starting with its SOI marker) is incomplete, if it is: walks the marker
/// segments, each skipped by its length (so the end marker of an embedded EXIF thumbnail does
/// not count), and the entropy-coded data after every start-of-scan, and reports a file that
/// ends before its end-of-image marker.
pub fn jpeg_truncation(b: &[u8]) -> Option<String> {
    let n = b.len();
    let cut = |where_: &str| {
        Some(format!(
            "truncated JPEG: the file ({n} bytes) ends {where_}, before its end-of-image marker"
        ))
    };
    let mut i = 2;
    loop {
        // Garbage between segments is the decoder's business; look for the next marker.
        match b[i.min(n)..].iter().position(|&x| x == 0xFF) {
            Some(k) => i += k,
            None => return cut("between segments"),
        }
        while i < n && b[i] == 0xFF {
            i += 1; // fill bytes
        }
        if i >= n {
            return cut("inside a marker");
        }
        let marker = b[i];
        i += 1;
        match marker {
            0xD9 => return None,
            // Markers without a length field.
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        if i + 2 > n {
            return cut("inside a segment header");
        }
        let len = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
        if len < 2 {
            return Some(format!(
                "corrupt JPEG: segment 0xFF{marker:02X} at byte {} has length {len}",
                i - 2
            ));
        }
        if i + len > n {
            return cut("inside a segment");
        }
        i += len;
        if marker == 0xDA {
            // Entropy-coded data: 0xFF is followed by 0x00 (a stuffed byte), a restart marker
            // or more fill bytes inside it; any other marker ends the scan.
            loop {
                match b[i..].iter().position(|&x| x == 0xFF) {
                    Some(k) => i += k,
                    None => return cut("inside the image data"),
                }
                if i + 1 >= n {
                    return cut("inside the image data");
                }
                match b[i + 1] {
                    0x00 | 0xD0..=0xD7 => i += 2,
                    0xFF => i += 1,
                    _ => break,
                }
            }
        }
    }
}

/// A rectangle of the source image in continuous pixel coordinates (pixel `i` spans `[i, i+1)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SrcRect {
    /// Left edge.
    pub x0: f64,
    /// Top edge.
    pub y0: f64,
    /// Right edge (exclusive).
    pub x1: f64,
    /// Bottom edge (exclusive).
    pub y1: f64,
}

/// Per-axis resampling table: for each output index, the first source index, the number of
/// (non-zero) taps and the weights (`taps` slots per output).
struct Axis {
    start: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<f32>,
    taps: usize,
}

impl Axis {
    /// `lo..hi` (source coordinates) is mapped onto `out` output samples. Output samples whose
    /// centre falls outside `0..len` get no tap (black padding, as PIL's `crop` pads).
    /// Taps are restricted to source pixels `clip.0..clip.1` (the crop window when cropping
    /// precedes resizing, the whole image when resizing precedes cropping).
    /// Without `antialias` the filter keeps its one-pixel support when downscaling: plain
    /// bilinear interpolation, as PyTorch's `interpolate(mode="bilinear",
    /// align_corners=False)`.
    fn new(
        lo: f64,
        hi: f64,
        out: usize,
        len: usize,
        clip: (usize, usize),
        flip: bool,
        antialias: bool,
    ) -> Axis {
        let scale = out as f64 / (hi - lo);
        let support = if scale < 1.0 && antialias {
            1.0 / scale
        } else {
            1.0
        };
        let taps = (2.0 * support).ceil() as usize + 2;
        let mut start = vec![0usize; out];
        let mut count = vec![0usize; out];
        let mut weights = vec![0f32; out * taps];
        let mut tmp = vec![0f64; taps];
        for o in 0..out {
            // Flipping reverses which output sample reads which part of the rectangle.
            let oo = if flip { out - 1 - o } else { o };
            let c = lo + (oo as f64 + 0.5) / scale;
            if c < 0.0 || c >= len as f64 {
                continue;
            }
            let first = ((c - support).floor().max(clip.0 as f64)) as usize;
            let last = ((c + support).ceil() as usize).min(clip.1); // exclusive
            if first >= last {
                continue;
            }
            let mut sum = 0.0;
            let n = (last - first).min(taps);
            for (k, t) in tmp.iter_mut().enumerate().take(n) {
                let i = first + k;
                let d = ((i as f64 + 0.5) - c).abs() / support;
                *t = (1.0 - d).max(0.0);
                sum += *t;
            }
            if sum <= 0.0 {
                continue;
            }
            // Keep only the span of non-zero taps so the inner loops need no test.
            let k0 = tmp[..n].iter().position(|&t| t > 0.0).unwrap_or(0);
            let k1 = tmp[..n].iter().rposition(|&t| t > 0.0).map_or(0, |k| k + 1);
            start[o] = first + k0;
            count[o] = k1 - k0;
            for k in k0..k1 {
                weights[o * taps + k - k0] = (tmp[k] / sum) as f32;
            }
        }
        Axis {
            start,
            count,
            weights,
            taps,
        }
    }

    fn row_range(&self) -> (usize, usize) {
        let mut lo = usize::MAX;
        let mut hi = 0;
        for (&s, &n) in self.start.iter().zip(&self.count) {
            if n > 0 {
                lo = lo.min(s);
                hi = hi.max(s + n);
            }
        }
        if lo == usize::MAX { (0, 0) } else { (lo, hi) }
    }
}

thread_local! {
    /// Scratch for the horizontal pass, reused across items on each worker thread.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Resamples the rectangle `rect` of `src` to `out_w x out_h` (optionally flipped horizontally)
/// into planar `out` (`[3, out_h, out_w]`), writing `value * scale[c] + offset[c]` for channel
/// `c` (values in `0..=255`): with [`MEAN`]/[`STD`] factors this is resampling and
/// normalisation in one pass.
///
/// With `crop_first`, the filter reads only pixels inside `rect` (crop, then resize: the
/// tutorial's training order); otherwise it may read the whole image (resize, then crop: the
/// evaluation order). Output pixels whose centre falls outside the image are black (`offset`).
#[allow(clippy::too_many_arguments)]
pub fn resample_planar_into(
    src: &RgbImage,
    rect: SrcRect,
    out_w: usize,
    out_h: usize,
    flip: bool,
    crop_first: bool,
    scale: [f32; 3],
    offset: [f32; 3],
    out: &mut [f32],
) {
    resample_planar_into_with(
        src, rect, out_w, out_h, flip, crop_first, scale, offset, out, true,
    )
}

/// [`resample_planar_into`], antialiased (PIL's filter) or not (PyTorch's bilinear
/// interpolation, which torchvision's detection models resize with).
#[allow(clippy::too_many_arguments)]
pub fn resample_planar_into_with(
    src: &RgbImage,
    rect: SrcRect,
    out_w: usize,
    out_h: usize,
    flip: bool,
    crop_first: bool,
    scale: [f32; 3],
    offset: [f32; 3],
    out: &mut [f32],
    antialias: bool,
) {
    assert_eq!(
        out.len(),
        3 * out_w * out_h,
        "resample_planar_into: output size"
    );
    let (w, h) = (src.width() as usize, src.height() as usize);
    let clip = |lo: f64, hi: f64, len: usize| {
        if crop_first {
            (
                lo.floor().max(0.0) as usize,
                (hi.ceil().max(0.0) as usize).min(len),
            )
        } else {
            (0, len)
        }
    };
    let ax = Axis::new(
        rect.x0,
        rect.x1,
        out_w,
        w,
        clip(rect.x0, rect.x1, w),
        flip,
        antialias,
    );
    let ay = Axis::new(
        rect.y0,
        rect.y1,
        out_h,
        h,
        clip(rect.y0, rect.y1, h),
        false,
        antialias,
    );
    let (r0, r1) = ay.row_range();
    let rows = r1 - r0;
    let raw = src.as_raw();
    SCRATCH.with(|cell| {
        let mut tmp = cell.borrow_mut();
        // Planar scratch: channel c, source row r, output column o at [(c * rows + r) * out_w + o].
        tmp.clear();
        tmp.resize(3 * rows * out_w, 0.0);
        let (t0, rest) = tmp.split_at_mut(rows * out_w);
        let (t1, t2) = rest.split_at_mut(rows * out_w);
        for r in r0..r1 {
            let srow = &raw[r * w * 3..(r + 1) * w * 3];
            let base = (r - r0) * out_w;
            let (d0, d1, d2) = (
                &mut t0[base..base + out_w],
                &mut t1[base..base + out_w],
                &mut t2[base..base + out_w],
            );
            for o in 0..out_w {
                let n = ax.count[o];
                let wts = &ax.weights[o * ax.taps..o * ax.taps + n];
                let px = &srow[ax.start[o] * 3..(ax.start[o] + n) * 3];
                let (mut a, mut b, mut c) = (0f32, 0f32, 0f32);
                for (&wk, p) in wts.iter().zip(px.chunks_exact(3)) {
                    a += wk * p[0] as f32;
                    b += wk * p[1] as f32;
                    c += wk * p[2] as f32;
                }
                d0[o] = a;
                d1[o] = b;
                d2[o] = c;
            }
        }
        let planes = [&*t0, &*t1, &*t2];
        let plane = out_w * out_h;
        for (c, tplane) in planes.iter().enumerate() {
            let oplane = &mut out[c * plane..(c + 1) * plane];
            for o in 0..out_h {
                let dst = &mut oplane[o * out_w..(o + 1) * out_w];
                let n = ay.count[o];
                let row = |k: usize| {
                    let sr = ay.start[o] + k - r0;
                    (
                        ay.weights[o * ay.taps + k] * scale[c],
                        &tplane[sr * out_w..(sr + 1) * out_w],
                    )
                };
                // The common upscaling case (two taps) in a single pass over the row.
                match n {
                    0 => dst.fill(offset[c]),
                    2 => {
                        let ((w0, a), (w1, b)) = (row(0), row(1));
                        for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
                            *d = offset[c] + w0 * x + w1 * y;
                        }
                    }
                    _ => {
                        let (w0, a) = row(0);
                        for (d, &x) in dst.iter_mut().zip(a) {
                            *d = offset[c] + w0 * x;
                        }
                        for k in 1..n {
                            let (wk, srow) = row(k);
                            for (d, &v) in dst.iter_mut().zip(srow) {
                                *d += wk * v;
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Resamples the rectangle `rect` of `src` to `out_w x out_h`, optionally flipped horizontally,
/// and returns interleaved RGB `f32` values in `0..=255` (HWC). See [`resample_planar_into`].
pub fn resample(
    src: &RgbImage,
    rect: SrcRect,
    out_w: usize,
    out_h: usize,
    flip: bool,
    crop_first: bool,
) -> Vec<f32> {
    let n = out_w * out_h;
    let mut planar = vec![0f32; 3 * n];
    resample_planar_into(
        src,
        rect,
        out_w,
        out_h,
        flip,
        crop_first,
        [1.0; 3],
        [0.0; 3],
        &mut planar,
    );
    let mut out = vec![0f32; 3 * n];
    for (i, px) in out.chunks_exact_mut(3).enumerate() {
        px[0] = planar[i];
        px[1] = planar[n + i];
        px[2] = planar[2 * n + i];
    }
    out
}

/// Per-channel `(scale, offset)` so that `v * scale + offset = (v / 255 - mean) / std`.
pub fn normalisation_factors() -> ([f32; 3], [f32; 3]) {
    (
        std::array::from_fn(|c| 1.0 / (255.0 * STD[c])),
        std::array::from_fn(|c| -MEAN[c] / STD[c]),
    )
}

/// Converts interleaved RGB values in `0..=255` (HWC) to normalised planar `[3, H, W]` data:
/// `(x / 255 - mean) / std` with the ImageNet [`MEAN`] and [`STD`].
pub fn normalize_chw(hwc: &[f32], width: usize, height: usize) -> Vec<f32> {
    let n = width * height;
    assert_eq!(hwc.len(), n * 3, "normalize_chw: buffer size");
    let mut out = vec![0f32; n * 3];
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    let a: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * STD[c]));
    let o: [f32; 3] = std::array::from_fn(|c| -MEAN[c] / STD[c]);
    for (i, px) in hwc.chunks_exact(3).enumerate() {
        r[i] = px[0] * a[0] + o[0];
        g[i] = px[1] * a[1] + o[1];
        b[i] = px[2] * a[2] + o[2];
    }
    out
}

/// Normalised `[3, H, W]` data of a whole image at its own size.
pub fn image_to_chw(img: &RgbImage) -> Vec<f32> {
    let hwc: Vec<f32> = img.as_raw().iter().map(|&v| v as f32).collect();
    normalize_chw(&hwc, img.width() as usize, img.height() as usize)
}

/// Loads one image for inference at its own size: the normalised tensor `[1, 3, H, W]` (f32,
/// CPU) and the decoded RGB image (for drawing the detections on).
///
/// ```no_run
/// let (x, img) = retinanet_dataset::load_image_for_inference("img/0.jpg".as_ref()).unwrap();
/// assert_eq!(x.dims(), &[1, 3, img.height() as usize, img.width() as usize]);
/// ```
pub fn load_image_for_inference(path: &Path) -> Result<(Tensor, RgbImage)> {
    let img = load_rgb(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let t = Tensor::from_vec(image_to_chw(&img), (1, 3, h, w), &Device::Cpu)?;
    Ok((t, img))
}

/// Python's `round` (half to even), used where the tutorial's arithmetic rounds.
pub(crate) fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_resample_is_exact() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 3]));
        let rect = SrcRect {
            x0: 0.0,
            y0: 0.0,
            x1: 7.0,
            y1: 5.0,
        };
        let out = resample(&img, rect, 7, 5, false, false);
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                assert!((out[i * 3 + c] - px.0[c] as f32).abs() < 1e-4);
            }
        }
        let flipped = resample(&img, rect, 7, 5, true, true);
        assert_eq!(flipped[0], 60.0);
        assert_eq!(flipped[3 * 6], 0.0);
    }

    #[test]
    fn padding_outside_the_image_is_black() {
        let img = RgbImage::from_pixel(4, 4, image::Rgb([200, 200, 200]));
        let rect = SrcRect {
            x0: -2.0,
            y0: 0.0,
            x1: 6.0,
            y1: 4.0,
        };
        let out = resample(&img, rect, 8, 4, false, false);
        assert_eq!(out[0], 0.0);
        assert!((out[3 * 3] - 200.0).abs() < 1e-3);
        assert_eq!(out[7 * 3], 0.0);
    }

    #[test]
    fn downscale_averages() {
        // A 1-pixel checkerboard halved becomes uniform grey with the antialiasing filter.
        let img = RgbImage::from_fn(16, 16, |x, y| {
            let v = if (x + y) % 2 == 0 { 255 } else { 0 };
            image::Rgb([v, v, v])
        });
        let rect = SrcRect {
            x0: 0.0,
            y0: 0.0,
            x1: 16.0,
            y1: 16.0,
        };
        let out = resample(&img, rect, 8, 8, false, true);
        let mid = out[(4 * 8 + 4) * 3];
        assert!((mid - 127.5).abs() < 1.0, "{mid}");
    }

    #[test]
    fn normalisation_values() {
        let v = normalize_chw(&[255.0, 0.0, 127.5], 1, 1);
        assert!((v[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        assert!((v[1] - (-0.456 / 0.224)).abs() < 1e-5);
        assert!((v[2] - (0.5 - 0.406) / 0.225).abs() < 1e-5);
    }

    #[test]
    fn python_rounding() {
        assert_eq!(round_half_even(0.5), 0.0);
        assert_eq!(round_half_even(1.5), 2.0);
        assert_eq!(round_half_even(-0.5), 0.0);
        assert_eq!(round_half_even(2.4), 2.0);
    }
}
