//! Property tests over arbitrary and mutated user files (list, names, VOC split and XML, COCO
//! JSON): the readers never panic, and every error names the file at fault. Each property
//! tries `CASES` inputs (a third arbitrary bytes, the rest mutations of a valid file); the
//! total is printed.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use retinanet_dataset::{DetectionDataset, OpenOptions, read_names};

const CASES: u32 = 500;
static TRIED: AtomicUsize = AtomicUsize::new(0);

/// Fragments that parsers of these formats treat specially.
const TOKENS: &[&str] = &[
    " ",
    "\n",
    "\r\n",
    "\r",
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
    "-0",
    "99999999999999999999",
    "3.5",
    "1e-45",
    "é",
    "\u{202e}",
    "..",
    "/",
    "\\",
    "<",
    ">",
    "</",
    "<object>",
    "</object>",
    "<name>",
    "</name>",
    "<bndbox>",
    "<difficult>1",
    "<![CDATA[",
    "&amp;",
    "&#0;",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "null",
    "true",
    "\"id\"",
    "\"bbox\"",
    "\"images\"",
    "\"categories\"",
    "18446744073709551616",
    "-5e-324",
];

#[derive(Debug, Clone)]
enum Mutation {
    Insert(usize, Vec<u8>),
    Token(usize, usize),
    Delete(usize, usize),
    Replace(usize, u8),
    Truncate(usize),
    DuplicateLine(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..4))
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(p, t)| Mutation::Token(p, t)),
        (any::<usize>(), 1..12usize).prop_map(|(p, n)| Mutation::Delete(p, n)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Replace(p, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        any::<usize>().prop_map(Mutation::DuplicateLine),
    ]
}

fn apply(seed: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for m in muts {
        let at = |p: usize, v: &Vec<u8>| p % (v.len() + 1);
        match m {
            Mutation::Insert(p, b) => {
                let i = at(*p, &v);
                v.splice(i..i, b.iter().copied());
            }
            Mutation::Token(p, t) => {
                let i = at(*p, &v);
                v.splice(i..i, TOKENS[*t].bytes());
            }
            Mutation::Delete(p, n) => {
                let i = at(*p, &v);
                let j = (i + n).min(v.len());
                v.drain(i..j);
            }
            Mutation::Replace(p, b) => {
                if !v.is_empty() {
                    let i = p % v.len();
                    v[i] = *b;
                }
            }
            Mutation::Truncate(p) => {
                let i = at(*p, &v);
                v.truncate(i);
            }
            Mutation::DuplicateLine(p) => {
                let lines: Vec<&[u8]> = v.split(|&b| b == b'\n').collect();
                let k = p % lines.len();
                let mut out = Vec::new();
                for (i, l) in lines.iter().enumerate() {
                    out.extend_from_slice(l);
                    out.push(b'\n');
                    if i == k {
                        out.extend_from_slice(l);
                        out.push(b'\n');
                    }
                }
                v = out;
            }
        }
    }
    v
}

/// A third arbitrary bytes, the rest mutations of `seed`.
fn inputs(seed: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..300),
        2 => prop::collection::vec(mutation(), 1..6).prop_map(move |m| apply(seed, &m)),
    ]
}

/// Runs `check` on `CASES` inputs derived from `seed`.
fn fuzz(seed: &'static [u8], check: impl Fn(&[u8]) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&inputs(seed), |bytes| {
            TRIED.fetch_add(1, Ordering::Relaxed);
            check(&bytes)
        })
        .unwrap();
    eprintln!(
        "fuzz: {} inputs tried so far in this binary",
        TRIED.load(Ordering::Relaxed)
    );
}

/// Either fine, or an error whose message names one of `files`.
fn names_a_file<T>(
    r: Result<T, retinanet_dataset::DatasetError>,
    files: &[&Path],
) -> Result<(), TestCaseError> {
    if let Err(e) = r {
        let msg = e.to_string();
        prop_assert!(
            files.iter().any(|f| msg.contains(&*f.to_string_lossy())),
            "the error names none of {files:?}: {msg}"
        );
    }
    Ok(())
}

const LIST: &[u8] = b"a.jpg 1 2 30 40 2 5.5 6 7 8 1\nb.jpg\n\nsub/c.jpg 0 0 9 9 3 1 1 2 2 1\n";
const NAMES: &[u8] = b"cat\ndog\nbird\n";

