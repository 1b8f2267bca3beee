//! retinanet-extractor
