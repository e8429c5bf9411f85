//! The error type of the library code (the core and the daemon): one enum whose variants say
//! what failed, and — for the ones a ReID client can see — which wire code answers it
//! ([`Error::code`]). Wrapped errors keep their own message (`transparent`), so a log line or a
//! printed error reads the same as the error that caused it.
//!
//! The commands and benchmarks are programs whose errors are printed and end the process; they
//! return `Box<dyn std::error::Error>`, into which this type converts with `?`.

use crate::base::state::StateError;
use plip_ingest::wire::{Code, WireError};

/// What went wrong in the core or the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file or key that cannot be used (every problem, one per line).
    #[error("{0}")]
    Config(String),
    /// The state folder: opening it, its format, a checkpoint.
    #[error(transparent)]
    State(#[from] StateError),
    /// The database (sled) under the state folder.
    #[error(transparent)]
    Db(#[from] sled::Error),
    /// Sample storage: pack files, records, disk space, an injected fault.
    #[error("{0}")]
    Storage(String),
    /// A file, a socket or a thread.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The broker: a connection, a channel, a declaration, a publish or its confirm.
    #[error("{0}")]
    Broker(String),
    /// Declaring the topology (a connection, a TLS setup, an exchange or queue the broker
    /// refused).
    #[error(transparent)]
    Topology(#[from] plip_ingest::amqp::TopologyError),
    /// Encoding or decoding a JSON record or document.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A model: building it, reading or writing weights, the tokenizer, the device.
    #[error(transparent)]
    Model(#[from] plip_model::Error),
    /// A model or tokenizer problem described here (a preset that does not match, a tokenizer
    /// that cannot be trained).
    #[error("{0}")]
    ModelSetup(String),
    /// A running daemon's HTTP listener answered with an error, or not as expected (the admin
    /// client of the commands).
    #[error("{0}")]
    Admin(String),
    /// ReID: no encoder has been promoted yet.
    #[error("no encoder is serving yet (the first checkpoint has not been promoted)")]
    NoModel,
    /// ReID: the gallery holds nothing to rank.
    #[error("the gallery is empty: publish samples with purpose gallery or both")]
    EmptyGallery,
    /// ReID: a text query longer than the model's context.
    #[error("the text is {tokens} tokens; at most {limit}")]
    TextTooLong { tokens: usize, limit: usize },
    /// ReID: the serving model is older than the request's `min_model_version`.
    #[error("this server answers with model version {serving}; the request asks for version {wanted} or newer")]
    ModelTooOld { serving: u64, wanted: u64 },
    /// ReID: the request's deadline passed before it was served.
    #[error("the request's deadline of {budget_ms} ms passed before it was served")]
    DeadlinePassed { budget_ms: u64 },
    /// The daemon's own failure: a panicked task, a tokenizer error, a broken invariant.
    #[error("{0}")]
    Internal(String),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The wire code a ReID client receives for this error. Everything that is not the
    /// request's own doing (storage, broker, model, a panic) is `internal`.
    pub fn code(&self) -> Code {
        match self {
            Error::NoModel => Code::NoModel,
            Error::EmptyGallery => Code::EmptyGallery,
            Error::TextTooLong { .. } => Code::TextTooLong,
            Error::DeadlinePassed { .. } => Code::DeadlinePassed,
            Error::ModelTooOld { .. } => Code::ModelTooOld,
            _ => Code::Internal,
        }
    }

    /// This error as a reply's `error` object.
    pub fn to_wire(&self) -> WireError {
        WireError {
            code: self.code(),
            message: self.to_string(),
        }
    }

    /// A storage error with its context: `storage("writing a pack file")(e)`.
    pub fn storage<E: std::fmt::Display>(context: &str) -> impl FnOnce(E) -> Error + '_ {
        move |e| Error::Storage(format!("{context}: {e}"))
    }

    /// A model error from anything printable (safetensors and tokenizers errors).
    pub fn model<E: std::fmt::Display>(e: E) -> Error {
        Error::ModelSetup(e.to_string())
    }
}

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Error {
        Error::Broker(e.to_string())
    }
}

impl From<tokio::task::JoinError> for Error {
    /// A task that panicked or was cancelled: the daemon's failure.
    fn from(e: tokio::task::JoinError) -> Error {
        Error::Internal(format!("a task failed: {e}"))
    }
}

impl From<Error> for WireError {
    fn from(e: Error) -> WireError {
        e.to_wire()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_errors_keep_their_codes_and_everything_else_is_internal() {
        assert_eq!(Error::NoModel.code(), Code::NoModel);
        assert_eq!(Error::EmptyGallery.code(), Code::EmptyGallery);
        let long = Error::TextTooLong {
            tokens: 80,
            limit: 62,
        };
        assert_eq!(long.code(), Code::TextTooLong);
        assert_eq!(long.to_wire().message, "the text is 80 tokens; at most 62");
        assert_eq!(
            Error::DeadlinePassed { budget_ms: 5 }.code(),
            Code::DeadlinePassed
        );
        let old = Error::ModelTooOld {
            serving: 3,
            wanted: 5,
        };
        assert_eq!(old.code().as_str(), "model_too_old");
        assert!(old.to_string().contains("version 5 or newer"), "{old}");
        for e in [
            Error::Internal("the search failed: panic".into()),
            Error::Storage("writing a pack file: disk full".into()),
            Error::ModelSetup("bad weights".into()),
            Error::Io(std::io::Error::other("broken pipe")),
            Error::Db(sled::Error::Unsupported("x".into())),
        ] {
            assert_eq!(e.code(), Code::Internal, "{e}");
        }
    }

    #[test]
    fn wrapped_errors_read_as_their_cause() {
        let io = std::io::Error::other("No space left on device");
        assert_eq!(Error::from(io).to_string(), "No space left on device");
        assert_eq!(
            Error::storage("syncing a pack file")("EIO").to_string(),
            "syncing a pack file: EIO"
        );
    }
}
