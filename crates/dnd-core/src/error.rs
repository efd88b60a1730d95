//! The crate's error type: every fallible public function returns [`Result`].

use std::path::PathBuf;

/// Errors raised while loading models, generating adapters or reading and writing files.
#[derive(Debug, thiserror::Error)]
pub enum DndError {
    /// A tensor operation failed (shape mismatch, unsupported dtype, device error...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A JSON document did not parse or lacked a required field.
    #[error("{context}: {message}")]
    Json {
        /// What was being read (usually a path).
        context: String,
        /// What is wrong with it.
        message: String,
    },

    /// The text tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Caller input that the generator cannot accept (empty prompt list, blank prompt...).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A name or other unique thing already taken (an adapter name given twice).
    #[error("{0}")]
    Conflict(String),

    /// A model, checkpoint or adapter whose contents do not fit what was expected.
    #[error("{0}")]
    Incompatible(String),

    /// Weights or generated tokens hold NaN or infinite values.
    #[error("{0}")]
    NonFinite(String),

    /// The chunk width does not divide one of the base model's projection widths.
    #[error(
        "chunk width {chunk_width} does not divide the {side} width {dim} of module {module}; \
         widths that divide every module of this model: {suggestions:?}"
    )]
    ChunkWidth {
        /// The module whose width is not a multiple of the chunk width.
        module: String,
        /// Which side of the module ("input" or "output").
        side: &'static str,
        /// The offending width.
        dim: usize,
        /// The requested chunk width.
        chunk_width: usize,
        /// Chunk widths that would work for every module.
        suggestions: Vec<usize>,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, DndError>;

impl DndError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DndError::Io {
            path: path.into(),
            source,
        }
    }

    /// A JSON error with the document it came from.
    pub fn json(context: impl std::fmt::Display, message: impl std::fmt::Display) -> Self {
        DndError::Json {
            context: context.to_string(),
            message: message.to_string(),
        }
    }
}

/// Reads a whole file, naming it in the error.
pub fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| DndError::io(path, e))
}

/// Reads and parses a JSON file, naming it in the error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| DndError::json(path.display(), e))
}
