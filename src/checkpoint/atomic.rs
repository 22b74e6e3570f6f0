//! Output directories that appear only when complete, for every command that writes a model
//! (`quantize`, `import`).
use crate::error::{Error, Result};
use serde_json::Value;

/// An output directory that appears only when complete: files go to a hidden temporary directory
/// beside the target, which [`AtomicDir::commit`] renames into place. Dropped uncommitted, the
/// temporary directory is removed, so a failure never leaves a half-written checkpoint. A process
/// killed outright (SIGKILL, power loss) cannot clean up: its temporary directory carries its
/// process id, and the next `AtomicDir` for the same target removes those of dead processes.
pub struct AtomicDir {
    target: std::path::PathBuf,
    tmp: Option<tempfile::TempDir>,
}

/// `.{name}.tmp-` (then the owner's pid, `-` and a random suffix).
fn tmp_prefix(name: &str) -> String {
    format!(".{name}.tmp-")
}

/// Whether process `pid` is alive (on Unix; elsewhere every owner counts as alive).
fn alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the temporary directories (and `.old` copies) that dead processes left for `name` in
/// `parent`; entries of live processes, and any without a pid, stay.
fn remove_stale(parent: &std::path::Path, name: &str) {
    let prefix = tmp_prefix(name);
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().to_string();
        let Some(rest) = file.strip_prefix(&prefix) else { continue };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| p != std::process::id() && !alive(p)) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl AtomicDir {
    /// Refuses an existing `target` unless `force`. Fails at once where the target's directory
    /// cannot be created or written, before any work is done.
    pub fn new(target: &std::path::Path, force: bool) -> Result<Self> {
        if target.exists() && !force {
            return Err(Error::msg(format!("{} already exists (use --force to replace it)", target.display())));
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        if parent.exists() && !parent.is_dir() {
            return Err(Error::msg(format!("cannot create the output's directory {}: it is a file, not a directory", parent.display())));
        }
        std::fs::create_dir_all(&parent).map_err(|e| Error::msg(format!("cannot create the output's directory {}: {e}", parent.display())))?;
        let name = target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        remove_stale(&parent, &name);
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}{}-", tmp_prefix(&name), std::process::id()))
            .tempdir_in(&parent)
            .map_err(|e| Error::msg(format!("cannot write into the output's directory {}: {e}", parent.display())))?;
        Ok(Self { target: target.to_path_buf(), tmp: Some(tmp) })
    }

    /// Where to write the files.
    pub fn path(&self) -> &std::path::Path {
        self.tmp.as_ref().map(|t| t.path()).expect("AtomicDir used after commit")
    }

    pub fn write_json(&self, name: &str, v: &Value) -> Result<()> {
        let p = self.path().join(name);
        let s = serde_json::to_string_pretty(v).map_err(|e| Error::msg(e.to_string()))?;
        std::fs::write(&p, s + "\n").map_err(|e| Error::io(&p, e))
    }

    /// Moves the finished directory into place (replacing an old one, with --force).
    pub fn commit(mut self) -> Result<std::path::PathBuf> {
        let tmp = self.tmp.take().expect("AtomicDir committed twice").keep();
        // Temporary directories are created private (0700); a checkpoint is an ordinary directory.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755));
            for entry in std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))?.flatten() {
                let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644));
            }
        }
        if self.target.exists() {
            // Named after the temporary directory, so that a process killed between the two
            // renames leaves something `remove_stale` recognizes.
            let mut old = tmp.clone().into_os_string();
            old.push(".old");
            let old = std::path::PathBuf::from(old);
            std::fs::rename(&self.target, &old).map_err(|e| Error::io(&self.target, e))?;
            std::fs::rename(&tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        }
        Ok(self.target.clone())
    }
}

/// Refuses an output directory inside the model directory (it would be read while written).
pub fn check_out_dir(out: &std::path::Path, model_dir: Option<&std::path::Path>) -> Result<()> {
    let Some(model_dir) = model_dir else { return Ok(()) };
    let abs = |p: &std::path::Path| -> std::path::PathBuf {
        // The output may not exist yet: resolve its nearest existing ancestor.
        let mut existing = p.to_path_buf();
        let mut tail = Vec::new();
        while !existing.exists() {
            match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
                (Some(n), Some(parent)) => {
                    tail.push(n);
                    existing = if parent.as_os_str().is_empty() { ".".into() } else { parent.to_path_buf() };
                }
                _ => break,
            }
        }
        let mut r = existing.canonicalize().unwrap_or(existing);
        r.extend(tail.into_iter().rev());
        r
    };
    let (o, m) = (abs(out), abs(model_dir));
    if o.starts_with(&m) {
        return Err(Error::msg(format!(
            "--out {} is inside the model directory {}; choose a directory outside it",
            out.display(),
            model_dir.display()
        )));
    }
    Ok(())
}

