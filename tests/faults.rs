//! Faults a long training run meets, on tiny configs: unreadable and missing images with
//! `skip_bad_images` (each named once, the run goes on), a divergence (the message names a
//! checkpoint only if one exists and is good), damaged checkpoints (refused by name), the
//! leftovers of interrupted writes (removed) and refused starts (no run folder left behind).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use retinanet_integration_tests::{quiet, tiny_detector_toml};
use retinanet_train::checkpoint::{CheckpointMeta, FORMAT, save_checkpoint};
use retinanet_train::config::DetectorRunConfig;
use retinanet_train::{RunOptions, load_checkpoint, parse_config, train_detector};

fn config(cache: &Path, name: &str, epochs: usize) -> DetectorRunConfig {
    parse_config(&tiny_detector_toml(cache, name, "cpu", "", epochs, "[]")).unwrap()
}

/// The synthetic data of `cache` (made on first use) and its training images, in list order.
fn training_images(cache: &Path) -> Vec<PathBuf> {
    let cfg = config(cache, "x", 1);
    retinanet_train::data::open_detection(&cfg.data.source).unwrap();
    let root = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    std::fs::read_to_string(root.join("train.txt"))
        .unwrap()
        .lines()
        .map(|l| {
            root.join("images")
                .join(l.split_whitespace().next().unwrap())
        })
        .collect()
}

fn log_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn skipped_images_are_named_once_each_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let images = training_images(&cache);
    // One image cut short, one not an image at all, one missing.
    let bytes = std::fs::read(&images[3]).unwrap();
    std::fs::write(&images[3], &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(&images[7], b"not an image").unwrap();
    std::fs::remove_file(&images[11]).unwrap();
    let bad: Vec<String> = [3, 7, 11]
        .iter()
        .map(|&i| images[i].display().to_string())
        .collect();

    // Without skip_bad_images the start is refused, naming the missing file.
    let strict = config(&cache, "strict", 3);
    let e = format!("{:#}", train_detector(&strict, &quiet(&runs)).unwrap_err());
    assert!(e.contains("00011"), "{e}");
    assert!(
        !runs.join("strict").exists(),
        "a refused start leaves no run folder"
    );

    let mut cfg = config(&cache, "skip", 3);
    cfg.data.skip_bad_images = true;
    let s = train_detector(&cfg, &quiet(&runs)).unwrap();
    assert!(!s.stopped_early);
    // 21 readable images in batches of 4: every epoch has batches to train on.
    assert!(s.steps >= 3 * 5, "{}", s.steps);
    let named: Vec<String> = log_lines(&s.run.root)
        .iter()
        .flat_map(|r| {
            r["skipped"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|x| x["path"].as_str().unwrap().to_string())
        })
        .collect();
    let mut sorted = named.clone();
    sorted.sort();
    let mut want = bad.clone();
    want.sort();
    assert_eq!(sorted, want, "each bad file named once over three epochs");
    let listed = std::fs::read_to_string(s.run.file("skipped.txt")).unwrap();
    for b in &bad {
        let lines = listed.lines().filter(|l| l.starts_with(&format!("{b}\t")));
        assert_eq!(lines.count(), 1, "{listed}");
    }
    // The positions stay within their epochs although batches were skipped: the checkpoint
    // is at the start of the epoch after the last.
    let ck = load_checkpoint(&s.run.checkpoint(), &Device::Cpu).unwrap();
    assert_eq!((ck.meta.epoch, ck.meta.batch_in_epoch), (3, 0));
}

#[test]
fn a_divergence_names_only_a_checkpoint_that_exists_and_is_good() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    // A fresh run that diverges before its first checkpoint: no file is named.
    let mut wild = config(&cache, "wild", 2);
    wild.train.lr.lr = 1e30;
    wild.train.lr.warmup_steps = 0;
    wild.train.grad_clip = 0.0;
    wild.train.checkpoint_every = 1000;
    let e = format!("{:#}", train_detector(&wild, &quiet(&runs)).unwrap_err());
    assert!(
        e.contains("the loss became") || e.contains("non-finite"),
        "{e}"
    );
    assert!(!e.contains("last good checkpoint is"), "{e}");
    assert!(
        e.contains("train.checkpoint_every = 1000") && e.contains("train.lr.lr"),
        "{e}"
    );
    assert!(!runs.join("wild/checkpoint.safetensors").exists());

    // A run with a checkpoint every step that diverges later: the named checkpoint exists and
    // resumes with a finite loss (it was written only once its weights gave one).
    let mut hot = config(&cache, "hot", 3);
    hot.train.lr.lr = 1000.0;
    hot.train.lr.warmup_steps = 0;
    hot.train.grad_clip = 0.0;
    hot.train.checkpoint_every = 1;
    let e = format!("{:#}", train_detector(&hot, &quiet(&runs)).unwrap_err());
    assert!(e.contains("last good checkpoint is"), "{e}");
    let ck = runs.join("hot/checkpoint.safetensors");
    let good = load_checkpoint(&ck, &Device::Cpu).unwrap();
    let mut calm = hot.clone();
    calm.train.lr.lr = 1e-4;
    let s = train_detector(
        &calm,
        &RunOptions {
            resume: true,
            max_steps: Some(good.meta.step + 1),
            ..quiet(&runs)
        },
    )
    .unwrap();
    assert_eq!(s.steps, good.meta.step + 1);
    let last = log_lines(&runs.join("hot"));
    assert!(last.last().unwrap()["loss"].as_f64().unwrap().is_finite());
}

