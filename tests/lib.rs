//! Holds no code: the workspace-level tests live in `pipelines.rs`.
