//! Timing of the evaluators on a synthetic set: 2,000 images x 100 detections x 20 classes.
//!
//! ```text
//! cargo run --release -p retinanet-eval --example bench [-- --images N --dets D --classes C --runs R --dump set.json]
//! ```
//!
//! `--dump` writes the set (the layout of `tests/fixtures/coco_*.json`, without results) so that
//! `scripts/check_large.py` can score it with pycocotools and the VOC reference.

use std::time::Instant;

use retinanet_eval::{CocoEvaluator, VocEvaluator};

/// SplitMix64: a small deterministic generator, enough for synthetic data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
}

struct Image {
    gt_boxes: Vec<[f32; 4]>,
    gt_labels: Vec<u32>,
    det_boxes: Vec<[f32; 4]>,
    det_labels: Vec<u32>,
    det_scores: Vec<f32>,
}

fn random_box(rng: &mut Rng) -> [f32; 4] {
    let h = rng.uniform(8.0, 250.0);
    let w = rng.uniform(8.0, 250.0);
    let y = rng.uniform(0.0, 480.0 - h);
    let x = rng.uniform(0.0, 640.0 - w);
    [y, x, y + h, x + w]
}

/// Each image: 1..=6 objects; 100 detections, about a third near an object (jittered, mostly
/// with its label), the rest anywhere with any label.
fn make_set(n_images: usize, n_dets: usize, n_classes: u32, seed: u64) -> Vec<Image> {
    let mut rng = Rng(seed);
    (0..n_images)
        .map(|_| {
            let n_gt = 1 + rng.below(6) as usize;
            let gt_boxes: Vec<[f32; 4]> = (0..n_gt).map(|_| random_box(&mut rng)).collect();
            let gt_labels: Vec<u32> = (0..n_gt).map(|_| 1 + rng.below(n_classes)).collect();
            let (mut det_boxes, mut det_labels, mut det_scores) =
                (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..n_dets {
                if rng.below(3) == 0 {
                    let g = rng.below(n_gt as u32) as usize;
                    let b = gt_boxes[g];
                    let s = 0.08 * (b[2] - b[0]).max(b[3] - b[1]);
                    let y0 = b[0] + rng.uniform(-s, s);
                    let x0 = b[1] + rng.uniform(-s, s);
                    det_boxes.push([
                        y0,
                        x0,
                        (b[2] + rng.uniform(-s, s)).max(y0),
                        (b[3] + rng.uniform(-s, s)).max(x0),
                    ]);
                    det_labels.push(if rng.below(5) == 0 {
                        1 + rng.below(n_classes)
                    } else {
                        gt_labels[g]
                    });
                    det_scores.push(rng.uniform(0.3, 1.0));
                } else {
                    det_boxes.push(random_box(&mut rng));
                    det_labels.push(1 + rng.below(n_classes));
                    det_scores.push(rng.uniform(0.0, 0.8));
                }
            }
            Image {
                gt_boxes,
                gt_labels,
                det_boxes,
                det_labels,
                det_scores,
            }
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} wants a number, got {v}"))
            })
            .unwrap_or(default)
    };
    let (n_images, n_dets, n_classes, runs) = (
        arg("--images", 2000),
        arg("--dets", 100),
        arg("--classes", 20),
        arg("--runs", 7),
    );
    let set = make_set(n_images, n_dets, n_classes as u32, 42);

    if let Some(i) = args.iter().position(|a| a == "--dump") {
        let path = args.get(i + 1).expect("--dump wants a path");
        let images: Vec<serde_json::Value> = set
            .iter()
            .enumerate()
            .map(|(i, im)| {
                serde_json::json!({"id": i + 1, "gt_boxes": im.gt_boxes, "gt_labels": im.gt_labels,
                    "det_boxes": im.det_boxes, "det_labels": im.det_labels, "det_scores": im.det_scores})
            })
            .collect();
        let fx = serde_json::json!({"num_classes": n_classes, "images": images});
        std::fs::write(path, serde_json::to_string(&fx).unwrap()).unwrap();
        eprintln!("wrote {path}");
    }

    println!(
        "{n_images} images x {n_dets} detections x {n_classes} classes, {} threads, median of {runs} runs",
        rayon::current_num_threads()
    );
    let mut voc_t = Vec::new();
    let mut coco_t = Vec::new();
    let (mut voc_fin, mut coco_fin) = (Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let mut voc = VocEvaluator::new(n_classes);
        for im in &set {
            voc.add_image(
                &im.gt_boxes,
                &im.gt_labels,
                None,
                &im.det_boxes,
                &im.det_labels,
                &im.det_scores,
            )
            .unwrap();
        }
        let tf = Instant::now();
        let v = voc.finish();
        voc_fin.push(tf.elapsed().as_secs_f64());
        voc_t.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut coco = CocoEvaluator::new(n_classes);
        for im in &set {
            coco.add_image(
                &im.gt_boxes,
                &im.gt_labels,
                None,
                &im.det_boxes,
                &im.det_labels,
                &im.det_scores,
            )
            .unwrap();
        }
        let tf = Instant::now();
        let c = coco.finish();
        coco_fin.push(tf.elapsed().as_secs_f64());
        coco_t.push(t.elapsed().as_secs_f64());
        last = Some((v, c));
    }
    let (v, c) = last.expect("at least one run");
    println!(
        "VOC  (add all images + finish): {:.4} s (finish {:.4} s)   mAP {:?}  mAP07 {:?}",
        median(voc_t),
        median(voc_fin),
        v.map.unwrap_or(f64::NAN),
        v.map_07.unwrap_or(f64::NAN)
    );
    println!(
        "COCO (add all images + finish): {:.4} s (finish {:.4} s)   stats {:?}",
        median(coco_t),
        median(coco_fin),
        c.stats.to_array()
    );
}
