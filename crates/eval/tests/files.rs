//! The files of `evaluate --detections`: byte-order marks and CRLF are accepted in every one,
//! bad boxes in the ground truth are refused with file and line, names files are checked.

use std::path::Path;

use retinanet_eval::io::{DetectionsReader, evaluate_files, read_ground_truth, read_names};
use retinanet_eval::{EvalError, Evaluator};

fn write(dir: &Path, name: &str, lines: &[&str], bom: bool, eol: &str) -> std::path::PathBuf {
    let mut s = if bom {
        "\u{feff}".to_string()
    } else {
        String::new()
    };
    for l in lines {
        s.push_str(l);
        s.push_str(eol);
    }
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p
}

const DET: &[&str] = &[
    r#"{"image": "a.jpg", "boxes": [[0, 0, 10, 10], [20, 20, 40, 40]], "labels": [1, 2], "scores": [0.9, 0.4]}"#,
    "",
    r#"{"image": "b.jpg", "boxes": [[5, 5, 9, 9]], "labels": [2], "scores": [0.3]}"#,
];

#[test]
fn bom_and_crlf_are_accepted_in_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let gt_list = ["a.jpg 0 0 10 10 1 20 20 40 40 2", "", "b.jpg 5 5 9 9 1"];
    let gt_json = [
        r#"{"image": "a.jpg", "boxes": [[0, 0, 10, 10], [20, 20, 40, 40]], "labels": [1, 2]}"#,
        r#"{"image": "b.jpg", "boxes": [[5, 5, 9, 9]], "labels": [1], "difficult": [false]}"#,
    ];
    let mut reference: Option<String> = None;
    for bom in [false, true] {
        for eol in ["\n", "\r\n"] {
            let names = write(d, "names.txt", &["cat", "", "dog"], bom, eol);
            assert_eq!(
                read_names(&names).unwrap(),
                ["cat", "dog"],
                "bom {bom} {eol:?}"
            );
            let det = write(d, "det.jsonl", DET, bom, eol);
            assert_eq!(DetectionsReader::open(&det).unwrap().count(), 2);
            for gt_lines in [&gt_list[..], &gt_json[..]] {
                let gt = write(d, "gt.txt", gt_lines, bom, eol);
                let g = read_ground_truth(&gt).unwrap();
                assert_eq!(g[0].1.image, "a.jpg", "bom {bom} {eol:?}");
                let mut ev = Evaluator::new(read_names(&names).unwrap());
                evaluate_files(&gt, &det, &mut ev)
                    .unwrap_or_else(|e| panic!("bom {bom} {eol:?}: {e}"));
                let table = ev.finish().to_table();
                match &reference {
                    None => reference = Some(table),
                    Some(r) => assert_eq!(&table, r, "bom {bom} {eol:?}"),
                }
            }
        }
    }
}

#[test]
fn inverted_and_non_finite_ground_truth_is_refused_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let det = write(d, "det.jsonl", &[], false, "\n");
    let bad = [
        "9 0 1 10",
        "0 9 10 1",
        "NaN 0 10 10",
        "0 nan 10 10",
        "0 0 inf 10",
        "0 0 10 -inf",
    ];
    let mut cases = 0;
    for b in bad {
        for line in 1..=3 {
            let mut lines = vec!["a.jpg 0 0 10 10 1", "b.jpg", "c.jpg 1 1 5 5 2"];
            let text = format!("x.jpg 0 0 4 4 1 {b} 2");
            lines[line - 1] = &text;
            let gt = write(d, "gt.txt", &lines, true, "\r\n");
            let e = evaluate_files(&gt, &det, &mut Evaluator::new(vec!["a".into(), "b".into()]))
                .unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(&e, EvalError::Record { line: l, .. } if *l == line),
                "{b} on line {line}: {msg}"
            );
            assert!(
                msg.contains(&format!("gt.txt:{line}")) && msg.contains("box 1"),
                "{msg}"
            );
            cases += 1;
        }
    }
    assert_eq!(cases, 18);
}

#[test]
fn names_files_without_names_or_with_a_name_twice_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (lines, want) in [
        (&["", "  "][..], "names.txt: no class name"),
        (
            &["cat", "dog", " cat "][..],
            "names.txt:3: class name \"cat\" is already on line 1",
        ),
    ] {
        let p = write(d, "names.txt", lines, false, "\n");
        let e = read_names(&p).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let p = write(d, "names.txt", &[], true, "\n");
    assert!(
        read_names(&p)
            .unwrap_err()
            .to_string()
            .contains("no class name")
    );
}
