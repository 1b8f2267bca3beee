//! retinanet-encoder
