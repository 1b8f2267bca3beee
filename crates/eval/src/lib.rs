//! retinanet-eval
