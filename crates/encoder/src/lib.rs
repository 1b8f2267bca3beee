//! RetinaNet box math: IoU, NMS, training-target encoding and detection decoding.
//!
//! Everything runs on plain slices of `[ymin, xmin, ymax, xmax]` boxes (f32 pixels) and needs no
//! tensor library; the `candle` feature (on by default) adds conversion of targets to tensors
//! and decoding straight from the network's output tensors.
//!
//! ```
//! use retinanet_encoder::{DecodeOptions, Encoder, EncoderConfig};
//!
//! let enc = Encoder::new(EncoderConfig { train_size: (129, 129), ..Default::default() })?;
//! // One image with one object of class 2.
//! let targets = enc.encode(&[vec![2u32]], &[vec![[30.0, 40.0, 70.0, 90.0]]])?;
//! assert_eq!(targets.cls.len(), enc.num_anchors());
//! assert!(targets.num_positive() >= 1);
//!
//! // Perfect network outputs: logits high on the matched class, regression = the targets.
//! let c = 3;
//! let mut cls = vec![-10.0f32; enc.num_anchors() * c];
//! let reg: Vec<f32> = targets.reg.iter().flatten().copied().collect();
//! for (a, &t) in targets.cls.iter().enumerate() {
//!     if t > 0 { cls[a * c + t as usize - 1] = 10.0; }
//! }
//! let det = enc.decode(&cls, &reg, c, (129, 129), &DecodeOptions::default())?;
//! assert_eq!(det.labels, vec![2]);
//! assert!((det.boxes[0][3] - 90.0).abs() < 1e-3);
//! # Ok::<(), retinanet_encoder::EncodeError>(())
//! ```

pub mod anchor_check;
mod boxes;
mod decode;
mod encode;
#[cfg(feature = "candle")]
mod tensors;

pub use boxes::{Bbox, EPS, NmsMode, box_iou, box_nms, iou, validate_boxes};
pub use decode::{DecodeOptions, Detections};
pub use encode::{BoxMatch, Encoder, EncoderConfig, Postprocess, Targets};
pub use retinanet_anchors::{AnchorCache, AnchorConfig, AnchorStyle, Anchors, gen_anchors};

/// What can go wrong in the box math; every variant names the offending value.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// A box with a NaN or infinite coordinate.
    #[error("box {index} = {bbox:?} has a non-finite coordinate")]
    NonFiniteBox { index: usize, bbox: Bbox },
    /// A box with `ymax < ymin` or `xmax < xmin`.
    #[error(
        "box {index} = {bbox:?} is inverted (ymax < ymin or xmax < xmin); boxes are [ymin, xmin, ymax, xmax]"
    )]
    InvertedBox { index: usize, bbox: Bbox },
    /// A label outside `1..=C`.
    #[error("label {label} of box {index} is outside 1..={}", num_classes.map_or("C".to_string(), |c| c.to_string()))]
    LabelOutOfRange {
        index: usize,
        label: i64,
        num_classes: Option<usize>,
    },
    /// An image's boxes and labels differ in length.
    #[error("{boxes} boxes but {labels} labels")]
    LengthMismatch { labels: usize, boxes: usize },
    /// A batch's boxes and labels differ in image count.
    #[error("batch has label lists for {labels} images but box lists for {boxes}")]
    BatchMismatch { labels: usize, boxes: usize },
    /// An error inside image `image` of a batch.
    #[error("image {image} of the batch: {source}")]
    InImage {
        image: usize,
        source: Box<EncodeError>,
    },
    /// Network outputs of the wrong shape.
    #[error("{0}")]
    Shape(String),
    /// NaN or infinity in network outputs.
    #[error("{0}")]
    NonFiniteOutput(String),
    /// An invalid configuration.
    #[error("{0}")]
    Config(String),
    /// A tensor operation failed.
    #[cfg(feature = "candle")]
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
