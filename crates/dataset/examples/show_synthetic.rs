//! Writes a few synthetic training items (augmented, 257x257) with their boxes drawn, as PNGs.
//!
//! `cargo run -p retinanet-dataset --example show_synthetic -- OUT_DIR [N_TRAIN N_EVAL]`

use retinanet_dataset::synthetic::{self, SyntheticConfig};
use retinanet_dataset::{DetectionDataset, DetectionTransform, draw, loader::item_rng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "synthetic-preview".into()),
    );
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let cfg = SyntheticConfig {
        num_train: arg(2, 16),
        num_eval: arg(3, 4),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let p = synthetic::ensure_detection(&out.join("cache"), &cfg)?;
    println!(
        "detection data ready in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let t0 = std::time::Instant::now();
    let c = synthetic::ensure_classification(&out.join("cache"), &cfg)?;
    println!(
        "classification data ready in {:.2} s: {}",
        t0.elapsed().as_secs_f64(),
        c.train_root.display()
    );
    let ds = DetectionDataset::from_list(&p.train_list, &p.names_file, &p.image_root)?;
    let t = DetectionTransform::train(257, 25.0);
    for i in 0..8 {
        let item = ds.item(i, &t, &mut item_rng(0, 0, i))?;
        let mut img = item.to_rgb_image();
        let scores: Vec<f32> = item.labels.iter().map(|_| 0.99).collect();
        draw::draw_detections(
            &mut img,
            &item.boxes,
            &item.labels,
            Some(&scores),
            ds.class_names(),
        );
        draw::save_png(&img, &out.join(format!("item{i}.png")))?;
    }
    println!("wrote {}", out.display());
    Ok(())
}
