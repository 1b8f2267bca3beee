//! Checkpoints: one safetensors file holding the model's tensors, the optimizer's momentum
//! buffers and a JSON metadata record (step, epoch, position in the epoch, seed, the run's
//! config and class names). Written atomically: a kill at any moment leaves either the previous
//! file or the new one, never half of one.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Format tag in every checkpoint's metadata.
pub const FORMAT: &str = "retinanet-rs/1";
const META_KEY: &str = "retinanet";

/// What a checkpoint says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Always [`FORMAT`].
    pub format: String,
    /// `"detector"` (extractor + detector) or `"extractor"` (a pretraining run).
    pub kind: String,
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch the next step belongs to.
    pub epoch: usize,
    /// Batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
    /// The run's seed: with `epoch` and `batch_in_epoch` it fixes every later batch.
    pub seed: u64,
    /// The run's config, as TOML.
    pub config: String,
    /// Class names `1..=C` in order.
    pub class_names: Vec<String>,
    /// Free-form extras (best metric, wall time so far, ...).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    /// All tensors, by name.
    pub tensors: HashMap<String, Tensor>,
    /// The metadata record.
    pub meta: CheckpointMeta,
}

/// Writes `tensors` and `meta` to `path` atomically (temporary file in the same folder,
/// flushed to disk, then renamed over `path`).
pub fn save_checkpoint(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    meta: &CheckpointMeta,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let info: HashMap<String, String> =
        [(META_KEY.to_string(), serde_json::to_string(meta)?)].into();
    // safetensors wants host tensors; sort names so files are reproducible.
    let mut host: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    host.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = safetensors::serialize(host.iter().map(|(k, v)| (k.as_str(), v)), Some(info))
        .with_context(|| format!("cannot serialise checkpoint {}", path.display()))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Persist the rename itself.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("cannot write checkpoint {}: {e}", path.display())
    })
}

/// Reads a checkpoint written by [`save_checkpoint`] onto `device`.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<Checkpoint> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let meta = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .with_context(|| {
            format!("{} has no retinanet metadata: not a checkpoint of this project (a bare weights file?)", path.display())
        })?;
    let meta: CheckpointMeta = serde_json::from_str(meta)
        .with_context(|| format!("{}: unreadable metadata", path.display()))?;
    if meta.format != FORMAT {
        bail!(
            "{}: checkpoint format `{}`, this build reads `{FORMAT}`",
            path.display(),
            meta.format
        );
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("cannot load tensors of {}", path.display()))?;
    Ok(Checkpoint { tensors, meta })
}

/// Where a run resumes after step `step`, which ended batch `batch_in_epoch` (counted from 1)
/// of `epoch`: the end of an epoch is stored as the start of the next.
pub fn resume_position(
    step: usize,
    epoch: usize,
    batch_in_epoch: usize,
    per_epoch: usize,
) -> (usize, usize, usize) {
    if batch_in_epoch == per_epoch {
        (step, epoch + 1, 0)
    } else {
        (step, epoch, batch_in_epoch)
    }
}

/// Writes a training run's checkpoints: what stays the same (file, kind, seed, config, classes)
/// is fixed once; each save adds the weights, the optimizer state and the position.
pub struct CheckpointWriter {
    /// The checkpoint file.
    pub path: std::path::PathBuf,
    /// `"detector"` or `"extractor"`.
    pub kind: &'static str,
    /// The run's seed.
    pub seed: u64,
    /// The run's config as TOML.
    pub config: String,
    /// Class names `1..=C`.
    pub class_names: Vec<String>,
}

impl CheckpointWriter {
    /// Saves `varmap` and `opt` at `(step, epoch, batch_in_epoch)`, refusing (with the run's
    /// message) when a weight is no longer finite, so a diverged update never replaces the last
    /// good checkpoint.
    pub fn save(
        &self,
        varmap: &candle_nn::VarMap,
        opt: &crate::optim::Sgd,
        (step, epoch, batch_in_epoch): (usize, usize, usize),
        extra: serde_json::Value,
    ) -> Result<()> {
        if let Some(name) = crate::model::first_non_finite(varmap)? {
            bail!(
                "the weights became non-finite by step {step} (`{name}`): stopping; the last good checkpoint is {} (try a lower learning rate or grad_clip)",
                self.path.display()
            );
        }
        let mut tensors = crate::model::varmap_tensors(varmap);
        tensors.extend(opt.state());
        let meta = CheckpointMeta {
            format: FORMAT.into(),
            kind: self.kind.into(),
            step,
            epoch,
            batch_in_epoch,
            seed: self.seed,
            config: self.config.clone(),
            class_names: self.class_names.clone(),
            extra,
        };
        save_checkpoint(&self.path, &tensors, &meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn round_trip_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.safetensors");
        let t: HashMap<String, Tensor> = [
            (
                "a.weight".to_string(),
                Tensor::arange(0f32, 6.0, &Device::Cpu)
                    .unwrap()
                    .reshape((2, 3))
                    .unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
            ),
        ]
        .into();
        let meta = CheckpointMeta {
            format: FORMAT.into(),
            kind: "detector".into(),
            step: 7,
            epoch: 1,
            batch_in_epoch: 3,
            seed: 42,
            config: "x = 1".into(),
            class_names: vec!["a".into(), "b".into()],
            extra: serde_json::json!({"best_map": 0.5}),
        };
        save_checkpoint(&path, &t, &meta).unwrap();
        save_checkpoint(&path, &t, &meta).unwrap(); // overwrite in place
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let ck = load_checkpoint(&path, &Device::Cpu).unwrap();
        assert_eq!(ck.meta, meta);
        assert_eq!(
            ck.tensors["a.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0]]
        );

        // A bare safetensors file and a truncated file are refused with the path.
        let bare = dir.path().join("bare.safetensors");
        candle_core::safetensors::save(&t, &bare).unwrap();
        let e = load_checkpoint(&bare, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("bare.safetensors") && e.contains("not a checkpoint"),
            "{e}"
        );
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&bare, &bytes[..bytes.len() / 2]).unwrap();
        assert!(load_checkpoint(&bare, &Device::Cpu).is_err());
    }
}
