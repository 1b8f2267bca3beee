//! ResNet feature extractor for RetinaNet, on candle.
//!
//! [`ResNet`] is ResNet-18, 34, 50 or 101 (torchvision's layout: 7x7/2 stem, 3x3/2 max-pool,
//! four stages, the stride in the 3x3 conv of a bottleneck) and returns `out3, out4, out5`
//! (strides 8, 16, 32); an optional `fc` head classifies for pretraining. BatchNorm follows
//! PyTorch ([`BatchNorm2d`]): batch statistics and running averages in training, running
//! statistics in evaluation; [`ResNet::set_freeze_bn`] and [`ResNetConfig::frozen_stages`] serve
//! detector fine-tuning.
//!
//! Variables are created through a [`candle_nn::VarBuilder`] over a [`candle_nn::VarMap`]; the
//! running statistics live in the VarMap too (so checkpoints carry them) and [`is_buffer`] tells an
//! optimiser to leave them alone. Tensor names are torchvision's (`conv1`, `bn1`,
//! `layer1.0.conv1`, `layer2.0.downsample.0`, `fc`, ...) under the builder's prefix; the project
//! uses `extractor.`. [`weights`] loads torchvision and tutorial state dicts (`.pth` or
//! `.safetensors`) strictly.
//!
//! [`ops`] holds the two differentiable operations candle 0.11 lacks: padded max-pool with
//! kernel ≠ stride, and bilinear resize with aligned corners.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use retinanet_extractor::{Depth, ResNet, ResNetConfig};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let cfg = ResNetConfig { base_width: 8, ..ResNetConfig::new(Depth::R18, Some(5)) };
//! let net = ResNet::new(vb.pp("extractor"), &cfg)?;
//! let x = Tensor::randn(0f32, 1., (1, 3, 65, 65), &Device::Cpu)?;
//! let (o3, o4, o5) = net.forward_t(&x, false)?;
//! assert_eq!(o3.dims(), &[1, 16, 9, 9]);
//! assert_eq!(o4.dims(), &[1, 32, 5, 5]);
//! assert_eq!(o5.dims(), &[1, 64, 3, 3]);
//! assert_eq!(net.classify_t(&x, false)?.dims(), &[1, 5]);
//! assert!(varmap.data().lock().unwrap().contains_key("extractor.layer2.0.downsample.1.running_var"));
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! # Performance notes
//!
//! * Set `RAYON_NUM_THREADS` (e.g. at the start of `main`, before any tensor op): otherwise
//!   candle asks `num_cpus` for the thread count on every parallel op, which on some machines
//!   reads `/proc/cpuinfo` each time — a training step was 2.5x slower for it here.
//! * For inference use [`ResNet::detached`] (or `RetinaNet::infer` in the detector crate):
//!   candle tracks every op that touches a variable, so an ordinary forward pass keeps all
//!   activations alive until its outputs are dropped.
//! * [`ops::conv2d`] gives convolutions a faster CPU backward pass than candle's own.
//!
//! # CUDA
//!
//! The `cuda` feature forwards to `candle-core/cuda` and `candle-nn/cuda`; the default build is
//! CPU only. Building with it needs `nvcc` and the CUDA libraries; `scripts/cuda-toolchain.sh`
//! at the workspace root installs them from PyPI wheels and sets up the link (see
//! `docs/cuda.md`). On a GPU the convolutions and BatchNorm are candle's, and the max-pool is
//! [`ops::max_pool2d_portable`] (candle operations, same gradient routing as the CPU op).

pub mod bn;
pub mod ops;
pub mod resnet;
pub mod weights;

pub use bn::BatchNorm2d;
pub use resnet::{Depth, ResNet, ResNetConfig};
pub use weights::{WeightsError, is_buffer};