fn meta() -> CheckpointMeta {
    CheckpointMeta {
        format: FORMAT.into(),
        kind: "detector".into(),
        step: 1,
        epoch: 0,
        batch_in_epoch: 1,
        seed: 0,
        config: String::new(),
        class_names: vec!["a".into()],
        extra: serde_json::json!({}),
        checksum: None,
    }
}

#[test]
fn damaged_checkpoints_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ck.safetensors");
    let t: std::collections::HashMap<String, Tensor> = [
        (
            "a.weight".to_string(),
            Tensor::arange(0f32, 64.0, &Device::Cpu).unwrap(),
        ),
        (
            "b.bias".to_string(),
            Tensor::ones(16, DType::F32, &Device::Cpu).unwrap(),
        ),
    ]
    .into();
    save_checkpoint(&p, &t, &meta()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    // Every single flipped byte in the tensor data is found.
    for k in 1..=40 {
        let mut b = bytes.clone();
        let at = b.len() - k * 7;
        b[at] ^= 0x10;
        std::fs::write(&p, &b).unwrap();
        let e = format!("{:#}", load_checkpoint(&p, &Device::Cpu).err().unwrap());
        assert!(e.contains("ck.safetensors") && e.contains("damaged"), "{e}");
    }
    // A NaN written by this project's saver is refused naming the tensor.
    let mut bad = t.clone();
    bad.insert(
        "c.weight".into(),
        Tensor::new(&[1.0f32, f32::NAN], &Device::Cpu).unwrap(),
    );
    save_checkpoint(&p, &bad, &meta()).unwrap();
    let e = format!("{:#}", load_checkpoint(&p, &Device::Cpu).err().unwrap());
    assert!(e.contains("`c.weight`") && e.contains("NaN"), "{e}");
    // Empty and truncated files say so.
    std::fs::write(&p, b"").unwrap();
    let e = format!("{:#}", load_checkpoint(&p, &Device::Cpu).err().unwrap());
    assert!(e.contains("empty"), "{e}");
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    assert!(load_checkpoint(&p, &Device::Cpu).is_err());
}

#[test]
fn leftovers_of_interrupted_checkpoint_writes_are_removed_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let cfg = config(&cache, "left", 1);
    train_detector(
        &cfg,
        &RunOptions {
            max_steps: Some(2),
            ..quiet(&runs)
        },
    )
    .unwrap();
    // Temporaries of writers that died (pids that cannot be alive) and an unrelated file.
    let run = runs.join("left");
    for pid in [4_000_000_001u64, 4_000_000_002] {
        std::fs::write(run.join(format!(".checkpoint.safetensors.tmp-{pid}")), b"x").unwrap();
    }
    std::fs::write(run.join("notes.txt"), b"keep").unwrap();
    train_detector(
        &cfg,
        &RunOptions {
            resume: true,
            ..quiet(&runs)
        },
    )
    .unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || n == "notes.txt")
        .collect();
    names.sort();
    assert_eq!(names, vec!["notes.txt"]);
}

#[test]
fn a_drawing_that_cannot_be_written_is_named_as_a_write() {
    let dir = tempfile::tempdir().unwrap();
    // A folder where the picture should go (root may write anywhere, so no permission test).
    let target = dir.path().join("taken.pred.png");
    std::fs::create_dir_all(&target).unwrap();
    let img = image::RgbImage::new(4, 4);
    let e = retinanet_train::infer::save(&img, &target)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot write image") && e.contains("taken.pred.png"),
        "{e}"
    );
    assert!(!e.contains("decode"), "{e}");
}
