//! The candle edge: targets to tensors, network outputs from tensors.

use candle_core::{DType, Device, Tensor};

use crate::{DecodeOptions, Detections, EncodeError, Encoder, Targets};

impl Targets {
    /// `(cls [B, A] i64, reg [B, A, 4] f32)` on `device`.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor), EncodeError> {
        let cls: Vec<i64> = self.cls.iter().map(|&c| c as i64).collect();
        let cls = Tensor::from_vec(cls, (self.batch, self.num_anchors), device)?;
        let reg: Vec<f32> = self.reg.iter().flatten().copied().collect();
        let reg = Tensor::from_vec(reg, (self.batch, self.num_anchors, 4), device)?;
        Ok((cls, reg))
    }
}

impl Encoder {
    /// Decodes network outputs `cls [B, A, C]` and `reg [B, A, 4]` (any float dtype, any
    /// device) for images of `img_size`.
    pub fn decode_tensors(
        &self,
        cls: &Tensor,
        reg: &Tensor,
        img_size: (usize, usize),
        opts: &DecodeOptions,
    ) -> Result<Vec<Detections>, EncodeError> {
        self.decode_tensors_valid(cls, reg, img_size, &[], opts)
    }

    /// [`Encoder::decode_tensors`] with each image's valid `(h, w)` (see
    /// [`Encoder::decode_valid`]; empty: every image fills the input).
    pub fn decode_tensors_valid(
        &self,
        cls: &Tensor,
        reg: &Tensor,
        img_size: (usize, usize),
        valid: &[(usize, usize)],
        opts: &DecodeOptions,
    ) -> Result<Vec<Detections>, EncodeError> {
        let an = self.anchors_for(img_size).len();
        let (b, a, c) = cls.dims3().map_err(|_| {
            EncodeError::Shape(format!(
                "decode: class output has shape {:?}, expected [B, A, C]",
                cls.dims()
            ))
        })?;
        if a != an {
            return Err(EncodeError::Shape(format!(
                "decode: class output has shape {:?}, but a {}x{} image has {an} anchors",
                cls.dims(),
                img_size.0,
                img_size.1
            )));
        }
        if reg.dims() != [b, a, 4] {
            return Err(EncodeError::Shape(format!(
                "decode: box output has shape {:?}, expected [{b}, {a}, 4]",
                reg.dims()
            )));
        }
        let host = |t: &Tensor| -> Result<Vec<f32>, EncodeError> {
            Ok(t.to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        };
        self.decode_batch_valid(&host(cls)?, &host(reg)?, b, c, img_size, valid, opts)
    }
}
