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
    /// An image could not be written (e.g. a drawing of detections).
    #[error("cannot write image {path}: {message}")]
    Write {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
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
        "{path}:{line}: class {class} is outside 1..={num_classes} (the names file{} has {num_classes} names)",
        names_file.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default()
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
        /// The names file, where known.
        names_file: Option<PathBuf>,
    },
    /// A malformed VOC annotation or COCO JSON file.
    #[error("{path}: {message}")]
    Annotation {
        /// The annotation file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// An annotation uses a class that is not in the run's class list (e.g. a checkpoint's).
    #[error("{location}: class {class:?} is not one of the {} classes {}", classes.len(), list_names(classes))]
    UnknownClass {
        /// Where the class appears: `file:line`, or a VOC XML and id, or a COCO file and image.
        location: String,
        /// The class name.
        class: String,
        /// The run's class list.
        classes: Vec<String>,
    },
    /// Images named by the annotations are missing (found when the dataset is opened).
    #[error("{location}: image {} {problem}{}", path.display(), more_missing(*missing, *total))]
    MissingImage {
        /// Where the first missing image is named: `file:line`, a VOC XML and id, ...
        location: String,
        /// The first missing image file.
        path: PathBuf,
        /// What is wrong with it ("does not exist", ...).
        problem: String,
        /// How many of the dataset's images are missing.
        missing: usize,
        /// How many images the dataset names.
        total: usize,
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

fn list_names(names: &[String]) -> String {
    // Long lists (COCO's 80) are cut: the message must stay readable.
    const SHOWN: usize = 25;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", ... ({} more)", names.len() - SHOWN));
    }
    format!("[{s}]")
}

fn more_missing(missing: usize, total: usize) -> String {
    if missing > 1 {
        format!(" ({missing} of the {total} images are missing)")
    } else {
        String::new()
    }
}

/// The crate's result type.
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

impl DatasetError {
    /// The file the error is about, where there is one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            DatasetError::Io { path, .. }
            | DatasetError::Image { path, .. }
            | DatasetError::Parse { path, .. }
            | DatasetError::ClassOutOfRange { path, .. }
            | DatasetError::Annotation { path, .. }
            | DatasetError::MissingImage { path, .. } => Some(path),
            _ => None,
        }
    }
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DatasetError {
    let path = path.into();
    move |source| DatasetError::Io { path, source }
}
