//! A run folder is owned by one process at a time: an exclusive lock on `DIR/.lock`
//! (`flock` semantics, so the kernel drops it when its process dies: a killed run leaves no
//! lock that blocks its rerun).

use anyhow::{anyhow, Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The lock file's name inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive hold on a run folder, released on drop (or when the process dies).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    dir: PathBuf,
}

/// Why a folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds it.
    #[error("{dir} is being written by another flowmatch process ({holder}); wait for it to finish, or choose another name or --out")]
    Busy { dir: String, holder: String },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {dir}: {msg}")]
    Io { dir: String, msg: String },
    /// The folder is a symbolic link that flowmatch did not create.
    #[error("{0}")]
    Link(#[from] LinkError),
}

/// A path flowmatch would write or delete through is a symbolic link it did not create.
#[derive(Debug, thiserror::Error)]
#[error("{0} is a symbolic link; flowmatch never writes or deletes through a link it did not create: remove the link, or choose another name or --out")]
pub struct LinkError(pub String);

/// Refuses `path` when it is a symbolic link (a missing path is fine: it will be created as
/// a real folder). Only the folders flowmatch makes are checked: `--out` itself may be a link.
pub fn refuse_link(path: &Path) -> Result<(), LinkError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(LinkError(path.display().to_string())),
        _ => Ok(()),
    }
}

/// Opens (creating it) the lock file `path`, never through a symbolic link.
fn open_lock_file(path: &Path) -> std::io::Result<File> {
    if let Err(e) = refuse_link(path) {
        return Err(std::io::Error::other(e));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        // Never through a link planted after the check above.
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Who holds a lock file, as written in it ("a process that is starting" when empty).
fn holder_of(file: &mut File) -> String {
    let mut holder = String::new();
    let _ = file.read_to_string(&mut holder);
    match holder.trim() {
        "" => "a process that is starting".into(),
        h => h.to_string(),
    }
}

/// Writes who holds a lock file, for the error another process prints.
fn write_holder(file: &mut File, who: &str) {
    let _ = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(who.as_bytes()));
}

impl RunLock {
    /// Creates `dir` if needed and takes its lock, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io = |e: std::io::Error| LockError::Io {
            dir: dir.display().to_string(),
            msg: e.to_string(),
        };
        refuse_link(dir)?;
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock_path = dir.join(LOCK_FILE);
        refuse_link(&lock_path)?;
        let mut file = open_lock_file(&lock_path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Busy {
                    dir: dir.display().to_string(),
                    holder: holder_of(&mut file),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // Who holds it, for the error another process prints.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let me = if host.is_empty() {
            format!("pid {}", std::process::id())
        } else {
            format!("pid {} on {host}", std::process::id())
        };
        write_holder(&mut file, &me);
        Ok(Self {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }

    /// The folder held.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A sweep folder shared by the processes (shards) that run one plan: each holds a shared
/// lock on `.sweep-FINGERPRINT.lock` while it runs, so that a sweep of another plan started
/// into the same folder meanwhile is refused instead of mixing its runs in.
#[derive(Debug)]
pub struct SweepClaim {
    _file: File,
}

impl SweepClaim {
    /// Joins the sweep folder `dir` for the plan `fingerprint` (described as `who`, e.g. the
    /// sweep file): an error names the other plan when a live process runs one there.
    pub fn join(dir: &Path, fingerprint: &str, who: &str) -> Result<Self> {
        refuse_link(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let open = |p: &Path| -> Result<File> {
            open_lock_file(p).with_context(|| format!("cannot lock {}", p.display()))
        };
        // Checking the others and joining is one step: a short exclusive lock on the folder.
        let gate = open(&dir.join(".sweep.lock"))?;
        gate.lock()
            .with_context(|| format!("cannot lock {}", dir.display()))?;
        let mine_name = format!(".sweep-{fingerprint}.lock");
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with(".sweep-") || !name.ends_with(".lock") || name == mine_name {
                continue;
            }
            let mut other = open(&e.path())?;
            match other.try_lock() {
                Ok(()) => {
                    // Left by a process that has ended.
                    drop(other);
                    let _ = std::fs::remove_file(e.path());
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(anyhow!(
                        "{} is in use by a sweep of another plan ({}); this one ({who}) differs from it: wait for it to finish, or give one of them another name or --out",
                        dir.display(),
                        holder_of(&mut other)
                    ));
                }
                Err(TryLockError::Error(err)) => {
                    return Err(anyhow!("cannot lock {}: {err}", e.path().display()))
                }
            }
        }
        let mut file = open(&dir.join(&mine_name))?;
        file.lock_shared()
            .with_context(|| format!("cannot lock {}", dir.display()))?;
        write_holder(&mut file, &format!("{who}, pid {}", std::process::id()));
        drop(gate);
        Ok(Self { _file: file })
    }
}

/// Empties a run folder (one this process holds, or a folder inside one), but for its lock
/// file: for a run that is redone.
pub fn clear(dir: &Path) -> Result<()> {
    refuse_link(dir)?;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if e.file_name() == LOCK_FILE {
            continue;
        }
        let p = e.path();
        let gone = if e.file_type()?.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        gone.map_err(|err| anyhow!("removing {}: {err}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_folder_is_refused_and_freed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let held = RunLock::acquire(&dir).unwrap();
        let e = RunLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            e.contains("another flowmatch process")
                && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(held);
        // The lock file stays, but it no longer holds anyone off.
        assert!(dir.join(LOCK_FILE).is_file());
        let again = RunLock::acquire(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"x").unwrap();
        std::fs::create_dir(dir.join("rf1")).unwrap();
        clear(again.dir()).unwrap();
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].file_name(), LOCK_FILE);
    }
}
