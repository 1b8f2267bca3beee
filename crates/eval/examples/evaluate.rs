//! Scores a detections file (JSON lines) against ground truth (JSON lines or the tutorial's list
//! file) and prints the per-class table; the body of the workspace's `evaluate` binary.
//!
//! ```text
//! cargo run --release -p retinanet-eval --example evaluate -- \
//!     --gt test.txt --dets dets.jsonl (--names names.txt | --classes C) [--json report.json] [--voc-only] [--iou 0.5]
//! ```

use retinanet_eval::Evaluator;
use retinanet_eval::io::{evaluate_files, read_names};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let gt = get("--gt").ok_or("--gt PATH is required")?;
    let dets = get("--dets").ok_or("--dets PATH is required")?;
    let names = match (get("--names"), get("--classes")) {
        (Some(p), _) => read_names(p)?,
        (None, Some(c)) => (1..=c.parse::<usize>()?)
            .map(|i| format!("class{i}"))
            .collect(),
        (None, None) => return Err("--names PATH or --classes C is required".into()),
    };
    let iou = get("--iou")
        .map(|v| v.parse::<f64>())
        .transpose()?
        .unwrap_or(0.5);
    let mut ev = Evaluator::with_options(names, iou, !args.iter().any(|a| a == "--voc-only"));
    evaluate_files(&gt, &dets, &mut ev)?;
    let report = ev.finish();
    print!("{}", report.to_table());
    if let Some(path) = get("--json") {
        std::fs::write(&path, report.to_json()).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}
