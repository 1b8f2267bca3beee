//! Boxes stay on their pixels through every transform.

use image::{Rgb, RgbImage};
use rand::Rng;
use retinanet_dataset::loader::item_rng;
use retinanet_dataset::{Augment, ClassificationTransform, DetectionTransform, TransformedItem};

/// Bounding box `[ymin, xmin, ymax, xmax]` of the output pixels brighter than half.
fn bright_bounds(t: &TransformedItem) -> Option<[f32; 4]> {
    let mut b: Option<[f32; 4]> = None;
    for y in 0..t.height {
        for x in 0..t.width {
            if t.hwc[(y * t.width + x) * 3] > 127.5 {
                let (y, x) = (y as f32, x as f32);
                b = Some(match b {
                    None => [y, x, y, x],
                    Some(o) => [o[0].min(y), o[1].min(x), o[2].max(y), o[3].max(x)],
                });
            }
        }
    }
    b
}

/// Paints one box white on black, transforms, and checks the transformed box bounds the white
/// region to a pixel.
fn check(transform: DetectionTransform, cases: usize, seed: u64) -> usize {
    let mut checked = 0;
    for case in 0..cases {
        let mut rng = item_rng(seed, 0, case);
        let (w, h) = (rng.random_range(60..400u32), rng.random_range(60..400u32));
        let y0 = rng.random_range(0..h - 10);
        let x0 = rng.random_range(0..w - 10);
        let y1 = rng.random_range(y0 + 5..h);
        let x1 = rng.random_range(x0 + 5..w);
        let mut img = RgbImage::new(w, h);
        for y in y0..=y1 {
            for x in x0..=x1 {
                img.put_pixel(x, y, Rgb([255, 255, 255]));
            }
        }
        let boxes = [[y0 as f32, x0 as f32, y1 as f32, x1 as f32]];
        let t = transform.apply(&img, &boxes, &[3], &mut rng);
        assert_eq!(
            (t.width, t.height),
            (transform.size as usize, transform.size as usize)
        );
        let Some(bright) = bright_bounds(&t) else {
            assert!(
                t.boxes.is_empty(),
                "case {case}: box kept but nothing painted is visible"
            );
            continue;
        };
        if t.boxes.is_empty() {
            // Dropped: must be a small visible region.
            let area = (bright[2] - bright[0] + 1.0) * (bright[3] - bright[1] + 1.0);
            assert!(
                area <= transform.boxarea_th + 60.0,
                "case {case}: dropped a box of visible area {area}"
            );
            continue;
        }
        assert_eq!(t.labels, vec![3]);
        let b = t.boxes[0];
        for k in 0..4 {
            assert!(
                (b[k] - bright[k]).abs() <= 1.0,
                "case {case} ({w}x{h}, box {:?}): transformed {b:?} vs painted {bright:?}",
                boxes[0]
            );
        }
        let s = transform.size as f32;
        assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= s - 1.0 && b[3] <= s - 1.0);
        checked += 1;
    }
    checked
}

#[test]
fn train_transform_keeps_boxes_on_their_pixels() {
    let n = check(DetectionTransform::train(129, 25.0), 150, 1);
    assert!(n > 90, "only {n} boxes checked");
    let n = check(DetectionTransform::train(257, 25.0), 60, 2);
    assert!(n > 35, "only {n} boxes checked");
}

#[test]
fn eval_transform_keeps_boxes_on_their_pixels() {
    let n = check(DetectionTransform::eval(129, 25.0), 120, 3);
    assert!(n > 60, "only {n} boxes checked");
    // A small max_size forces the longer-side cap and black padding.
    let mut t = DetectionTransform::eval(129, 25.0);
    t.max_size = 150;
    let n = check(t, 60, 4);
    assert!(n > 30, "only {n} boxes checked");
}

