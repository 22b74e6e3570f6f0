//! The library's error type. Every variant carries enough context (file, tensor, layer, flag) for
//! the user to find what is wrong without a backtrace.
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Msg(String),
    /// A reply's grammar failed (structured output): it fails that reply, not its batch.
    #[error("{0}")]
    Grammar(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn msg(s: impl Into<String>) -> Self {
        Error::Msg(s.into())
    }
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }
}

/// Shorthand for `Err(Error::Msg(format!(...)))`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::Msg(format!($($arg)*))) };
}

/// Reads a file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads and parses a JSON file, naming it in the error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

/// A temporary file in `path`'s directory, for [`persist_file`] to rename onto `path` once its
/// content is complete. Creating it early tells whether the location can be written before any
/// long work; dropped unpersisted, it disappears and leaves nothing at `path`.
pub fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(path, e))
}

/// Writes `bytes` into `tmp` (from [`temp_beside`]) and renames it onto `path`: readers see the
/// old file or the whole new one, never a part.
pub fn persist_file(mut tmp: tempfile::NamedTempFile, path: &Path, bytes: &[u8]) -> Result<()> {
    std::io::Write::write_all(&mut tmp, bytes).map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

thread_local! {
    /// Set while [`catch_panic`] runs its closure: the panic hook stays quiet for it.
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic inside it into `Err(message)` without the panic hook printing it.
/// For third-party parsers that panic on some malformed inputs instead of returning an error
/// (the tokenizers crate does on a few tokenizer.json shapes): the user gets one clear error
/// naming the file instead of a backtrace. Other threads' panics are reported as before.
pub fn catch_panic<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> std::result::Result<R, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(|c| c.get()) {
                previous(info);
            }
        }));
    });
    let was = CATCHING.with(|c| c.replace(true));
    let r = std::panic::catch_unwind(f);
    CATCHING.with(|c| c.set(was));
    r.map_err(|p| {
        p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn catch_panic_turns_a_panic_into_its_message() {
        assert_eq!(super::catch_panic(|| 3), Ok(3));
        assert_eq!(super::catch_panic(|| -> u8 { panic!("bad {}", 1) }), Err("bad 1".to_string()));
        assert_eq!(super::catch_panic(|| -> u8 { panic!("static") }), Err("static".to_string()));
    }
}
