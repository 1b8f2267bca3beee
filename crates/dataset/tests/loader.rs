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

/// Multi-scale training: each batch has one size drawn from `(seed, epoch, batch)` alone — the
/// same for any loader, prefetch, resume point or shard — and its boxes are made at that size.
#[test]
fn multi_scale_batches_are_a_function_of_seed_epoch_and_batch() {
    use retinanet_dataset::batch_scale;
    let dir = tempfile::tempdir().unwrap();
    let ds = list_dataset(dir.path(), 12);
    let sizes = vec![33, 49, 65];
    let cfg = LoaderConfig {
        drop_last: true,
        ..LoaderConfig::new(2, 7)
    };
    let t = DetectionTransform::train(65, 0.0);
    let a = DetectionLoader::multi_scale(ds.clone(), t, sizes.clone(), cfg).unwrap();
    let b = DetectionLoader::multi_scale(
        ds.clone(),
        t,
        sizes.clone(),
        LoaderConfig { prefetch: 0, ..cfg },
    )
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for epoch in 0..3 {
        let xa: Vec<_> = a.epoch(epoch).map(|r| r.unwrap()).collect();
        let xb: Vec<_> = b.epoch(epoch).map(|r| r.unwrap()).collect();
        assert_eq!(xa.len(), 6);
        for (x, y) in xa.iter().zip(&xb) {
            assert!(same(x, y));
            let s = x.images.dims()[2];
            assert_eq!(x.images.dims()[3], s);
            assert_eq!(s as u32, batch_scale(&sizes, 65, 7, epoch, x.batch));
            assert!(x.sizes.iter().all(|&z| z == (s, s)));
            for bb in x.boxes.iter().flatten() {
                assert!(
                    bb[2] <= s as f32 - 1.0 && bb[3] <= s as f32 - 1.0,
                    "{bb:?} at {s}"
                );
            }
            seen.insert(s);
        }
        // Resumed mid-epoch: the same sizes and pixels.
        let r: Vec<_> = a.epoch_from(epoch, 4).map(|r| r.unwrap()).collect();
        assert!(same(&r[0], &xa[4]) && same(&r[1], &xa[5]));
        // Two shards of one batch: one size, the items split.
        let halves: Vec<_> = (0..2)
            .map(|rank| {
                let c = LoaderConfig {
                    shard_rank: rank,
                    shard_count: 2,
                    ..cfg
                };
                DetectionLoader::multi_scale(ds.clone(), t, sizes.clone(), c)
                    .unwrap()
                    .batch(epoch, 3)
                    .unwrap()
            })
            .collect();
        assert_eq!(halves[0].images.dims(), halves[1].images.dims());
        assert_eq!(halves[0].images.dims()[2], xa[3].images.dims()[2]);
        assert_eq!(
            [halves[0].indices[0], halves[1].indices[0]],
            xa[3].indices[..]
        );
    }
    assert_eq!(seen.len(), 3, "every size is drawn: {seen:?}");
    // The draw is the pure function: fixed values for this seed.
    let draws: Vec<u32> = (0..8).map(|k| batch_scale(&sizes, 65, 7, 0, k)).collect();
    assert_eq!(
        draws,
        (0..8)
            .map(|k| batch_scale(&sizes, 65, 7, 0, k))
            .collect::<Vec<_>>()
    );
    assert_ne!(
        draws,
        (0..8)
            .map(|k| batch_scale(&sizes, 65, 8, 0, k))
            .collect::<Vec<_>>()
    );
    assert_eq!(batch_scale(&[], 65, 7, 0, 3), 65);
    assert!(
        DetectionLoader::multi_scale(ds, DetectionTransform::eval(65, 0.0), sizes, cfg).is_err()
    );
}

/// Whole-image evaluation batches images of different sizes on one canvas: each at the
/// top-left with its own size recorded, pixels equal to the item alone, zeros around it.
#[test]
fn whole_image_batches_keep_each_image_at_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let ds = list_dataset(dir.path(), 5);
    let t = DetectionTransform::whole(40, 1000, 0.0);
    let cfg = LoaderConfig {
        shuffle: false,
        ..LoaderConfig::new(5, 0)
    };
    let loader = DetectionLoader::new(ds.clone(), t, cfg).unwrap();
    let b = loader.batch(0, 0).unwrap();
    let (ch, cw) = (b.images.dims()[2], b.images.dims()[3]);
    for (k, &i) in b.indices.iter().enumerate() {
        let img = ds.load_image(i).unwrap();
        assert_eq!(
            b.source_sizes[k],
            (img.height() as usize, img.width() as usize)
        );
        let (h, w) = t.output_size(img.width(), img.height());
        assert_eq!(b.sizes[k], (h, w));
        assert_eq!(h.min(w), 40);
        let r = ds.get(i);
        let mut alone = vec![0f32; 3 * h * w];
        let (boxes, _) = t.apply_into(&img, &r.boxes, &r.labels, &mut item_rng0(), &mut alone);
        assert_eq!(b.boxes[k], boxes);
        let canvas: Vec<f32> = b
            .images
            .get(k)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for c in 0..3 {
            for y in 0..ch {
                for x in 0..cw {
                    let v = canvas[(c * ch + y) * cw + x];
                    if y < h && x < w {
                        assert_eq!(v, alone[(c * h + y) * w + x]);
                    } else {
                        assert_eq!(v, 0.0);
                    }
                }
            }
        }
    }
    assert_eq!(ch, b.sizes.iter().map(|s| s.0).max().unwrap());
    assert_eq!(cw, b.sizes.iter().map(|s| s.1).max().unwrap());
    assert!(
        b.sizes.iter().any(|&s| s != (ch, cw)),
        "the images differ in size"
    );
}

fn item_rng0() -> rand::rngs::StdRng {
    retinanet_dataset::loader::item_rng(0, 0, 0)
}
