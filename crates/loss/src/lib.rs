//! retinanet-loss
