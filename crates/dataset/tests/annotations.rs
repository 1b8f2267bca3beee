mod common;

use retinanet_dataset::{DatasetError, DetectionDataset, annotations};

#[test]
fn list_and_names_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.txt");
    let names = dir.path().join("names.txt");
    std::fs::write(&names, "cat\ndog\n\nbird\n").unwrap();
    std::fs::write(
        &list,
        "a.jpg 1 2 30 40 2 5.5 6 7 8 3\n\nb.jpg\nc.jpg 0 0 9 9 1\n",
    )
    .unwrap();
    // Opening checks that the images exist (not that they decode).
    for n in ["a.jpg", "b.jpg", "c.jpg"] {
        std::fs::write(dir.path().join(n), b"").unwrap();
    }
    let ds = DetectionDataset::from_list(&list, &names, dir.path()).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.class_names(), ["cat", "dog", "bird"]);
    let a = ds.get(0);
    assert_eq!(a.name, "a.jpg");
    assert_eq!(a.boxes, vec![[1.0, 2.0, 30.0, 40.0], [5.5, 6.0, 7.0, 8.0]]);
    assert_eq!(a.labels, vec![2, 3]);
    assert!(ds.get(1).boxes.is_empty());
    assert_eq!(ds.image_path(2), dir.path().join("c.jpg"));
    // Written and read back identically.
    let (l2, n2) = (dir.path().join("l2.txt"), dir.path().join("n2.txt"));
    ds.write_list(&l2, &n2).unwrap();
    let ds2 = DetectionDataset::from_list(&l2, &n2, dir.path()).unwrap();
    assert_eq!(ds.records(), ds2.records());
    assert_eq!(ds.class_names(), ds2.class_names());
}

#[test]
fn list_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let names = dir.path().join("names.txt");
    std::fs::write(&names, "cat\ndog\n").unwrap();
    let list = dir.path().join("list.txt");

    std::fs::write(&list, "a.jpg 1 2 3 4 1\nb.jpg 1 2 3 4\n").unwrap();
    let e = DetectionDataset::from_list(&list, &names, dir.path()).unwrap_err();
    assert!(matches!(e, DatasetError::Parse { line: 2, .. }), "{e}");
    assert!(e.to_string().contains("list.txt:2"), "{e}");

    std::fs::write(&list, "a.jpg 1 2 x 4 1\n").unwrap();
    let e = DetectionDataset::from_list(&list, &names, dir.path()).unwrap_err();
    assert!(
        e.to_string().contains("list.txt:1") && e.to_string().contains("\"x\""),
        "{e}"
    );

    std::fs::write(&list, "a.jpg 1 2 3 4 1\n\nc.jpg 1 2 3 4 3\n").unwrap();
    let e = DetectionDataset::from_list(&list, &names, dir.path()).unwrap_err();
    assert!(
        matches!(
            e,
            DatasetError::ClassOutOfRange {
                line: 3,
                class: 3,
                num_classes: 2,
                ..
            }
        ),
        "{e}"
    );

    std::fs::write(&list, "a.jpg 1 2 3 4 0\n").unwrap();
    let e = DetectionDataset::from_list(&list, &names, dir.path()).unwrap_err();
    assert!(
        matches!(e, DatasetError::ClassOutOfRange { class: 0, .. }),
        "{e}"
    );

    let e = DetectionDataset::from_list(&list, &dir.path().join("missing.txt"), dir.path())
        .unwrap_err();
    assert!(
        matches!(e, DatasetError::Io { .. }) && e.to_string().contains("missing.txt"),
        "{e}"
    );

    std::fs::write(&list, "\n\n").unwrap();
    let e = DetectionDataset::from_list(&list, &names, dir.path()).unwrap_err();
    assert!(matches!(e, DatasetError::Empty(_)), "{e}");

    std::fs::write(&names, "\n").unwrap();
    let e = DetectionDataset::from_list(&list, &names, dir.path()).unwrap_err();
    assert!(matches!(e, DatasetError::Empty(_)), "{e}");
}

