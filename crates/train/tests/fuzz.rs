//! Property tests over arbitrary and mutated run configs and checkpoint files: reading them
//! never panics, and every refusal names the file. Each property tries `CASES` inputs; the
//! totals are printed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use clap::Parser;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use retinanet_train::checkpoint::{CheckpointMeta, FORMAT, save_checkpoint};
use retinanet_train::cli::RunArgs;
use retinanet_train::config::{DEFAULT_DETECTOR_TOML, DEFAULT_PRETRAIN_TOML, PretrainRunConfig};
use retinanet_train::{DetectorRunConfig, load_checkpoint, load_detector};

const CASES: u32 = 400;

/// Values a config key may be given by mistake.
const VALUES: &[&str] = &[
    "-1",
    "0",
    "1",
    "-0.0",
    "1e309",
    "-1e309",
    "nan",
    "inf",
    "3.5",
    "99999999999999999999",
    "\"\"",
    "\"x\"",
    "\"/\"",
    "[]",
    "[1]",
    "[1, 2]",
    "[2, 1]",
    "[0.5, 0.4]",
    "true",
    "{}",
    "\"cuda:99\"",
    "\"..\"",
    "4294967295",
    "18446744073709551615",
];

/// A config mutation: a key's value replaced, a line dropped or doubled, bytes inserted.
#[derive(Debug, Clone)]
enum Edit {
    Value(usize, usize),
    Drop(usize),
    Double(usize),
    Bytes(usize, Vec<u8>),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), 0..VALUES.len()).prop_map(|(l, v)| Edit::Value(l, v)),
        1 => any::<usize>().prop_map(Edit::Drop),
        1 => any::<usize>().prop_map(Edit::Double),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..6))
            .prop_map(|(p, b)| Edit::Bytes(p, b)),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> Vec<u8> {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut bytes = None;
    for e in edits {
        let n = lines.len().max(1);
        match e {
            Edit::Value(l, v) => {
                // Only `key = value` lines: their value is replaced.
                let keyed: Vec<usize> = (0..lines.len())
                    .filter(|&i| lines[i].contains(" = "))
                    .collect();
                if let Some(&i) = keyed.get(l % keyed.len().max(1)) {
                    let key = lines[i].split(" = ").next().unwrap_or("").to_string();
                    lines[i] = format!("{key} = {}", VALUES[*v]);
                }
            }
            Edit::Drop(l) => {
                if !lines.is_empty() {
                    lines.remove(l % n);
                }
            }
            Edit::Double(l) => {
                if !lines.is_empty() {
                    let x = lines[l % n].clone();
                    lines.insert(l % n, x);
                }
            }
            Edit::Bytes(p, b) => bytes = Some((*p, b.clone())),
        }
    }
    let mut out = lines.join("\n").into_bytes();
    if let Some((p, b)) = bytes {
        let i = p % (out.len() + 1);
        out.splice(i..i, b);
    }
    out
}

fn inputs(seed: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..200),
        4 => prop::collection::vec(edit(), 1..4).prop_map(move |e| apply(seed, &e)),
    ]
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    })
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// Loads `path` as the command line does; an error must name the file.
fn load<C: retinanet_train::cli::RunConfig>(path: &Path) -> Result<(), TestCaseError> {
    let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
    if let Err(e) = cli.run.load_config::<C>("") {
        let msg = format!("{e:#}");
        prop_assert!(
            msg.contains("fuzzed.toml"),
            "the error does not name the file: {msg}"
        );
    }
    Ok(())
}

#[test]
fn run_configs_never_panic_and_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzzed.toml");
    let tried = std::cell::Cell::new(0usize);
    for (seed, detector) in [
        (DEFAULT_DETECTOR_TOML, true),
        (DEFAULT_PRETRAIN_TOML, false),
    ] {
        runner()
            .run(&inputs(seed), |bytes| {
                tried.set(tried.get() + 1);
                std::fs::write(&path, &bytes).unwrap();
                if detector {
                    load::<DetectorRunConfig>(&path)
                } else {
                    load::<PretrainRunConfig>(&path)
                }
            })
            .unwrap();
    }
    eprintln!("fuzz: {} configs tried", tried.get());
}

fn small_checkpoint(path: &Path) -> Vec<u8> {
    let t: HashMap<String, Tensor> = [(
        "w".to_string(),
        Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap(),
    )]
    .into();
    let meta = CheckpointMeta {
        format: FORMAT.into(),
        kind: "detector".into(),
        step: 3,
        epoch: 0,
        batch_in_epoch: 3,
        seed: 1,
        config: DEFAULT_DETECTOR_TOML.into(),
        class_names: vec!["a".into(), "b".into()],
        extra: serde_json::json!({"elapsed_s": 1.5, "progress_decays": [2]}),
        checksum: None,
    };
    save_checkpoint(path, &t, &meta).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn checkpoint_files_never_panic_and_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzzed.safetensors");
    let good = small_checkpoint(&path);
    let tried = std::cell::Cell::new(0usize);
    // Byte-level damage anywhere in the file (header, metadata, data).
    let damage = prop::collection::vec((any::<usize>(), any::<u8>(), any::<bool>()), 1..5);
    runner()
        .run(&damage, |edits| {
            tried.set(tried.get() + 1);
            let mut b = good.clone();
            for (p, v, cut) in edits {
                if cut {
                    b.truncate(p % (b.len() + 1));
                } else if !b.is_empty() {
                    let i = p % b.len();
                    b[i] = v;
                }
            }
            std::fs::write(&path, &b).unwrap();
            for r in [
                load_checkpoint(&path, &Device::Cpu).map(|_| ()),
                load_detector(&path, &Device::Cpu).map(|_| ()),
            ] {
                if let Err(e) = r {
                    let msg = format!("{e:#}");
                    prop_assert!(msg.contains("fuzzed.safetensors"), "{msg}");
                }
            }
            Ok(())
        })
        .unwrap();
    // Well-formed files whose metadata record is mutated JSON.
    let meta_text = {
        let (_, h) = safetensors::SafeTensors::read_metadata(&good).unwrap();
        h.metadata().as_ref().unwrap()["retinanet"].clone()
    };
    let meta_text: &'static str = Box::leak(meta_text.into_boxed_str());
    runner()
        .run(&inputs(meta_text), |bytes| {
            tried.set(tried.get() + 1);
            let t: HashMap<String, Tensor> = [(
                "w".to_string(),
                Tensor::zeros(8, candle_core::DType::F32, &Device::Cpu).unwrap(),
            )]
            .into();
            let info: HashMap<String, String> = [(
                "retinanet".to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            )]
            .into();
            let file =
                safetensors::serialize(t.iter().map(|(k, v)| (k.as_str(), v)), Some(info)).unwrap();
            std::fs::write(&path, file).unwrap();
            if let Err(e) = load_detector(&path, &Device::Cpu) {
                let msg = format!("{e:#}");
                prop_assert!(msg.contains("fuzzed.safetensors"), "{msg}");
            }
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz: {} checkpoint files tried", tried.get());
}