fn list_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for n in ["a.jpg", "b.jpg", "sub/c.jpg"] {
        let p = dir.path().join(n);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }
    dir
}

#[test]
fn list_files() {
    let dir = list_dir();
    let (list, names) = (
        dir.path().join("fuzzed-list.txt"),
        dir.path().join("names.txt"),
    );
    std::fs::write(&names, NAMES).unwrap();
    let model = OpenOptions {
        classes: Some(vec!["dog".into(), "cat".into()]),
        skip_missing: false,
    };
    fuzz(LIST, |bytes| {
        std::fs::write(&list, bytes).unwrap();
        names_a_file(
            DetectionDataset::from_list(&list, &names, dir.path()),
            &[&list],
        )?;
        names_a_file(
            DetectionDataset::open_list(&list, &names, dir.path(), &model),
            &[&list],
        )
    });
}

#[test]
fn names_files() {
    let dir = list_dir();
    let (list, names) = (
        dir.path().join("list.txt"),
        dir.path().join("fuzzed-names.txt"),
    );
    std::fs::write(&list, LIST).unwrap();
    fuzz(NAMES, |bytes| {
        std::fs::write(&names, bytes).unwrap();
        names_a_file(read_names(&names), &[&names])?;
        names_a_file(
            DetectionDataset::from_list(&list, &names, dir.path()),
            &[&names],
        )
    });
}

const XML: &[u8] = b"<?xml version=\"1.0\"?>\n<annotation><filename>x.jpg</filename>\
<object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>21</ymin>\
<xmax>60</xmax><ymax>80</ymax></bndbox></object>\n<object><name>cat</name><bndbox>\
<xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>\n";

fn voc_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for d in ["Annotations", "ImageSets/Main", "JPEGImages"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::write(r.join("ImageSets/Main/val.txt"), "x\n").unwrap();
    std::fs::write(r.join("JPEGImages/x.jpg"), b"").unwrap();
    std::fs::write(r.join("Annotations/x.xml"), XML).unwrap();
    dir
}

#[test]
fn voc_xml() {
    let dir = voc_dir();
    let root = dir.path();
    let xml = root.join("Annotations/x.xml");
    let model = OpenOptions {
        classes: Some(vec!["dog".into(), "cat".into()]),
        skip_missing: true,
    };
    fuzz(XML, |bytes| {
        std::fs::write(&xml, bytes).unwrap();
        names_a_file(DetectionDataset::from_voc(root, "val"), &[&xml])?;
        names_a_file(DetectionDataset::open_voc(root, &["val"], &model), &[&xml])
    });
}

#[test]
fn voc_split_files() {
    let dir = voc_dir();
    let root = dir.path();
    let split = root.join("ImageSets/Main/val.txt");
    let ann = root.join("Annotations");
    fuzz(b"x\nx\n", |bytes| {
        std::fs::write(&split, bytes).unwrap();
        // An unknown id is reported against its XML, which the split file names.
        names_a_file(DetectionDataset::from_voc(root, "val"), &[&split, &ann])
    });
}

const COCO: &[u8] = br#"{"images": [{"id": 10, "file_name": "x.jpg", "width": 100},
 {"id": 11, "file_name": "y.jpg"}],
"annotations": [{"id": 1, "image_id": 10, "bbox": [10.0, 20.0, 30.0, 40.0], "category_id": 3, "iscrowd": 0},
 {"id": 2, "image_id": 11, "bbox": [0, 0, 5, 5], "category_id": 1, "iscrowd": 1}],
"categories": [{"id": 3, "name": "zebra"}, {"id": 1, "name": "person"}]}
"#;

#[test]
fn coco_json() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["x.jpg", "y.jpg"] {
        std::fs::write(dir.path().join(n), b"").unwrap();
    }
    let json = dir.path().join("fuzzed-instances.json");
    let model = OpenOptions {
        classes: Some(vec!["person".into(), "zebra".into()]),
        skip_missing: false,
    };
    fuzz(COCO, |bytes| {
        std::fs::write(&json, bytes).unwrap();
        names_a_file(DetectionDataset::from_coco(&json, dir.path()), &[&json])?;
        names_a_file(
            DetectionDataset::open_coco(&[(&json, dir.path())], &model),
            &[&json],
        )
    });
}