#[test]
fn train_transform_flips_half_the_time() {
    // Left half white: after a flip the white is on the right.
    let img = RgbImage::from_fn(
        200,
        150,
        |x, _| if x < 100 { Rgb([255; 3]) } else { Rgb([0; 3]) },
    );
    let t = DetectionTransform::train(65, 25.0);
    let mut flips = 0;
    for i in 0..200 {
        let out = t.apply(&img, &[], &[], &mut item_rng(9, 0, i));
        let left = out.hwc[(32 * 65 + 2) * 3];
        let right = out.hwc[(32 * 65 + 62) * 3];
        assert!((left > 127.0) != (right > 127.0));
        if right > 127.0 {
            flips += 1;
        }
    }
    assert!((70..=130).contains(&flips), "{flips} flips of 200");
}

#[test]
fn train_crop_falls_back_to_centred_square() {
    // 3:1 images admit no crop of area >= 0.85 with aspect <= 4/3: the centred square is used.
    let img = RgbImage::from_fn(300, 100, |x, _| {
        if (100..200).contains(&x) {
            Rgb([255; 3])
        } else {
            Rgb([0; 3])
        }
    });
    let t = DetectionTransform::train(64, 25.0);
    for i in 0..10 {
        let out = t.apply(
            &img,
            &[[0.0, 100.0, 99.0, 199.0]],
            &[1],
            &mut item_rng(5, 1, i),
        );
        assert!(
            out.hwc.iter().all(|&v| v > 254.0),
            "the crop must be exactly the white centre"
        );
        assert_eq!(out.boxes, vec![[0.0, 0.0, 63.0, 63.0]]);
    }
}

#[test]
fn eval_transform_geometry() {
    // 200x100 -> shorter side 64 (scale 0.64): 128x64, centre crop 64 at x = 32 (source x = 50).
    let img = RgbImage::from_fn(200, 100, |x, _| {
        if (50..100).contains(&x) {
            Rgb([255; 3])
        } else {
            Rgb([0; 3])
        }
    });
    let t = DetectionTransform::eval(64, 0.0);
    let out = t.apply(
        &img,
        &[[10.0, 0.0, 19.0, 199.0], [0.0, 0.0, 9.0, 9.0]],
        &[1, 2],
        &mut item_rng(0, 0, 0),
    );
    // The first box spans the whole width: clamped to the crop. The second is outside: dropped.
    // Rows 10..=19 -> [6.4, 12.8) -> inclusive [6.4, 11.8].
    assert_eq!(out.boxes, vec![[6.4, 0.0, 11.8, 63.0]]);
    assert_eq!(out.labels, vec![1]);
    // White source columns 50..100 -> output 0..32.
    assert!(out.hwc[(10 * 64 + 1) * 3] > 250.0);
    assert!(out.hwc[(10 * 64 + 30) * 3] > 250.0);
    assert!(out.hwc[(10 * 64 + 33) * 3] < 5.0);
}

#[test]
fn small_boxes_are_dropped_after_resize() {
    let img = RgbImage::new(100, 100);
    let t = DetectionTransform::eval(50, 25.0);
    // 10x10 source pixels -> 5x5 output pixels = 25: dropped; 12x12 -> 36: kept.
    let out = t.apply(
        &img,
        &[[0.0, 0.0, 9.0, 9.0], [20.0, 20.0, 31.0, 31.0]],
        &[1, 2],
        &mut item_rng(0, 0, 0),
    );
    assert_eq!(out.labels, vec![2]);
    assert_eq!(out.boxes, vec![[10.0, 10.0, 15.0, 15.0]]);
    // Boxes outside the image are clamped to it.
    let out = t.apply(
        &img,
        &[[-20.0, -5.0, 149.0, 49.0]],
        &[1],
        &mut item_rng(0, 0, 0),
    );
    assert_eq!(out.boxes, vec![[0.0, 0.0, 49.0, 24.0]]);
    // A wide box cut to a sliver by the image edge: a 0.5 x 45 extent is 22.5 px^2 but a
    // 0.9 x 45 one (40.5 px^2) would pass the area test as an inverted box; both are dropped,
    // a 1.5-pixel-high one is kept.
    let out = t.apply(
        &img,
        &[
            [-10.0, 0.0, 0.0, 89.0],
            [-10.0, 0.0, 0.8, 89.0],
            [-10.0, 0.0, 1.0, 89.0],
            [-10.0, 0.0, 2.0, 89.0],
        ],
        &[1, 2, 3, 4],
        &mut item_rng(0, 0, 0),
    );
    assert_eq!(out.labels, vec![4]);
    assert_eq!(out.boxes, vec![[0.0, 0.0, 0.5, 44.0]]);
}

