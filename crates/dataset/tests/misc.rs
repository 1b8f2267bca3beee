//! Inference preprocessing, colour conversion, drawing output and synthetic determinism.

use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use retinanet_dataset::synthetic::{self, SyntheticConfig};
use retinanet_dataset::{DatasetError, draw, load_image_for_inference, load_rgb};

#[test]
fn inference_preprocessing_at_own_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.png");
    let img = RgbImage::from_fn(7, 5, |x, y| Rgb([x as u8 * 30, y as u8 * 50, 255]));
    img.save(&p).unwrap();
    let (t, back) = load_image_for_inference(&p).unwrap();
    assert_eq!(t.dims(), &[1, 3, 5, 7]);
    assert_eq!(back, img);
    let x = t.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
    // Pixel (x=2, y=3): R = 60, G = 150, B = 255.
    let expect = [
        (60.0 / 255.0 - 0.485) / 0.229,
        (150.0 / 255.0 - 0.456) / 0.224,
        (1.0 - 0.406) / 0.225,
    ];
    for c in 0..3 {
        assert!((x[c][3][2] - expect[c]).abs() < 1e-5, "channel {c}");
    }
}

#[test]
fn grey_and_rgba_become_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("g.png");
    GrayImage::from_pixel(4, 3, Luma([77])).save(&g).unwrap();
    assert_eq!(load_rgb(&g).unwrap().get_pixel(1, 1).0, [77, 77, 77]);
    let a = dir.path().join("a.png");
    RgbaImage::from_pixel(4, 3, Rgba([10, 20, 30, 128]))
        .save(&a)
        .unwrap();
    let rgb = load_rgb(&a).unwrap();
    assert_eq!(rgb.dimensions(), (4, 3));
    assert_eq!(rgb.get_pixel(0, 0).0, [10, 20, 30]);
    // A file with a wrong extension is decoded by its content.
    let j = dir.path().join("actually_png.jpg");
    std::fs::copy(&g, &j).unwrap();
    assert_eq!(load_rgb(&j).unwrap().get_pixel(0, 0).0, [77, 77, 77]);
    // Corrupt and missing files are errors naming the file.
    let bad = dir.path().join("bad.jpg");
    std::fs::write(&bad, [0xFF, 0xD8, 0xFF, 0x00, 0x01]).unwrap();
    let e = load_rgb(&bad).unwrap_err();
    assert!(
        matches!(e, DatasetError::Image { .. }) && e.to_string().contains("bad.jpg"),
        "{e}"
    );
    let e = load_rgb(&dir.path().join("none.jpg")).unwrap_err();
    assert!(
        matches!(e, DatasetError::Io { .. }) && e.to_string().contains("none.jpg"),
        "{e}"
    );
}

#[test]
fn drawn_detections_are_saved_as_png() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = RgbImage::from_pixel(120, 90, Rgb([255, 255, 255]));
    let names = vec!["dog".to_string(), "cat".to_string()];
    draw::draw_detections(
        &mut img,
        &[[30.0, 10.0, 80.0, 60.0], [5.0, 70.0, 40.0, 115.0]],
        &[2, 1],
        Some(&[0.87, 0.5]),
        &names,
    );
    let p = dir.path().join("out/det.png");
    draw::save_png(&img, &p).unwrap();
    let back = load_rgb(&p).unwrap();
    assert_eq!(back, img);
    assert_eq!(*back.get_pixel(10, 50), draw::class_color(2));
    // Text pixels (black or white) inside the tag above the first box.
    let tag_has_text = (10..60).any(|x| {
        (20..30).any(|y| {
            back.get_pixel(x, y).0 == [0, 0, 0] || back.get_pixel(x, y).0 == [255, 255, 255]
        })
    });
    assert!(tag_has_text);
}

