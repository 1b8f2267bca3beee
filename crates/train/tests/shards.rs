//! Data-parallel loading: every rank draws the same epoch order and takes its share of each
//! global batch, so the shards of an epoch are disjoint, cover it exactly, and in rank order
//! are the batches one loader with the whole batch makes.

use retinanet_dataset::annotations::DetectionRecord;
use retinanet_dataset::{DetectionDataset, DetectionLoader, DetectionTransform, LoaderConfig};

fn dataset(n: usize) -> DetectionDataset {
    let records = (0..n)
        .map(|i| DetectionRecord {
            name: format!("{i}.png"),
            boxes: vec![],
            labels: vec![],
        })
        .collect();
    DetectionDataset::from_records(records, vec!["a".into()], "nowhere").unwrap()
}

fn loader(n: usize, batch: usize, rank: usize, ranks: usize, drop_last: bool) -> DetectionLoader {
    let cfg = LoaderConfig {
        drop_last,
        shard_rank: rank,
        shard_count: ranks,
        ..LoaderConfig::new(batch, 11)
    };
    DetectionLoader::new(dataset(n), DetectionTransform::train(33, 0.0), cfg).unwrap()
}

#[test]
fn shards_of_every_batch_are_disjoint_cover_it_and_keep_its_order() {
    for (n, batch, ranks) in [(24, 4, 2), (50, 6, 3), (17, 8, 4), (9, 9, 1), (40, 8, 8)] {
        let whole = loader(n, batch, 0, 1, true);
        for epoch in 0..3 {
            let mut seen = Vec::new();
            for b in 0..whole.batches_per_epoch() {
                let mut joined = Vec::new();
                for r in 0..ranks {
                    let share = loader(n, batch, r, ranks, true).batch_indices(epoch, b);
                    assert_eq!(share.len(), batch / ranks, "n {n} batch {batch} rank {r}");
                    joined.extend(share);
                }
                assert_eq!(
                    joined,
                    whole.batch_indices(epoch, b),
                    "epoch {epoch} batch {b}"
                );
                seen.extend(joined);
            }
            let mut sorted = seen.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), seen.len(), "no item twice in an epoch");
            assert_eq!(seen.len(), whole.batches_per_epoch() * batch);
        }
    }
    // Without drop_last the incomplete last batch is split as evenly as it goes.
    let sizes: Vec<usize> = (0..3)
        .map(|r| loader(10, 4, r, 3, false).batch_indices(0, 2).len())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 2);
}

#[test]
fn impossible_shards_are_refused_by_name() {
    let cfg = |rank, count, batch| LoaderConfig {
        drop_last: true,
        shard_rank: rank,
        shard_count: count,
        ..LoaderConfig::new(batch, 0)
    };
    let e = DetectionLoader::new(dataset(8), DetectionTransform::train(33, 0.0), cfg(0, 3, 4))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("batch size 4") && e.contains("3 shards"), "{e}");
    let e = DetectionLoader::new(dataset(8), DetectionTransform::train(33, 0.0), cfg(2, 2, 4))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("shard 2 of 2"), "{e}");
}