#[test]
fn classification_transforms() {
    let img = RgbImage::from_fn(320, 240, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    let eval = ClassificationTransform::eval(224);
    let a = eval.apply(&img, &mut item_rng(0, 0, 0));
    assert_eq!(a.len(), 224 * 224 * 3);
    // Shorter side 240 -> 224: scale 14/15; centre crop of the 298x224 resize starts at x = 37.
    let sx = 320.0 / 298.0;
    let expect_x = (37.0 + 0.5) * sx - 0.5;
    assert!(
        (a[0] - expect_x as f32).abs() < 1.5,
        "{} vs {expect_x}",
        a[0]
    );
    let train = ClassificationTransform::train(64);
    let b = train.apply(&img, &mut item_rng(0, 0, 1));
    let c = train.apply(&img, &mut item_rng(0, 0, 1));
    let d = train.apply(&img, &mut item_rng(0, 0, 2));
    assert_eq!(b.len(), 64 * 64 * 3);
    assert_eq!(b, c, "same RNG, same output");
    assert_ne!(b, d);
    assert!(b.iter().all(|v| (0.0..=255.0).contains(v)));
}

#[test]
fn apply_into_matches_apply() {
    let img = RgbImage::from_fn(150, 110, |x, y| {
        Rgb([
            (x * 3 % 256) as u8,
            (y * 2 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    for t in [
        DetectionTransform::train(65, 25.0),
        DetectionTransform::eval(65, 25.0),
    ] {
        for i in 0..5 {
            let boxes = [[10.0, 20.0, 80.0, 100.0]];
            let a = t.apply(&img, &boxes, &[2], &mut item_rng(3, 1, i));
            let mut out = vec![0f32; 3 * 65 * 65];
            let (b, l) = t.apply_into(&img, &boxes, &[2], &mut item_rng(3, 1, i), &mut out);
            assert_eq!((a.boxes.clone(), a.labels.clone()), (b, l));
            let chw = a.to_chw();
            assert!(chw.iter().zip(&out).all(|(x, y)| (x - y).abs() < 1e-4));
        }
    }
}

/// `check` with the extras on: vertical flips, quarter turns, strong zoom (small crops) and
/// colour jitter; boxes still bound the painted pixels to a pixel. (The jitter here leaves grey
/// alone, so the painted pixels stay above half; brightness and contrast are checked below.)
#[test]
fn augmented_transforms_keep_boxes_on_their_pixels() {
    let mut t = DetectionTransform::train(129, 25.0);
    t.augment = Augment {
        vflip: 0.5,
        rot90: true,
        ..Augment::default()
    };
    let n = check(t, 150, 11);
    assert!(n > 90, "only {n} boxes checked");
    // Zooming in 1.4 to 2.2 times.
    t.augment.crop_area = (0.2, 0.5);
    let n = check(t, 150, 12);
    assert!(n > 40, "only {n} boxes checked");
    t.augment = Augment {
        hflip: 0.0,
        vflip: 1.0,
        saturation: 0.5,
        hue: 0.3,
        ..Augment::default()
    };
    let n = check(t, 100, 13);
    assert!(n > 60, "only {n} boxes checked");
}

/// The item made with the extras equals the tutorial's item of the same RNG moved exactly: a
/// vertical flip mirrors rows and boxes, a quarter turn sends pixel (y, x) to (x, S - 1 - y).
#[test]
fn flips_and_turns_move_pixels_and_boxes_exactly() {
    let img = RgbImage::from_fn(150, 110, |x, y| {
        Rgb([
            (x * 3 % 256) as u8,
            (y * 2 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    let boxes = [[10.0, 20.0, 80.0, 100.0], [50.0, 5.0, 60.0, 40.0]];
    let s = 65usize;
    let base = DetectionTransform::train(s as u32, 0.0);
    fn px(t: &TransformedItem, y: usize, x: usize) -> &[f32] {
        let i = (y * t.width + x) * 3;
        &t.hwc[i..i + 3]
    }
    let mut turns_seen = [false; 4];
    for i in 0..24 {
        let plain = base.apply(&img, &boxes, &[1, 2], &mut item_rng(4, 0, i));
        let mut v = base;
        v.augment.vflip = 1.0;
        let flipped = v.apply(&img, &boxes, &[1, 2], &mut item_rng(4, 0, i));
        for y in 0..s {
            for x in 0..s {
                assert_eq!(px(&flipped, y, x), px(&plain, s - 1 - y, x));
            }
        }
        let sf = s as f32;
        let want: Vec<[f32; 4]> = plain
            .boxes
            .iter()
            .map(|b| [sf - 1.0 - b[2], b[1], sf - 1.0 - b[0], b[3]])
            .collect();
        assert_eq!(flipped.boxes.len(), want.len());
        for (a, b) in flipped.boxes.iter().zip(&want) {
            for k in 0..4 {
                assert!((a[k] - b[k]).abs() < 1e-4, "{a:?} vs {b:?}");
            }
        }

        let mut r = base;
        r.augment.rot90 = true;
        let turned = r.apply(&img, &boxes, &[1, 2], &mut item_rng(4, 0, i));
        // Which turn was drawn: the one whose pixels match.
        let rot = |k: usize, y: usize, x: usize| match k {
            0 => (y, x),
            1 => (s - 1 - x, y),
            2 => (s - 1 - y, s - 1 - x),
            _ => (x, s - 1 - y),
        };
        let k = (0..4)
            .find(|&k| {
                (0..s).all(|y| {
                    (0..s).all(|x| {
                        let (sy, sx) = rot(k, y, x);
                        px(&turned, y, x) == px(&plain, sy, sx)
                    })
                })
            })
            .expect("a quarter turn of the plain item");
        turns_seen[k] = true;
        for (a, b) in turned.boxes.iter().zip(&plain.boxes) {
            // Pixel (y, x) goes to (x, S - 1 - y), k times: so do the box corners.
            let mut c = *b;
            for _ in 0..k {
                c = [c[1], sf - 1.0 - c[2], c[3], sf - 1.0 - c[0]];
            }
            for j in 0..4 {
                assert!((a[j] - c[j]).abs() < 1e-4, "turn {k}: {a:?} vs {c:?}");
            }
        }
        assert_eq!(turned.labels, plain.labels);
    }
    assert_eq!(turns_seen, [true; 4], "every turn is drawn");
}

#[test]
fn colour_jitter_follows_its_factors_and_leaves_boxes_alone() {
    let img = RgbImage::from_pixel(80, 60, Rgb([100, 100, 100]));
    let boxes = [[5.0, 5.0, 40.0, 50.0]];
    let base = DetectionTransform::train(33, 0.0);
    let mut bright = base;
    bright.augment.brightness = 0.5;
    let mut factors = Vec::new();
    for i in 0..40 {
        let a = base.apply(&img, &boxes, &[1], &mut item_rng(2, 3, i));
        let b = bright.apply(&img, &boxes, &[1], &mut item_rng(2, 3, i));
        assert_eq!(a.boxes, b.boxes, "jitter draws after the geometry");
        // Grey 100 times one factor in [0.5, 1.5] everywhere.
        let f = b.hwc[0] / 100.0;
        assert!((0.5..=1.5).contains(&f), "{f}");
        assert!(b.hwc.iter().all(|&v| (v - 100.0 * f).abs() < 1e-3));
        factors.push(f);
    }
    assert!(factors.iter().any(|&f| f < 0.8) && factors.iter().any(|&f| f > 1.2));
    // Saturation and hue leave grey alone; contrast of a flat image too.
    let mut other = base;
    other.augment = Augment {
        contrast: 0.4,
        saturation: 0.4,
        hue: 0.2,
        ..Augment::default()
    };
    let o = other.apply(&img, &boxes, &[1], &mut item_rng(2, 3, 0));
    assert!(
        o.hwc.iter().all(|&v| (v - 100.0).abs() < 0.05),
        "{}",
        o.hwc[0]
    );
    // The loader's normalised path equals apply, with the extras on.
    let mut all = base;
    all.augment = Augment {
        vflip: 0.5,
        rot90: true,
        brightness: 0.2,
        contrast: 0.2,
        saturation: 0.2,
        hue: 0.05,
        ..Augment::default()
    };
    let img = RgbImage::from_fn(90, 70, |x, y| Rgb([(x * 2) as u8, (y * 3) as u8, 77]));
    for i in 0..6 {
        let a = all.apply(&img, &boxes, &[1], &mut item_rng(5, 0, i));
        let mut out = vec![0f32; 3 * 33 * 33];
        let (b, _) = all.apply_into(&img, &boxes, &[1], &mut item_rng(5, 0, i), &mut out);
        assert_eq!(a.boxes, b);
        assert!(
            a.to_chw()
                .iter()
                .zip(&out)
                .all(|(x, y)| (x - y).abs() < 1e-4)
        );
    }
}

#[test]
fn whole_image_evaluation_keeps_every_object_in_place() {
    // 300x200 with the shorter side to 100: 150x100, nothing cut off.
    let mut img = RgbImage::new(300, 200);
    let boxes = [[0.0, 0.0, 39.0, 59.0], [150.0, 240.0, 199.0, 299.0]];
    for b in &boxes {
        for y in b[0] as u32..=b[2] as u32 {
            for x in b[1] as u32..=b[3] as u32 {
                img.put_pixel(x, y, Rgb([255; 3]));
            }
        }
    }
    let t = DetectionTransform::whole(100, 1000, 0.0);
    assert_eq!(t.output_size(300, 200), (100, 150));
    let out = t.apply(&img, &boxes, &[1, 2], &mut item_rng(0, 0, 0));
    assert_eq!((out.height, out.width), (100, 150));
    // Extents scale by exactly 1/2: [0, 40) -> [0, 20), [150, 200) -> [75, 100).
    assert_eq!(
        out.boxes,
        vec![[0.0, 0.0, 19.0, 29.0], [75.0, 120.0, 99.0, 149.0]]
    );
    assert_eq!(out.labels, vec![1, 2]);
    // The centre crop loses the second box's corner region: it is cut (and the first too).
    let crop =
        DetectionTransform::eval(100, 0.0).apply(&img, &boxes, &[1, 2], &mut item_rng(0, 0, 0));
    assert_ne!(crop.boxes, out.boxes);
    // Painted pixels stay under their boxes.
    for b in &out.boxes {
        let (y, x) = ((b[0] + b[2]) as usize / 2, (b[1] + b[3]) as usize / 2);
        assert!(out.hwc[(y * 150 + x) * 3] > 250.0);
    }
    // The longer side is capped: 300x200 at shorter side 100 but at most 120 wide -> 120x80.
    let capped = DetectionTransform::whole(100, 120, 0.0);
    assert_eq!(capped.output_size(300, 200), (80, 120));
    let c = capped.apply(&img, &boxes, &[1, 2], &mut item_rng(0, 0, 0));
    assert_eq!((c.height, c.width), (80, 120));
    assert_eq!(c.boxes[1], [60.0, 96.0, 79.0, 119.0]);
}
