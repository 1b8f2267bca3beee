//! Fixture builders shared by the integration tests (everything is created in temp folders).
#![allow(dead_code)]

use std::path::Path;

use image::{Rgb, RgbImage};

pub fn gradient_image(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            ((x * 7 + seed) % 256) as u8,
            ((y * 5 + seed * 3) % 256) as u8,
            ((x + y + seed) % 256) as u8,
        ])
    })
}

pub fn save_jpeg(img: &RgbImage, path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save_with_format(path, image::ImageFormat::Jpeg)
        .unwrap();
}

/// A tiny VOC root: 3 images (`a`, `b` in trainval; `c` in test). `a` has a dog, a difficult
/// person (skipped) and a cat; `b` has no object at all.
pub fn make_voc(root: &Path) {
    let ann = root.join("Annotations");
    let sets = root.join("ImageSets").join("Main");
    std::fs::create_dir_all(&ann).unwrap();
    std::fs::create_dir_all(&sets).unwrap();
    std::fs::write(sets.join("trainval.txt"), "a\nb\n").unwrap();
    std::fs::write(sets.join("test.txt"), "c\n").unwrap();
    let obj = |name: &str, difficult: u8, b: [u32; 4]| {
        format!(
            "<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>\
             <bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>",
            b[0], b[1], b[2], b[3]
        )
    };
    let xml = |file: &str, objs: &[String]| {
        format!(
            "<?xml version=\"1.0\"?>\n<annotation><folder>VOC2012</folder><filename>{file}</filename>\
             <size><width>120</width><height>90</height><depth>3</depth></size>{}</annotation>",
            objs.concat()
        )
    };
    std::fs::write(
        ann.join("a.xml"),
        xml(
            "a.jpg",
            &[
                obj("dog", 0, [11, 21, 60, 80]),
                obj("person", 1, [1, 1, 50, 50]),
                obj("cat", 0, [70, 5, 110, 40]),
            ],
        ),
    )
    .unwrap();
    std::fs::write(ann.join("b.xml"), xml("b.jpg", &[])).unwrap();
    std::fs::write(
        ann.join("c.xml"),
        xml("c.jpg", &[obj("car", 0, [2, 3, 30, 40])]),
    )
    .unwrap();
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        save_jpeg(
            &gradient_image(120, 90, i as u32),
            &root.join("JPEGImages").join(format!("{n}.jpg")),
        );
    }
}

/// A tiny COCO file with two categories (ids 3 and 1, out of order), three images (one without
/// annotations) and a crowd annotation that must be skipped.
pub fn make_coco(dir: &Path) -> std::path::PathBuf {
    let json = r#"{
      "images": [
        {"id": 10, "file_name": "x.jpg", "width": 100, "height": 80},
        {"id": 11, "file_name": "y.jpg", "width": 100, "height": 80},
        {"id": 12, "file_name": "z.jpg", "width": 100, "height": 80}
      ],
      "annotations": [
        {"id": 1, "image_id": 10, "bbox": [10.0, 20.0, 30.0, 40.0], "category_id": 3, "iscrowd": 0, "area": 1200},
        {"id": 2, "image_id": 10, "bbox": [50.5, 5.0, 20.0, 10.0], "category_id": 1, "iscrowd": 0, "area": 200},
        {"id": 3, "image_id": 11, "bbox": [0, 0, 100, 80], "category_id": 1, "iscrowd": 1, "area": 8000},
        {"id": 4, "image_id": 12, "bbox": [1, 2, 3, 4], "category_id": 3, "iscrowd": 0, "area": 12}
      ],
      "categories": [{"id": 3, "name": "zebra"}, {"id": 1, "name": "person"}]
    }"#;
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let path = dir.join("instances.json");
    std::fs::write(&path, json).unwrap();
    for (i, n) in ["x", "y", "z"].iter().enumerate() {
        save_jpeg(
            &gradient_image(100, 80, i as u32),
            &dir.join("img").join(format!("{n}.jpg")),
        );
    }
    path
}
