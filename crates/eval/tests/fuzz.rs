//! Property tests over arbitrary and mutated `evaluate --detections` inputs (detections file,
//! ground truth as JSON lines or list file, names file): no panic, and every error names the
//! file at fault. Each property tries `CASES` inputs (a third arbitrary bytes, the rest
//! mutations of a valid file); the total is printed.

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use retinanet_eval::io::{DetectionsReader, evaluate_files, read_ground_truth, read_names};
use retinanet_eval::{EvalError, Evaluator};

const CASES: u32 = 500;

/// Fragments that these parsers treat specially.
const TOKENS: &[&str] = &[
    " ",
    "\n",
    "\r\n",
    "\t",
    "\u{feff}",
    "\0",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e39",
    "3e38",
    "-3e38",
    "1e-45",
    "99999999999999999999",
    "4294967296",
    "3.5",
    "é",
    "{",
    "}",
    "[",
    "]",
    "[[",
    "]]",
    ",",
    ":",
    "\"",
    "null",
    "true",
    "false",
    "\"image\"",
    "\"boxes\"",
    "\"labels\"",
    "\"scores\"",
    "\"difficult\"",
    "\"crowd\"",
    "\"areas\"",
    "a.jpg",
    "b.jpg",
];

/// Runs `check` on `CASES` inputs derived from `seed` (shared engine: retinanet-testkit).
fn fuzz(seed: &'static [u8], check: impl Fn(&[u8]) -> Result<(), TestCaseError>) {
    retinanet_testkit::fuzz::run(seed, TOKENS, CASES, check);
}

fn names_a_file<T>(r: Result<T, EvalError>, files: &[&Path]) -> Result<(), TestCaseError> {
    if let Err(e) = r {
        let msg = e.to_string();
        prop_assert!(
            files.iter().any(|f| msg.contains(&*f.to_string_lossy())),
            "the error names none of {files:?}: {msg}"
        );
    }
    Ok(())
}

const DET: &[u8] = br#"{"image": "a.jpg", "boxes": [[0, 0, 10, 10], [20, 20, 40, 40]], "labels": [1, 2], "scores": [0.9, 0.4]}

{"image": "b.jpg", "boxes": [[5, 5, 9, 9]], "labels": [2], "scores": [0.3]}
"#;
const GT_JSON: &[u8] = br#"{"image": "a.jpg", "boxes": [[0, 0, 10, 10], [20, 20, 40, 40]], "labels": [1, 2], "crowd": [false, true], "areas": [100, 400]}
{"image": "b.jpg", "boxes": [[5, 5, 9, 9]], "labels": [1], "difficult": [true]}
"#;
const GT_LIST: &[u8] = b"a.jpg 0 0 10 10 1 20 20 40 40 2\n\nb.jpg 5 5 9 9 1\nc.jpg\n";

/// Scores the fuzzed file against the other (valid) one: what `evaluate --detections` does.
fn score(gt: &Path, det: &Path) -> Result<(), EvalError> {
    let mut ev = Evaluator::new(vec!["cat".into(), "dog".into()]);
    evaluate_files(gt, det, &mut ev)?;
    ev.finish().to_json();
    Ok(())
}

#[test]
fn detections_files() {
    let dir = tempfile::tempdir().unwrap();
    let (gt, det) = (
        dir.path().join("gt.jsonl"),
        dir.path().join("fuzzed-det.jsonl"),
    );
    std::fs::write(&gt, GT_JSON).unwrap();
    fuzz(DET, |bytes| {
        std::fs::write(&det, bytes).unwrap();
        for r in DetectionsReader::open(&det).unwrap() {
            names_a_file(r, &[&det])?;
        }
        names_a_file(score(&gt, &det), &[&det])
    });
}

#[test]
fn ground_truth_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (gt, det) = (
        dir.path().join("fuzzed-gt.jsonl"),
        dir.path().join("det.jsonl"),
    );
    std::fs::write(&det, DET).unwrap();
    fuzz(GT_JSON, |bytes| {
        std::fs::write(&gt, bytes).unwrap();
        names_a_file(read_ground_truth(&gt), &[&gt])?;
        // A detection for an image the fuzzed ground truth lost is the detections file's line.
        names_a_file(score(&gt, &det), &[&gt, &det])
    });
}

#[test]
fn ground_truth_list_files() {
    let dir = tempfile::tempdir().unwrap();
    let (gt, det) = (
        dir.path().join("fuzzed-gt.txt"),
        dir.path().join("det.jsonl"),
    );
    std::fs::write(&det, DET).unwrap();
    fuzz(GT_LIST, |bytes| {
        std::fs::write(&gt, bytes).unwrap();
        names_a_file(read_ground_truth(&gt), &[&gt])?;
        names_a_file(score(&gt, &det), &[&gt, &det])
    });
}

#[test]
fn names_files() {
    let dir = tempfile::tempdir().unwrap();
    let names = dir.path().join("fuzzed-names.txt");
    fuzz(b"cat\ndog\n", |bytes| {
        std::fs::write(&names, bytes).unwrap();
        names_a_file(read_names(&names), &[&names])
    });
}
