//! Checkpoints: one safetensors file holding the model's tensors, the optimizer's momentum
//! buffers and a JSON metadata record (step, epoch, position in the epoch, seed, the run's
//! config and class names, a CRC-32 of the tensors). Written atomically: a kill at any moment
//! leaves either the previous file or the new one, never half of one. Loading refuses a file
//! whose tensors do not match their checksum (a flipped byte) or hold a NaN or infinity,
//! naming the tensor.

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
    /// `crc32:<hex>` of the tensors (names and data, in name order); set by
    /// [`save_checkpoint`], checked by [`load_checkpoint`]. Older checkpoints have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// The CRC-32 of named tensor data, in name order: `(name, raw little-endian bytes)`.
fn tensors_crc<'a>(
    items: impl IntoIterator<Item = (&'a str, std::borrow::Cow<'a, [u8]>)>,
) -> String {
    let mut items: Vec<_> = items.into_iter().collect();
    items.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = crc32fast::Hasher::new();
    for (name, data) in &items {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(data.len() as u64).to_le_bytes());
        h.update(data);
    }
    format!("crc32:{:08x}", h.finalize())
}

/// The first tensor (in name order) holding a NaN or an infinity.
pub fn first_non_finite_tensor(tensors: &HashMap<String, Tensor>) -> Result<Option<String>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        if !t.dtype().is_float() {
            continue;
        }
        let v: Vec<f32> = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        if v.iter().any(|x| !x.is_finite()) {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
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
    // safetensors wants host tensors; sort names so files are reproducible.
    let mut host: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    host.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta = meta.clone();
    meta.checksum =
        Some(tensors_crc(host.iter().map(|(k, v)| {
            (k.as_str(), safetensors::tensor::View::data(v))
        })));
    let info: HashMap<String, String> =
        [(META_KEY.to_string(), serde_json::to_string(&meta)?)].into();
    let bytes = safetensors::serialize(host.iter().map(|(k, v)| (k.as_str(), v)), Some(info))
        .with_context(|| format!("cannot serialise checkpoint {}", path.display()))?;
    write_atomic(path, "checkpoint ", |f| Ok(f.write_all(&bytes)?))
}

/// Writes `path` through a temporary file beside it (`.NAME.tmp-PID`), filled by `fill`, synced
/// and renamed over `path`, the rename synced too: a reader or a killed run never sees half a
/// file, and a failed write leaves no temporary behind. Errors say `cannot write {what}{path}`.
pub(crate) fn write_atomic(
    path: &Path,
    what: &str,
    fill: impl FnOnce(&mut File) -> Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Both names in the message: the file asked for, and the folder that could not be made.
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot write {what}{}: cannot create {}",
            path.display(),
            dir.display()
        )
    })?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let write = || -> Result<()> {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
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
        anyhow::anyhow!("cannot write {what}{}: {e:#}", path.display())
    })
}

/// Reads a checkpoint written by [`save_checkpoint`] onto `device`.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<Checkpoint> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    load_checkpoint_bytes(&bytes, path, device)
}

/// [`load_checkpoint`] of a file's bytes read already (`path` names it in messages).
pub fn load_checkpoint_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Checkpoint> {
    if bytes.is_empty() {
        bail!("checkpoint {} is empty", path.display());
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
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
    let st = safetensors::SafeTensors::deserialize(bytes)
        .with_context(|| format!("{}: truncated or damaged tensor data", path.display()))?;
    if let Some(want) = &meta.checksum {
        let views = st.tensors();
        let got = tensors_crc(
            views
                .iter()
                .map(|(k, v)| (k.as_str(), std::borrow::Cow::Borrowed(v.data()))),
        );
        if &got != want {
            bail!(
                "{}: the tensor data does not match the checkpoint's checksum ({got}, expected {want}): the file is damaged",
                path.display()
            );
        }
    }
    let tensors = candle_core::safetensors::load_buffer(bytes, device)
        .with_context(|| format!("cannot load tensors of {}", path.display()))?;
    if let Some(name) = first_non_finite_tensor(&tensors)? {
        bail!(
            "{}: tensor `{name}` holds a NaN or an infinity: the checkpoint is of a diverged run",
            path.display()
        );
    }
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
    /// Saves `tensors` (weights, BatchNorm statistics, optimizer state) at
    /// `(step, epoch, batch_in_epoch)`; the caller has checked they are finite.
    pub fn save_tensors(
        &self,
        tensors: &HashMap<String, Tensor>,
        (step, epoch, batch_in_epoch): (usize, usize, usize),
        extra: serde_json::Value,
    ) -> Result<()> {
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
            checksum: None,
        };
        save_checkpoint(&self.path, tensors, &meta)
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
            checksum: None,
        };
        save_checkpoint(&path, &t, &meta).unwrap();
        save_checkpoint(&path, &t, &meta).unwrap(); // overwrite in place
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let ck = load_checkpoint(&path, &Device::Cpu).unwrap();
        assert!(ck.meta.checksum.as_deref().unwrap().starts_with("crc32:"));
        assert_eq!(
            CheckpointMeta {
                checksum: None,
                ..ck.meta.clone()
            },
            meta
        );
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
