//! `cargo bench -p retinanet-encoder`: encode 16 images of 641x641 (26,412 anchors) with 20
//! boxes each, and NMS of 2,000 random boxes at 0.5.

use criterion::{Criterion, criterion_group, criterion_main};
use rand::{Rng, SeedableRng, rngs::StdRng};
use retinanet_encoder::{Bbox, Encoder, EncoderConfig, NmsMode, box_nms};
use std::hint::black_box;

fn random_boxes(rng: &mut StdRng, n: usize, size: f32, smin: f32, smax: f32) -> Vec<Bbox> {
    (0..n)
        .map(|_| {
            let h = rng.random_range(smin..smax);
            let w = rng.random_range(smin..smax);
            let y = rng.random_range(0.0..size - h);
            let x = rng.random_range(0.0..size - w);
            [y, x, y + h, x + w]
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let enc = Encoder::new(EncoderConfig {
        train_size: (641, 641),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(enc.num_anchors(), 26_412);
    let boxes: Vec<Vec<Bbox>> = (0..16)
        .map(|_| random_boxes(&mut rng, 20, 641.0, 12.0, 320.0))
        .collect();
    let labels: Vec<Vec<u32>> = (0..16)
        .map(|_| (0..20).map(|_| rng.random_range(1..=20)).collect())
        .collect();
    c.bench_function("encode 16x641x641, 20 boxes", |b| {
        b.iter(|| enc.encode(black_box(&labels), black_box(&boxes)).unwrap())
    });

    let nb = random_boxes(&mut rng, 2000, 600.0, 16.0, 160.0);
    let ns: Vec<f32> = (0..2000).map(|_| rng.random::<f32>()).collect();
    let kept = box_nms(&nb, &ns, 0.5, NmsMode::Union).len();
    println!("nms keeps {kept} of 2000");
    c.bench_function("nms 2000 boxes @0.5", |b| {
        b.iter(|| box_nms(black_box(&nb), black_box(&ns), 0.5, NmsMode::Union))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
