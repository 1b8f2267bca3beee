//! A batch from each source: list, VOC, COCO, ImageFolder, CIFAR-10, MNIST, synthetic.

mod common;

use candle_core::DType;
use retinanet_dataset::synthetic::{self, Shape, SyntheticConfig};
use retinanet_dataset::{
    ClassificationDataset, ClassificationLoader, ClassificationTransform, DetectionDataset,
    DetectionLoader, DetectionTransform, LoaderConfig,
};

fn check_detection_batch(ds: DetectionDataset, b: usize, size: u32) {
    let c = ds.num_classes() as u32;
    let n = ds.len();
    let loader = DetectionLoader::new(
        ds,
        DetectionTransform::train(size, 25.0),
        LoaderConfig::new(b, 3),
    )
    .unwrap();
    let batches: Vec<_> = loader.epoch(0).map(|r| r.unwrap()).collect();
    assert_eq!(batches.len(), n.div_ceil(b));
    let batch = &batches[0];
    assert_eq!(
        batch.images.dims(),
        &[b.min(n), 3, size as usize, size as usize]
    );
    assert_eq!(batch.images.dtype(), DType::F32);
    assert_eq!(batch.boxes.len(), b.min(n));
    assert_eq!(batch.labels.len(), b.min(n));
    assert_eq!(batch.names.len(), b.min(n));
    let total: usize = batches.iter().map(|x| x.indices.len()).sum();
    assert_eq!(total, n);
    for x in &batches {
        for (bx, lb) in x.boxes.iter().zip(&x.labels) {
            assert_eq!(bx.len(), lb.len());
            assert!(lb.iter().all(|&l| (1..=c).contains(&l)));
            for q in bx {
                assert!(
                    q[0] <= q[2] && q[1] <= q[3] && q[0] >= 0.0 && q[3] <= size as f32 - 1.0,
                    "{q:?}"
                );
            }
        }
    }
    // Normalised values: roughly within the ImageNet range.
    let v: Vec<f32> = batch.images.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| (-2.2..=2.7).contains(x)));
}

#[test]
fn batch_from_list_file() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..5 {
        common::save_jpeg(
            &common::gradient_image(90 + i * 10, 70, i),
            &dir.path().join(format!("im/{i}.jpg")),
        );
    }
    std::fs::write(dir.path().join("names.txt"), "a\nb\n").unwrap();
    std::fs::write(
        dir.path().join("list.txt"),
        "im/0.jpg 5 5 60 60 1\nim/1.jpg\nim/2.jpg 0 0 69 99 2 10 10 40 40 1\nim/3.jpg 1 1 30 30 2\nim/4.jpg 2 2 50 80 1\n",
    )
    .unwrap();
    let ds = DetectionDataset::from_list(
        &dir.path().join("list.txt"),
        &dir.path().join("names.txt"),
        dir.path(),
    )
    .unwrap();
    check_detection_batch(ds, 2, 65);
}

#[test]
fn batch_from_voc() {
    let dir = tempfile::tempdir().unwrap();
    common::make_voc(dir.path());
    check_detection_batch(
        DetectionDataset::from_voc(dir.path(), "trainval").unwrap(),
        2,
        65,
    );
}

#[test]
fn batch_from_coco() {
    let dir = tempfile::tempdir().unwrap();
    let json = common::make_coco(dir.path());
    check_detection_batch(
        DetectionDataset::from_coco(&json, dir.path().join("img")).unwrap(),
        2,
        65,
    );
}

