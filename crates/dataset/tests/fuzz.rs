//! Property tests over arbitrary and mutated user files (list, names, VOC split and XML, COCO
//! JSON): the readers never panic, and every error names the file at fault. Each property
//! tries `CASES` inputs (a third arbitrary bytes, the rest mutations of a valid file); the
//! total is printed.

mod common;

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use retinanet_dataset::{DetectionDataset, OpenOptions, read_names};

const CASES: u32 = 500;

/// Fragments that parsers of these formats treat specially.
const TOKENS: &[&str] = &[
    " ",
    "\n",
    "\r\n",
    "\r",
    "\t",
    "\u{feff}",
    "\0",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e39",
    "-0",
    "99999999999999999999",
    "3.5",
    "1e-45",
    "é",
    "\u{202e}",
    "..",
    "/",
    "\\",
    "<",
    ">",
    "</",
    "<object>",
    "</object>",
    "<name>",
    "</name>",
    "<bndbox>",
    "<difficult>1",
    "<![CDATA[",
    "&amp;",
    "&#0;",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "null",
    "true",
    "\"id\"",
    "\"bbox\"",
    "\"images\"",
    "\"categories\"",
    "18446744073709551616",
    "-5e-324",
];

/// Runs `check` on `CASES` inputs derived from `seed` (shared engine: retinanet-testkit).
fn fuzz(seed: &'static [u8], check: impl Fn(&[u8]) -> Result<(), TestCaseError>) {
    retinanet_testkit::fuzz::run(seed, TOKENS, CASES, check);
}

/// Either fine, or an error whose message names one of `files`.
fn names_a_file<T>(
    r: Result<T, retinanet_dataset::DatasetError>,
    files: &[&Path],
) -> Result<(), TestCaseError> {
    if let Err(e) = r {
        let msg = e.to_string();
        prop_assert!(
            files.iter().any(|f| msg.contains(&*f.to_string_lossy())),
            "the error names none of {files:?}: {msg}"
        );
    }
    Ok(())
}

const LIST: &[u8] = b"a.jpg 1 2 30 40 2 5.5 6 7 8 1\nb.jpg\n\nsub/c.jpg 0 0 9 9 3 1 1 2 2 1\n";
const NAMES: &[u8] = b"cat\ndog\nbird\n";

fn list_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for n in ["a.jpg", "b.jpg", "sub/c.jpg"] {
        let p = dir.path().join(n);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }
    dir
}

#[test]
fn list_files() {
    let dir = list_dir();
    let (list, names) = (
        dir.path().join("fuzzed-list.txt"),
        dir.path().join("names.txt"),
    );
    std::fs::write(&names, NAMES).unwrap();
    let model = OpenOptions {
        classes: Some(vec!["dog".into(), "cat".into()]),
        skip_missing: false,
    };
    fuzz(LIST, |bytes| {
        std::fs::write(&list, bytes).unwrap();
        names_a_file(
            DetectionDataset::from_list(&list, &names, dir.path()),
            &[&list],
        )?;
        names_a_file(
            DetectionDataset::open_list(&list, &names, dir.path(), &model),
            &[&list],
        )
    });
}

#[test]
fn names_files() {
    let dir = list_dir();
    let (list, names) = (
        dir.path().join("list.txt"),
        dir.path().join("fuzzed-names.txt"),
    );
    std::fs::write(&list, LIST).unwrap();
    fuzz(NAMES, |bytes| {
        std::fs::write(&names, bytes).unwrap();
        names_a_file(read_names(&names), &[&names])?;
        names_a_file(
            DetectionDataset::from_list(&list, &names, dir.path()),
            &[&names],
        )
    });
}

const XML: &[u8] = b"<?xml version=\"1.0\"?>\n<annotation><filename>x.jpg</filename>\
<object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>21</ymin>\
<xmax>60</xmax><ymax>80</ymax></bndbox></object>\n<object><name>cat</name><bndbox>\
<xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>\n";

fn voc_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for d in ["Annotations", "ImageSets/Main", "JPEGImages"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::write(r.join("ImageSets/Main/val.txt"), "x\n").unwrap();
    std::fs::write(r.join("JPEGImages/x.jpg"), b"").unwrap();
    std::fs::write(r.join("Annotations/x.xml"), XML).unwrap();
    dir
}

