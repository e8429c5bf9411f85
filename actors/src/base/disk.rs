//! Free space on the state folder's file system and the reserve the daemon keeps free.
//!
//! sled cannot be trusted once a write has failed for lack of space: its error is sticky until
//! the database is reopened, and a flush can block. So the daemon never lets it get there: it
//! checks the free space before storing a delivery and before writing a checkpoint, and stops
//! consuming while less than `state.min_free_bytes` is free (the messages wait in the broker;
//! consumption resumes when space returns).

use crate::base::error::{Error, Result};

use std::path::Path;

/// Environment variable naming a file that, while it exists, holds the number of free bytes to
/// report instead of the file system's: the fault-injection hook of the disk-space tests
/// (unset in production).
pub const FAULT_FREE_BYTES_ENV: &str = "PLIP_FAULT_FREE_BYTES_FILE";

/// Bytes available to an unprivileged writer on the file system holding `path`.
///
/// # Errors
/// `statvfs` failed (no such path).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    if let Some(f) = std::env::var_os(FAULT_FREE_BYTES_ENV) {
        if let Ok(text) = std::fs::read_to_string(&f) {
            if let Ok(n) = text.trim().parse::<u64>() {
                return Ok(n);
            }
        }
    }
    statvfs_free(path)
}

#[cfg(unix)]
fn statvfs_free(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `s` a buffer of the right type for statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let s = unsafe { s.assume_init() };
    #[allow(clippy::unnecessary_cast)]
    Ok((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
}

#[cfg(not(unix))]
fn statvfs_free(_path: &Path) -> std::io::Result<u64> {
    Ok(u64::MAX)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// `Ok` when at least `reserve + need` bytes are free on the file system holding `dir`.
///
/// # Errors
/// What is free against what is needed, naming the setting; or the free space is unknown.
pub fn check(dir: &Path, reserve: u64, need: u64) -> Result<()> {
    let free = free_bytes(dir).map_err(|e| {
        Error::Storage(format!(
            "cannot read the free space of {}: {e}",
            dir.display()
        ))
    })?;
    if free < reserve.saturating_add(need) {
        return Err(Error::Storage(if need == 0 {
            format!(
                "disk space low: {} free on the state folder's file system, below the reserve of {} (state.min_free_bytes)",
                mib(free),
                mib(reserve)
            )
        } else {
            format!(
                "disk space low: {} free on the state folder's file system; {} needed above the reserve of {} (state.min_free_bytes)",
                mib(free),
                mib(need),
                mib(reserve)
            )
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_free_space_and_compares_it_with_the_reserve() {
        let dir = std::env::temp_dir();
        let free = super::statvfs_free(&dir).unwrap();
        assert!(free > 0);
        assert!(super::check(&dir, 0, 0).is_ok());
        let e = super::check(&dir, u64::MAX / 2, 0).unwrap_err().to_string();
        assert!(e.contains("state.min_free_bytes"), "{e}");
        assert!(super::statvfs_free(std::path::Path::new("/no/such/dir")).is_err());
    }
}