#[test]
fn batch_from_synthetic_detection() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig {
        num_train: 12,
        num_eval: 4,
        seed: 11,
        ..Default::default()
    };
    let p = synthetic::ensure_detection(dir.path(), &cfg).unwrap();
    let train = DetectionDataset::from_list(&p.train_list, &p.names_file, &p.image_root).unwrap();
    let eval = DetectionDataset::from_list(&p.eval_list, &p.names_file, &p.image_root).unwrap();
    assert_eq!((train.len(), eval.len()), (12, 4));
    assert_eq!(
        train.class_names(),
        ["rectangle", "ellipse", "triangle", "cross"]
    );
    assert!(
        train
            .records()
            .iter()
            .all(|r| !r.boxes.is_empty() && r.boxes.len() <= cfg.max_objects)
    );
    check_detection_batch(train, 4, 129);
    // Second call reuses the cache (same files, untouched).
    let t0 = std::fs::metadata(&p.train_list)
        .unwrap()
        .modified()
        .unwrap();
    let p2 = synthetic::ensure_detection(dir.path(), &cfg).unwrap();
    assert_eq!(p, p2);
    assert_eq!(
        std::fs::metadata(&p2.train_list)
            .unwrap()
            .modified()
            .unwrap(),
        t0
    );
    // No temporary folder is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn batch_from_image_folder_and_synthetic_classification() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig {
        num_train: 5,
        num_eval: 2,
        classes: vec![Shape::Ellipse, Shape::Cross, Shape::Rectangle],
        ..Default::default()
    };
    let p = synthetic::ensure_classification(dir.path(), &cfg).unwrap();
    let train = ClassificationDataset::from_image_folder(&p.train_root).unwrap();
    let eval = ClassificationDataset::from_image_folder(&p.eval_root).unwrap();
    assert_eq!((train.len(), eval.len()), (15, 6));
    // ImageFolder classes are sorted folder names.
    assert_eq!(train.class_names(), ["cross", "ellipse", "rectangle"]);
    assert_eq!(train.label(0), 0);
    assert_eq!(train.label(14), 2);
    let loader = ClassificationLoader::new(
        train,
        ClassificationTransform::train(48),
        LoaderConfig::new(4, 1),
    )
    .unwrap();
    let batches: Vec<_> = loader.epoch(0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 4);
    assert_eq!(batches[0].images.dims(), &[4, 3, 48, 48]);
    assert_eq!(batches[3].images.dims(), &[3, 3, 48, 48]);
    assert_eq!(batches[0].labels.dtype(), DType::U32);
    let mut labels: Vec<u32> = batches
        .iter()
        .flat_map(|b| b.labels.to_vec1::<u32>().unwrap())
        .collect();
    labels.sort();
    assert_eq!(labels, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
    let eval_loader = ClassificationLoader::new(
        eval,
        ClassificationTransform::eval(32),
        LoaderConfig::new(6, 1),
    )
    .unwrap();
    let b = eval_loader.batch(0, 0).unwrap();
    assert_eq!(b.images.dims(), &[6, 3, 32, 32]);
}

#[test]
fn batch_from_cifar10_and_mnist_dirs() {
    let dir = tempfile::tempdir().unwrap();
    // CIFAR-10: two records in test_batch.bin, label 3 (red) and 7 (blue).
    let mut bytes = Vec::new();
    for (label, plane) in [(3u8, 0usize), (7, 2)] {
        bytes.push(label);
        let mut px = vec![0u8; 3072];
        px[plane * 1024..(plane + 1) * 1024].fill(255);
        bytes.extend(px);
    }
    std::fs::write(dir.path().join("test_batch.bin"), &bytes).unwrap();
    let ds = ClassificationDataset::from_cifar10_dir(dir.path(), false).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.class_names()[3], "cat");
    let img = ds.load_image(1).unwrap();
    assert_eq!(img.get_pixel(5, 5).0, [0, 0, 255]);
    let loader = ClassificationLoader::new(
        ds,
        ClassificationTransform::eval(32),
        LoaderConfig {
            shuffle: false,
            ..LoaderConfig::new(2, 0)
        },
    )
    .unwrap();
    let b = loader.batch(0, 0).unwrap();
    assert_eq!(b.labels.to_vec1::<u32>().unwrap(), vec![3, 7]);
    assert!(
        ClassificationDataset::from_cifar10_dir(dir.path(), true)
            .unwrap_err()
            .to_string()
            .contains("data_batch_1.bin")
    );
    std::fs::write(dir.path().join("test_batch.bin"), &bytes[..100]).unwrap();
    assert!(ClassificationDataset::from_cifar10_dir(dir.path(), false).is_err());

    // MNIST: three 4x3 digits.
    let mut ib = Vec::new();
    for v in [2051u32, 3, 4, 3] {
        ib.extend(v.to_be_bytes());
    }
    ib.extend((0..36).map(|i| (i * 7) as u8));
    let mut lb = Vec::new();
    for v in [2049u32, 3] {
        lb.extend(v.to_be_bytes());
    }
    lb.extend([5u8, 0, 9]);
    std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), &ib).unwrap();
    std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), &lb).unwrap();
    let ds = ClassificationDataset::from_mnist_dir(dir.path(), false).unwrap();
    assert_eq!(ds.len(), 3);
    let img = ds.load_image(1).unwrap();
    assert_eq!((img.width(), img.height()), (3, 4));
    assert_eq!(img.get_pixel(1, 0).0, [91, 91, 91]); // pixel 12 + 1 = 13, 13 * 7
    let loader = ClassificationLoader::new(
        ds,
        ClassificationTransform::eval(28),
        LoaderConfig {
            shuffle: false,
            ..LoaderConfig::new(3, 0)
        },
    )
    .unwrap();
    assert_eq!(
        loader.batch(0, 0).unwrap().labels.to_vec1::<u32>().unwrap(),
        vec![5, 0, 9]
    );
    lb[2] = 9; // wrong magic
    std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), &lb).unwrap();
    assert!(
        ClassificationDataset::from_mnist_dir(dir.path(), false)
            .unwrap_err()
            .to_string()
            .contains("labels")
    );
}
