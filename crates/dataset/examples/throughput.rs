//! Training-item throughput: JPEGs of 500x375 (VOC-like) -> 641x641 training items.
//!
//! `cargo run --release -p retinanet-dataset --example throughput [-- N_IMAGES BATCH]`

use std::time::Instant;

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use retinanet_dataset::loader::item_rng;
use retinanet_dataset::{
    DetectionDataset, DetectionLoader, DetectionRecord, DetectionTransform, LoaderConfig,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let batch: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let dir = std::env::temp_dir().join(format!("retinanet-throughput-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Photo-like content: smooth gradients, blobs and noise, so the JPEGs have realistic entropy.
    let mut records = Vec::new();
    let mut bytes = 0u64;
    for i in 0..n {
        let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
        let (a, b): (f32, f32) = (rng.random_range(0.0..6.0), rng.random_range(0.0..6.0));
        let noise: f32 = 40.0;
        let img = RgbImage::from_fn(500, 375, |x, y| {
            let (xf, yf) = (x as f32 / 500.0, y as f32 / 375.0);
            let base = [
                128.0 + 100.0 * (a * xf + yf * 3.0).sin(),
                128.0 + 100.0 * (b * yf + xf * 2.0).cos(),
                128.0 + 80.0 * ((a + b) * (xf - yf)).sin(),
            ];
            Rgb(base.map(|v| (v + rng.random_range(-noise..noise)).clamp(0.0, 255.0) as u8))
        });
        let name = format!("{i:05}.jpg");
        img.save_with_format(dir.join(&name), image::ImageFormat::Jpeg)?;
        bytes += std::fs::metadata(dir.join(&name))?.len();
        records.push(DetectionRecord {
            name,
            boxes: vec![[50.0, 60.0, 300.0, 400.0], [10.0, 10.0, 100.0, 120.0]],
            labels: vec![1, 2],
        });
    }
    println!(
        "{n} JPEGs of 500x375, mean {:.0} KB",
        bytes as f64 / n as f64 / 1024.0
    );
    let ds = DetectionDataset::from_records(records, vec!["a".into(), "b".into()], &dir)?;
    let t = DetectionTransform::train(641, 25.0);

    // One thread, step by step.
    let m = n.min(64);
    let (mut dec, mut tr) = (0.0, 0.0);
    let mut buf = vec![0f32; 3 * 641 * 641];
    for i in 0..m {
        let t0 = Instant::now();
        let img = ds.load_image(i)?;
        let t1 = Instant::now();
        let r = ds.get(i);
        std::hint::black_box(t.apply_into(
            &img,
            &r.boxes,
            &r.labels,
            &mut item_rng(0, 0, i),
            &mut buf,
        ));
        let t2 = Instant::now();
        dec += (t1 - t0).as_secs_f64();
        tr += (t2 - t1).as_secs_f64();
    }
    let per = (dec + tr) / m as f64;
    println!(
        "one thread: decode {:.2} ms, crop+flip+resize+normalise {:.2} ms per item -> {:.0} items/s",
        1e3 * dec / m as f64,
        1e3 * tr / m as f64,
        1.0 / per
    );

    if std::env::var_os("TUNE_MALLOC").is_some() {
        println!(
            "tune_allocator: {}",
            retinanet_dataset::loader::tune_allocator()
        );
    }
    // The parallel loader, batches collated into tensors.
    let loader = DetectionLoader::new(ds, t, LoaderConfig::new(batch, 0))?;
    for b in loader.epoch(0) {
        b?; // warm-up: page cache, allocator
    }
    let c0 = cpu_seconds();
    let t0 = Instant::now();
    let epochs = 3;
    let mut items = 0;
    for e in 1..=epochs {
        for b in loader.epoch(e) {
            items += b?.indices.len();
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - c0;
    let threads = rayon::current_num_threads();
    println!(
        "loader ({threads} rayon threads, batch {batch}): {items} items in {dt:.2} s -> {:.0} items/s wall; \
         {:.2} CPU-ms per item -> {:.0} items/s on {threads} unshared cores",
        items as f64 / dt,
        1e3 * cpu / items as f64,
        threads as f64 * items as f64 / cpu
    );
    if std::env::var_os("SYNC_TOO").is_some() {
        let c0 = cpu_seconds();
        let t0 = Instant::now();
        let mut items = 0;
        for b in 0..loader.batches_per_epoch() {
            items += loader.batch(9, b)?.indices.len();
        }
        let (dt, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        println!(
            "synchronous batches: {:.0} items/s wall, {:.2} CPU-ms per item",
            items as f64 / dt,
            1e3 * cpu / items as f64
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// CPU time (user + system) of this process so far, from /proc (0 where unavailable).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses): utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}