#[test]
fn voc_reader_and_converter() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("VOC");
    common::make_voc(&root);
    let ds = DetectionDataset::from_voc(&root, "trainval").unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.class_names().len(), 20);
    let a = ds.get(0);
    assert_eq!(a.name, "a.jpg");
    // VOC xmin 11 ymin 21 xmax 60 ymax 80 -> [20, 10, 79, 59]; the difficult person is skipped.
    assert_eq!(
        a.boxes,
        vec![[20.0, 10.0, 79.0, 59.0], [4.0, 69.0, 39.0, 109.0]]
    );
    assert_eq!(a.labels, vec![12, 8]); // dog, cat in VOC order
    assert!(ds.get(1).boxes.is_empty());
    assert_eq!(ds.image_path(0), root.join("JPEGImages").join("a.jpg"));

    let (list, names) = (
        dir.path().join("voc_trainval.txt"),
        dir.path().join("voc_names.txt"),
    );
    let n = annotations::voc_to_list(&root, "trainval", None, &list, &names).unwrap();
    assert_eq!(n, 2);
    assert_eq!(
        std::fs::read_to_string(&list).unwrap(),
        "a.jpg 20 10 79 59 12 4 69 39 109 8\nb.jpg\n"
    );
    let back = DetectionDataset::from_list(&list, &names, root.join("JPEGImages")).unwrap();
    assert_eq!(back.records(), ds.records());

    // Explicit names: unknown objects are an error naming the XML file.
    let only_dog = vec!["dog".to_string()];
    let e =
        DetectionDataset::from_voc_with_classes(&root, "trainval", Some(&only_dog)).unwrap_err();
    assert!(
        e.to_string().contains("a.xml") && e.to_string().contains("cat"),
        "{e}"
    );

    // Malformed XML and a missing split.
    std::fs::write(
        root.join("Annotations").join("c.xml"),
        "<annotation><object>",
    )
    .unwrap();
    let e = DetectionDataset::from_voc(&root, "test").unwrap_err();
    assert!(e.to_string().contains("c.xml"), "{e}");
    assert!(
        DetectionDataset::from_voc(&root, "nosuchsplit")
            .unwrap_err()
            .to_string()
            .contains("nosuchsplit.txt")
    );
}

#[test]
fn coco_reader_and_converter() {
    let dir = tempfile::tempdir().unwrap();
    let json = common::make_coco(dir.path());
    let ds = DetectionDataset::from_coco(&json, dir.path().join("img")).unwrap();
    assert_eq!(ds.len(), 3);
    // Labels in increasing category id: 1 = person, 2 = zebra.
    assert_eq!(ds.class_names(), ["person", "zebra"]);
    let x = ds.get(0);
    assert_eq!(
        x.boxes,
        vec![[20.0, 10.0, 59.0, 39.0], [5.0, 50.5, 14.0, 69.5]]
    );
    assert_eq!(x.labels, vec![2, 1]);
    assert!(ds.get(1).boxes.is_empty(), "crowd annotations are skipped");
    assert_eq!(ds.get(2).labels, vec![2]);

    let (list, names) = (
        dir.path().join("coco.txt"),
        dir.path().join("coco_names.txt"),
    );
    assert_eq!(annotations::coco_to_list(&json, &list, &names).unwrap(), 3);
    let back = DetectionDataset::from_list(&list, &names, dir.path().join("img")).unwrap();
    assert_eq!(back.records(), ds.records());
    assert_eq!(std::fs::read_to_string(&names).unwrap(), "person\nzebra\n");

    let coco = annotations::read_coco(&json).unwrap();
    assert_eq!(coco.category_ids, vec![1, 3]);

    std::fs::write(&json, "{\"images\": [}").unwrap();
    let e = DetectionDataset::from_coco(&json, dir.path()).unwrap_err();
    assert!(e.to_string().contains("instances.json"), "{e}");
}
