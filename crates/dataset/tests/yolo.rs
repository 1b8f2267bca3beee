//! YOLO-format datasets: `data.yaml` in its usual shapes, label files to pixel boxes (exactly),
//! polygons, background images, every kind of bad file refused by name and line, and the
//! round trip list -> YOLO -> list.

use std::path::Path;

use retinanet_dataset::annotations::DetectionRecord;
use retinanet_dataset::yolo::{label_path, read_data_yaml, read_label_file, write_yolo};
use retinanet_dataset::{DetectionDataset, OpenOptions};

fn image(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(w, h, image::Rgb([90, 120, 30]))
        .save(path)
        .unwrap();
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A dataset of three training images (one without a label file) and one validation image.
fn dataset(root: &Path) -> std::path::PathBuf {
    image(&root.join("images/train/a.png"), 100, 50);
    image(&root.join("images/train/sub/b.jpg"), 64, 64);
    image(&root.join("images/train/c.png"), 20, 30);
    image(&root.join("images/val/d.png"), 40, 40);
    write(
        &root.join("labels/train/a.txt"),
        "0 0.5 0.5 0.2 0.4\n1 0.1 0.9 0.2 0.2\n",
    );
    // A polygon (segmentation export), CRLF line ends.
    write(
        &root.join("labels/train/sub/b.txt"),
        "2 0.25 0.25 0.75 0.25 0.5 0.75\r\n",
    );
    write(&root.join("labels/val/d.txt"), "1 0.5 0.5 1.0 1.0\n");
    let yaml = root.join("data.yaml");
    write(
        &yaml,
        "# exported\npath: .\ntrain: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n  2: bird\n",
    );
    yaml
}

#[test]
fn label_files_become_exact_pixel_boxes() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path());
    let train = DetectionDataset::open_yolo(&yaml, "train", &OpenOptions::default()).unwrap();
    assert_eq!(train.class_names(), ["cat", "dog", "bird"]);
    assert_eq!(train.len(), 3);
    let by_name = |n: &str| -> &DetectionRecord {
        train
            .records()
            .iter()
            .find(|r| r.name.ends_with(n))
            .unwrap()
    };
    // cx 50, cy 25, w 20, h 20 -> x 40..59, y 15..34 (inclusive maxima); class 0 -> label 1.
    let a = by_name("a.png");
    assert_eq!(a.labels, vec![1, 2]);
    assert_eq!(a.boxes[0], [15.0, 40.0, 34.0, 59.0]);
    // cx 10, cy 45, w 20, h 10 -> x 0..19, y 40..49.
    assert_eq!(a.boxes[1], [40.0, 0.0, 49.0, 19.0]);
    // The polygon's extent: x 16..48, y 16..48 on 64 px.
    let b = by_name("b.jpg");
    assert_eq!(
        (b.labels.clone(), b.boxes[0]),
        (vec![3], [16.0, 16.0, 47.0, 47.0])
    );
    assert!(
        by_name("c.png").boxes.is_empty(),
        "no label file: background"
    );
    let val = DetectionDataset::open_yolo(&yaml, "val", &OpenOptions::default()).unwrap();
    assert_eq!(val.records()[0].boxes, vec![[0.0, 0.0, 39.0, 39.0]]);
    assert_eq!(
        label_path(Path::new("/d/images/x/images/y.jpg")),
        Path::new("/d/images/x/labels/y.txt")
    );
}

#[test]
fn data_yaml_shapes_people_export() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root);
    // A list file of images (Ultralytics' `./images/...` form), names as a list, nc given.
    write(
        &root.join("train.txt"),
        "./images/train/a.png\nimages/train/c.png\n\n",
    );
    write(
        &root.join("other.yaml"),
        "path: .\ntrain: [train.txt, images/val]\nval: images/val/d.png\nnc: 3\nnames: [cat, dog, bird]\n",
    );
    let d = read_data_yaml(&root.join("other.yaml")).unwrap();
    assert_eq!(d.splits["train"].len(), 3);
    assert_eq!(d.splits["val"].len(), 1);
    let t = DetectionDataset::open_yolo(&root.join("other.yaml"), "train", &OpenOptions::default())
        .unwrap();
    assert_eq!(t.len(), 3);
    // An explicit class list renumbers by name.
    let opts = OpenOptions {
        classes: Some(vec!["bird".into(), "dog".into(), "cat".into()]),
        ..Default::default()
    };
    let t = DetectionDataset::open_yolo(&root.join("data.yaml"), "train", &opts).unwrap();
    let a = t
        .records()
        .iter()
        .find(|r| r.name.ends_with("a.png"))
        .unwrap();
    assert_eq!(a.labels, vec![3, 2]);
}

