//! retinanet-detector
