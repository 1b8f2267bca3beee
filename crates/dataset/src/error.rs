//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading, converting or loading data.
///
/// Every variant names the file (and the line, where there is one) so the user can fix the input.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An image could not be decoded (unreadable, corrupt or of an unsupported format).
    #[error("cannot decode image {path}: {message}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What the decoder said.
        message: String,
    },
    /// A malformed line in a text file (list file, names file, VOC split file).
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The text file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// A class index beyond the names file.
    #[error(
        "{path}:{line}: class {class} is outside 1..={num_classes} (the names file has {num_classes} names)"
    )]
    ClassOutOfRange {
        /// The list file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending class index.
        class: i64,
        /// Number of names in the names file.
        num_classes: usize,
    },
    /// A malformed VOC annotation or COCO JSON file.
    #[error("{path}: {message}")]
    Annotation {
        /// The annotation file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A dataset without any item (or a names file without any name).
    #[error("empty dataset: {0}")]
    Empty(String),
    /// An invalid argument (batch size 0, image size 0, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A tensor could not be built.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DatasetError {
    let path = path.into();
    move |source| DatasetError::Io { path, source }
}