#[test]
fn bad_yaml_and_label_files_are_refused_by_name_and_line() {
    let yaml_cases: &[(&str, &str)] = &[
        ("train: images/train\n", "names"),
        ("train: images/train\nnames: []\n", "empty"),
        ("train: images/train\nnames: [a, a]\n", "twice"),
        ("train: images/train\nnc: 2\nnames: [a, b, c]\n", "nc = 2"),
        (
            "train: images/train\nnames: {0: a, 2: c}\n",
            "class 1 is missing",
        ),
        ("names: [a]\n", "no split"),
        ("train: nowhere\nnames: [a]\n", "does not exist"),
        ("train: [images/train\nnames: [a]\n", "line"),
        ("- a\n- b\n", "mapping"),
    ];
    for (text, want) in yaml_cases {
        let dir = tempfile::tempdir().unwrap();
        dataset(dir.path());
        let y = dir.path().join("bad.yaml");
        write(&y, text);
        let e = read_data_yaml(&y).unwrap_err().to_string();
        assert!(e.contains("bad.yaml") && e.contains(want), "{text:?}: {e}");
    }
    let label_cases: &[(&str, &str)] = &[
        ("3 0.5 0.5 0.1 0.1\n", "class 3 is outside 0..=2"),
        ("x 0.5 0.5 0.1 0.1\n", "not a class index"),
        ("0 0.5 nan 0.1 0.1\n", "not a finite number"),
        ("0 0.5 0.5 1.5 0.1\n", "outside [0, 1]"),
        ("0 0.5 0.5 -0.1 0.1\n", "outside [0, 1]"),
        ("0 0.5 0.5 0.1\n", "got 3 numbers"),
        ("0 0.1 0.1 0.2 0.2 0.3\n", "got 5 numbers"),
        ("0 0.5 0.5 0.1 0.1\n0 1 2\n", ":2:"),
    ];
    for (text, want) in label_cases {
        let dir = tempfile::tempdir().unwrap();
        let l = dir.path().join("labels/x.txt");
        write(&l, text);
        let e = read_label_file(&l, 10, 10, 3).unwrap_err().to_string();
        assert!(e.contains("x.txt") && e.contains(want), "{text:?}: {e}");
    }
    // A label file of a listed image that is not there: found when the dataset is opened.
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path());
    write(
        &dir.path().join("list.txt"),
        "images/train/a.png\nimages/train/gone.png\n",
    );
    write(
        &yaml,
        "train: list.txt\nval: images/val\nnames: [cat, dog, bird]\n",
    );
    let e = DetectionDataset::open_yolo(&yaml, "train", &OpenOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("gone.png"), "{e}");
    let opts = OpenOptions {
        skip_missing: true,
        ..Default::default()
    };
    let t = DetectionDataset::open_yolo(&yaml, "train", &opts).unwrap();
    assert_eq!((t.len(), t.dropped().len()), (1, 1));
    let e = DetectionDataset::open_yolo(&yaml, "test", &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no split `test`"), "{e}");
}

#[test]
fn list_to_yolo_and_back_keeps_the_boxes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    image(&src.join("p/one.png"), 120, 80);
    image(&src.join("two.png"), 33, 47);
    let records = vec![
        DetectionRecord {
            name: "p/one.png".into(),
            boxes: vec![[10.0, 20.0, 39.0, 59.0], [0.0, 0.0, 79.0, 119.0]],
            labels: vec![2, 1],
        },
        DetectionRecord {
            name: "two.png".into(),
            boxes: vec![],
            labels: vec![],
        },
    ];
    let names = vec!["a".to_string(), "b".to_string()];
    let out = dir.path().join("yolo");
    let yaml = write_yolo(
        &out,
        &names,
        &[("train", &records, &src), ("val", &records[..1], &src)],
    )
    .unwrap();
    let back = DetectionDataset::open_yolo(&yaml, "train", &OpenOptions::default()).unwrap();
    assert_eq!(back.class_names(), names.as_slice());
    assert_eq!(back.len(), 2);
    for r in &records {
        let b = back
            .records()
            .iter()
            .find(|x| x.name.ends_with(&r.name))
            .unwrap();
        assert_eq!(b.labels, r.labels);
        for (x, y) in b.boxes.iter().zip(&r.boxes) {
            for k in 0..4 {
                assert!((x[k] - y[k]).abs() < 1e-3, "{x:?} vs {y:?}");
            }
        }
    }
    // And back to the tutorial's list format.
    let list = dir.path().join("back.txt");
    back.write_list(&list, &dir.path().join("names.txt"))
        .unwrap();
    let again =
        DetectionDataset::from_list(&list, &dir.path().join("names.txt"), back.image_root())
            .unwrap();
    assert_eq!(again.records(), back.records());
}
