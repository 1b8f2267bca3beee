//! retinanet-dataset