#[test]
fn voc_xml() {
    let dir = voc_dir();
    let root = dir.path();
    let xml = root.join("Annotations/x.xml");
    let model = OpenOptions {
        classes: Some(vec!["dog".into(), "cat".into()]),
        skip_missing: true,
    };
    fuzz(XML, |bytes| {
        std::fs::write(&xml, bytes).unwrap();
        names_a_file(DetectionDataset::from_voc(root, "val"), &[&xml])?;
        names_a_file(DetectionDataset::open_voc(root, &["val"], &model), &[&xml])
    });
}

#[test]
fn voc_split_files() {
    let dir = voc_dir();
    let root = dir.path();
    let split = root.join("ImageSets/Main/val.txt");
    let ann = root.join("Annotations");
    fuzz(b"x\nx\n", |bytes| {
        std::fs::write(&split, bytes).unwrap();
        // An unknown id is reported against its XML, which the split file names.
        names_a_file(DetectionDataset::from_voc(root, "val"), &[&split, &ann])
    });
}

const COCO: &[u8] = br#"{"images": [{"id": 10, "file_name": "x.jpg", "width": 100},
 {"id": 11, "file_name": "y.jpg"}],
"annotations": [{"id": 1, "image_id": 10, "bbox": [10.0, 20.0, 30.0, 40.0], "category_id": 3, "iscrowd": 0},
 {"id": 2, "image_id": 11, "bbox": [0, 0, 5, 5], "category_id": 1, "iscrowd": 1}],
"categories": [{"id": 3, "name": "zebra"}, {"id": 1, "name": "person"}]}
"#;

#[test]
fn coco_json() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["x.jpg", "y.jpg"] {
        std::fs::write(dir.path().join(n), b"").unwrap();
    }
    let json = dir.path().join("fuzzed-instances.json");
    let model = OpenOptions {
        classes: Some(vec!["person".into(), "zebra".into()]),
        skip_missing: false,
    };
    fuzz(COCO, |bytes| {
        std::fs::write(&json, bytes).unwrap();
        names_a_file(DetectionDataset::from_coco(&json, dir.path()), &[&json])?;
        names_a_file(
            DetectionDataset::open_coco(&[(&json, dir.path())], &model),
            &[&json],
        )
    });
}

const DATA_YAML: &[u8] =
    b"path: .\ntrain: images/train\nval: [images/train, list.txt]\nnc: 2\nnames:\n  0: cat\n  1: dog\n";
const YOLO_LABEL: &[u8] = b"0 0.5 0.5 0.25 0.5\n1 0.1 0.1 0.3 0.1 0.2 0.4\n";

/// A YOLO dataset of two images (one real PNG so its size can be read) and a list file.
fn yolo_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("images/train/a.png");
    std::fs::create_dir_all(img.parent().unwrap()).unwrap();
    image::RgbImage::new(8, 6).save(&img).unwrap();
    std::fs::create_dir_all(dir.path().join("labels/train")).unwrap();
    std::fs::write(dir.path().join("labels/train/a.txt"), YOLO_LABEL).unwrap();
    std::fs::write(dir.path().join("list.txt"), b"images/train/a.png\n").unwrap();
    dir
}

#[test]
fn yolo_data_yaml() {
    let dir = yolo_dir();
    let yaml = dir.path().join("fuzzed-data.yaml");
    fuzz(DATA_YAML, |bytes| {
        std::fs::write(&yaml, bytes).unwrap();
        // Each error names the YAML (or a file it led to, under the dataset's folder).
        let r = DetectionDataset::open_yolo(&yaml, "train", &OpenOptions::default());
        names_a_file(r, &[&yaml, dir.path()])
    });
}

#[test]
fn yolo_label_files() {
    let dir = yolo_dir();
    let yaml = dir.path().join("data.yaml");
    std::fs::write(&yaml, DATA_YAML).unwrap();
    let label = dir.path().join("labels/train/a.txt");
    fuzz(YOLO_LABEL, |bytes| {
        std::fs::write(&label, bytes).unwrap();
        names_a_file(
            DetectionDataset::open_yolo(&yaml, "train", &OpenOptions::default()),
            &[&label],
        )
    });
}
