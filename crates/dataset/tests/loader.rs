//! Loader determinism, resume, bad input handling and throughput.

mod common;

use std::time::{Duration, Instant};

use retinanet_dataset::{
    DatasetError, DetectionBatch, DetectionDataset, DetectionLoader, DetectionTransform,
    LoaderConfig,
};

fn list_dataset(dir: &std::path::Path, n: u32) -> DetectionDataset {
    let mut list = String::new();
    for i in 0..n {
        let name = format!("im/{i}.jpg");
        common::save_jpeg(
            &common::gradient_image(100 + i % 7 * 13, 80 + i % 5 * 11, i),
            &dir.join(&name),
        );
        list.push_str(&format!(
            "{name} {} {} 60 70 {}\n",
            i % 9,
            i % 11,
            1 + i % 3
        ));
    }
    std::fs::write(dir.join("names.txt"), "a\nb\nc\n").unwrap();
    std::fs::write(dir.join("list.txt"), list).unwrap();
    DetectionDataset::from_list(&dir.join("list.txt"), &dir.join("names.txt"), dir).unwrap()
}

fn same(a: &DetectionBatch, b: &DetectionBatch) -> bool {
    let va: Vec<f32> = a.images.flatten_all().unwrap().to_vec1().unwrap();
    let vb: Vec<f32> = b.images.flatten_all().unwrap().to_vec1().unwrap();
    va == vb
        && a.boxes == b.boxes
        && a.labels == b.labels
        && a.names == b.names
        && a.indices == b.indices
}

#[test]
fn seeded_runs_repeat_exactly_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let ds = list_dataset(dir.path(), 10);
    let cfg = LoaderConfig {
        batch_size: 3,
        seed: 42,
        ..Default::default()
    };
    let t = DetectionTransform::train(65, 25.0);
    let a = DetectionLoader::new(ds.clone(), t, cfg).unwrap();
    let b = DetectionLoader::new(ds.clone(), t, LoaderConfig { prefetch: 0, ..cfg }).unwrap();
    assert_eq!(a.batches_per_epoch(), 4);
    // Two epochs, endless stream vs per-epoch iterators vs synchronous batches: all identical.
    let sa: Vec<_> = a.from_position(0, 0).take(8).map(|r| r.unwrap()).collect();
    let sb: Vec<_> = b.epoch(0).chain(b.epoch(1)).map(|r| r.unwrap()).collect();
    assert_eq!(sb.len(), 8);
    for (x, y) in sa.iter().zip(&sb) {
        assert!(same(x, y), "epoch {} batch {}", x.epoch, x.batch);
    }
    assert_eq!((sa[5].epoch, sa[5].batch), (1, 1));
    assert_eq!(sa[3].indices.len(), 1, "last batch is partial");
    assert!(same(&sa[6], &a.batch(1, 2).unwrap()));
    // Resume in the middle of epoch 1.
    let resumed: Vec<_> = a.from_position(1, 2).take(2).map(|r| r.unwrap()).collect();
    assert!(same(&resumed[0], &sa[6]) && same(&resumed[1], &sa[7]));
    // Epochs differ (shuffle and augmentation), every item appears once per epoch.
    assert!(!same(&sa[0], &sa[4]));
    let mut seen: Vec<usize> = sa[4..].iter().flat_map(|x| x.indices.clone()).collect();
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    // Another seed, other batches.
    let c = DetectionLoader::new(ds.clone(), t, LoaderConfig { seed: 43, ..cfg }).unwrap();
    assert!(!same(&c.batch(0, 0).unwrap(), &sa[0]));
    // drop_last and no shuffle.
    let d = DetectionLoader::new(
        ds,
        t,
        LoaderConfig {
            drop_last: true,
            shuffle: false,
            ..cfg
        },
    )
    .unwrap();
    let sd: Vec<_> = d.epoch(0).map(|r| r.unwrap()).collect();
    assert_eq!(sd.len(), 3);
    assert_eq!(sd[1].indices, vec![3, 4, 5]);
}

#[test]
fn corrupt_images_are_errors_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let ds = list_dataset(dir.path(), 6);
    std::fs::write(dir.path().join("im/2.jpg"), b"this is not a jpeg").unwrap();
    std::fs::remove_file(dir.path().join("im/4.jpg")).unwrap();
    let t = DetectionTransform::eval(33, 25.0);
    let cfg = LoaderConfig {
        batch_size: 6,
        shuffle: false,
        ..Default::default()
    };
    let strict = DetectionLoader::new(ds.clone(), t, cfg).unwrap();
    let err = strict.epoch(0).next().unwrap().unwrap_err();
    assert!(matches!(err, DatasetError::Image { .. }), "{err}");
    assert!(err.to_string().contains("2.jpg"), "{err}");
    // The stream ends after an error.
    assert_eq!(strict.epoch(0).count(), 1);

    let lenient = DetectionLoader::new(
        ds,
        t,
        LoaderConfig {
            skip_bad: true,
            ..cfg
        },
    )
    .unwrap();
    let batches: Vec<_> = lenient
        .epoch(0)
        .chain(lenient.epoch(1))
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].indices, vec![0, 1, 3, 5]);
    assert_eq!(batches[0].images.dims()[0], 4);
    let skipped = lenient.skipped();
    assert_eq!(skipped.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2, 4]);
    assert!(skipped[0].1.contains("2.jpg") && skipped[1].1.contains("4.jpg"));
    assert_eq!(
        lenient.skipped_count(),
        4,
        "two items in each of two epochs"
    );
}

#[test]
fn loader_arguments_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let ds = list_dataset(dir.path(), 3);
    let t = DetectionTransform::train(33, 25.0);
    assert!(matches!(
        DetectionLoader::new(ds.clone(), t, LoaderConfig::new(0, 0)),
        Err(DatasetError::Invalid(_))
    ));
    let cfg = LoaderConfig {
        drop_last: true,
        ..LoaderConfig::new(4, 0)
    };
    assert!(DetectionLoader::new(ds, t, cfg).is_err());
}

/// The loader prepares batches while the consumer works: after the consumer has been busy for
/// a while, the next `prefetch` batches are ready at once.
#[test]
fn loader_prefetches_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let ds = list_dataset(dir.path(), 24);
    let t = DetectionTransform::train(129, 25.0);
    let loader = DetectionLoader::new(
        ds,
        t,
        LoaderConfig {
            prefetch: 2,
            ..LoaderConfig::new(4, 0)
        },
    )
    .unwrap();
    let nb = loader.batches_per_epoch();
    // Time to produce the batches alone.
    let t0 = Instant::now();
    for b in loader.epoch(0) {
        b.unwrap();
    }
    let load = t0.elapsed();
    let per_batch = load / nb as u32;
    eprintln!(
        "{nb} batches of 4 in {load:?}: {:.1} items/s (this build's profile)",
        24.0 / load.as_secs_f64()
    );
    // A consumer that works 10x longer than a batch takes to load finds the next two waiting.
    let mut it = loader.epoch(1);
    it.next().unwrap().unwrap();
    std::thread::sleep((per_batch * 10).max(Duration::from_millis(200)));
    let t1 = Instant::now();
    it.next().unwrap().unwrap();
    it.next().unwrap().unwrap();
    let waited = t1.elapsed();
    assert!(
        waited < per_batch / 2 + Duration::from_millis(5),
        "waited {waited:?}; one batch loads in {per_batch:?}"
    );
    // The third was only started when a slot freed up.
    assert_eq!(it.count(), nb - 3);
}
