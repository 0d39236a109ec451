// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Error type shared by every disk back-end.

use std::io;
use std::path::PathBuf;

/// Errors returned by the block layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image file could not be opened.
    #[error("cannot open disk image {path:?}: {source}")]
    Open {
        /// Path of the image.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Another process holds a conflicting lock on the image.
    #[error("disk image {0:?} is in use by another process (lock held); refusing to open it")]
    Locked(PathBuf),
    /// An I/O error while accessing the image.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The image is malformed.
    #[error("invalid {format} image: {reason}")]
    Invalid {
        /// Image format.
        format: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The image uses a feature this implementation does not support.
    #[error("unsupported {format} image: {reason}")]
    Unsupported {
        /// Image format.
        format: &'static str,
        /// The feature.
        reason: String,
    },
    /// A request falls outside the virtual disk.
    #[error(
        "request at offset {offset} of {len} bytes is beyond the end of the disk ({size} bytes)"
    )]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// A write was attempted on a read-only disk.
    #[error("disk image is read-only")]
    ReadOnly,
    /// A backing file is named but backing files are disabled.
    #[error("image {path:?} names backing file {backing:?}, but backing files are disabled (enable backing_files)")]
    BackingDisabled {
        /// The image naming the backing file.
        path: PathBuf,
        /// The backing file name.
        backing: String,
    },
    /// Backing file chain is too deep or loops.
    #[error("backing file chain error: {0}")]
    BackingChain(String),
    /// Invalid argument passed by the caller.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Result type of the block layer.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn invalid(format: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        format,
        reason: reason.into(),
    }
}

pub(crate) fn unsupported(format: &'static str, reason: impl Into<String>) -> Error {
    Error::Unsupported {
        format,
        reason: reason.into(),
    }
}

impl Error {
    /// Convert to an errno suitable for completing a guest request.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::ReadOnly => libc::EROFS,
            Error::OutOfRange { .. } | Error::InvalidArgument(_) => libc::EINVAL,
            _ => libc::EIO,
        }
    }
}