#[test]
fn synthetic_data_is_deterministic() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = SyntheticConfig {
        num_train: 6,
        num_eval: 3,
        seed: 5,
        ..Default::default()
    };
    let a = synthetic::ensure_detection(d1.path(), &cfg).unwrap();
    let b = synthetic::ensure_detection(d2.path(), &cfg).unwrap();
    let la = std::fs::read_to_string(&a.train_list).unwrap();
    assert_eq!(la, std::fs::read_to_string(&b.train_list).unwrap());
    assert_eq!(
        std::fs::read(a.image_root.join("train/00003.jpg")).unwrap(),
        std::fs::read(b.image_root.join("train/00003.jpg")).unwrap()
    );
    // Another seed, other scenes; train and eval differ.
    let c = synthetic::ensure_detection(
        d1.path(),
        &SyntheticConfig {
            seed: 6,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_ne!(c.dir, a.dir);
    assert_ne!(la, std::fs::read_to_string(&c.train_list).unwrap());
    assert_ne!(
        std::fs::read(a.image_root.join("train/00000.jpg")).unwrap(),
        std::fs::read(a.image_root.join("eval/00000.jpg")).unwrap()
    );
    // Boxes lie in the image and are at least ~12 px on their longer side.
    let ds =
        retinanet_dataset::DetectionDataset::from_list(&a.train_list, &a.names_file, &a.image_root)
            .unwrap();
    for r in ds.records() {
        for b in &r.boxes {
            assert!(
                b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= 159.0 && b[3] <= 159.0,
                "{b:?}"
            );
            assert!((b[2] - b[0]).max(b[3] - b[1]) >= 8.0, "{b:?}");
        }
    }
    let e = synthetic::ensure_detection(
        d1.path(),
        &SyntheticConfig {
            image_size: 8,
            ..cfg.clone()
        },
    )
    .unwrap_err();
    assert!(matches!(e, DatasetError::Invalid(_)));
    for object_size in [[3.0, 20.0], [30.0, 20.0], [20.0, 159.0]] {
        let e = synthetic::ensure_detection(
            d1.path(),
            &SyntheticConfig {
                object_size,
                ..cfg.clone()
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("object_size"),
            "{object_size:?}: {e}"
        );
    }
}

#[test]
fn synthetic_object_sizes_follow_the_config() {
    use retinanet_dataset::loader::item_rng;
    // Visible bounds: never above the largest side (plus rounding), and the largest visible side
    // of an unoccluded scene's shape at least about the smallest.
    for object_size in [[10.0f32, 16.0], [40.0, 60.0]] {
        let cfg = SyntheticConfig {
            object_size,
            max_objects: 1,
            ..Default::default()
        };
        for i in 0..30 {
            let (_, boxes, _) = synthetic::detection_scene(&cfg, &mut item_rng(3, 4, i));
            for b in &boxes {
                let side = (b[2] - b[0]).max(b[3] - b[1]) + 1.0;
                assert!(side <= object_size[1] * 1.5 + 2.0, "{object_size:?}: {b:?}");
                assert!(side >= object_size[0] * 0.5, "{object_size:?}: {b:?}");
            }
        }
    }
}

#[test]
fn synthetic_boxes_bound_the_shapes_exactly() {
    use retinanet_dataset::loader::item_rng;
    let cfg = SyntheticConfig::default();
    for i in 0..20 {
        let (img, boxes, labels) = synthetic::detection_scene(&cfg, &mut item_rng(1, 2, i));
        assert_eq!(boxes.len(), labels.len());
        assert!(!boxes.is_empty());
        for b in &boxes {
            let (y0, x0, y1, x1) = (b[0] as u32, b[1] as u32, b[2] as u32, b[3] as u32);
            // Each side of the box touches at least one pixel of one colour that is the shape's:
            // the outside neighbour row/column differs somewhere along it.
            let differs =
                |xa: u32, ya: u32, xb: u32, yb: u32| img.get_pixel(xa, ya) != img.get_pixel(xb, yb);
            if y0 > 0 {
                assert!(
                    (x0..=x1).any(|x| differs(x, y0, x, y0 - 1)),
                    "top edge of {b:?} in scene {i}"
                );
            }
            if x0 > 0 {
                assert!(
                    (y0..=y1).any(|y| differs(x0, y, x0 - 1, y)),
                    "left edge of {b:?} in scene {i}"
                );
            }
        }
    }
}

#[test]
fn synthetic_small_objects_on_textures() {
    use retinanet_dataset::loader::item_rng;
    use retinanet_dataset::synthetic::Background;
    let cfg = SyntheticConfig {
        image_size: 400,
        min_objects: 10,
        max_objects: 40,
        object_size: [8.0, 30.0],
        background: Background::Textured,
        ..Default::default()
    };
    let mut counts = Vec::new();
    let mut small = 0;
    for i in 0..8 {
        let (img, boxes, labels) = synthetic::detection_scene(&cfg, &mut item_rng(2, 0, i));
        assert_eq!((img.width(), img.height()), (400, 400));
        assert_eq!(boxes.len(), labels.len());
        for b in &boxes {
            let side = (b[2] - b[0]).max(b[3] - b[1]) + 1.0;
            assert!((4.0..=46.0).contains(&side), "{b:?}");
            small += (side < 16.0) as usize;
        }
        counts.push(boxes.len());
        // A texture, not a flat or two-tone background: many distinct colours.
        let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        assert!(colours.len() > 2000, "{} colours", colours.len());
    }
    assert!(counts.iter().all(|&n| (8..=40).contains(&n)), "{counts:?}");
    assert!(counts.iter().sum::<usize>() >= 8 * 20, "{counts:?}");
    assert!(small > 40, "{small} objects under 16 px");
    // The default data keeps its folder (and so its scenes): the name the code before the
    // small-object mode gave it.
    let d = tempfile::tempdir().unwrap();
    let p = synthetic::ensure_detection(
        d.path(),
        &SyntheticConfig {
            num_train: 2,
            num_eval: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let q = synthetic::ensure_detection(
        d.path(),
        &SyntheticConfig {
            num_train: 2,
            num_eval: 1,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_eq!(
        p.dir.file_name().unwrap().to_string_lossy(),
        "shapes-det-160-s0-cf2d1e8402bfe505"
    );
    assert_ne!(p.dir, q.dir);
    let e = synthetic::ensure_detection(
        d.path(),
        &SyntheticConfig {
            min_objects: 41,
            ..cfg
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("min_objects = 41"), "{e}");
}
