//! Output files created afresh and moved into place: an output path is written only when it
//! is absent or a regular file; the content goes to a new temporary file beside it (created
//! exclusively, never through an existing path) and is renamed over it when complete.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::DataError;

fn refuse(path: &Path, what: &str) -> DataError {
    DataError::Write {
        path: path.to_path_buf(),
        reason: format!(
            "{what}; outputs are written only as new or regular files: remove it or choose another path"
        ),
    }
}

/// Checks that `path` can take an output: absent, or a regular file (not a symbolic link,
/// directory, device, pipe or socket).
pub fn check_output_path(path: &Path) -> Result<(), DataError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataError::Io {
            path: path.to_path_buf(),
            source,
        }),
        Ok(m) => {
            let t = m.file_type();
            if t.is_file() {
                Ok(())
            } else if t.is_symlink() {
                Err(refuse(path, "is a symbolic link"))
            } else if t.is_dir() {
                Err(refuse(path, "is a directory"))
            } else {
                Err(refuse(
                    path,
                    "is not a regular file (a device, pipe or socket)",
                ))
            }
        }
    }
}

/// Creates a new temporary file `<path>.tmp` beside `path` after checking `path` with
/// [`check_output_path`]; a stale one (left by a killed process) is removed first, and the
/// file is created exclusively, never opened through an existing link. Returns it with its
/// path.
pub fn create_temp_beside(path: &Path) -> Result<(File, PathBuf), DataError> {
    check_output_path(path)?;
    if path.file_name().is_none() {
        return Err(refuse(path, "names no file"));
    }
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    if let Ok(m) = std::fs::symlink_metadata(&tmp) {
        if m.is_dir() {
            return Err(refuse(&tmp, "is a directory"));
        }
        std::fs::remove_file(&tmp).map_err(|source| DataError::Io {
            path: tmp.clone(),
            source,
        })?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|source| DataError::Io {
            path: tmp.clone(),
            source,
        })?;
    Ok((file, tmp))
}

/// Moves the complete temporary file `tmp` to `path` (checked again with
/// [`check_output_path`]); `tmp` is removed when this fails.
pub fn move_into_place(tmp: &Path, path: &Path) -> Result<(), DataError> {
    let moved = check_output_path(path).and_then(|()| {
        std::fs::rename(tmp, path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })
    });
    if moved.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    moved
}

/// Writes `bytes` to `path` through a temporary file beside it, fsynced and renamed into
/// place; nothing is left behind on failure.
pub fn write_output(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    use std::io::Write;
    let (mut file, tmp) = create_temp_beside(path)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| DataError::Io {
            path: tmp.clone(),
            source,
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    move_into_place(&tmp, path)
}

/// Checks, before any work, that the directory `dir` can take outputs: it is a directory (or
/// absent with a parent where it can be created) and a file can be created in it. Leaves
/// nothing behind: a directory created for the check is removed again.
pub fn check_output_dir(dir: &Path) -> Result<(), DataError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataError::Io { path, source }
    };
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(m) if m.file_type().is_symlink() && dir.is_dir() => {}
        Ok(_) => return Err(refuse(dir, "exists and is not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Created and removed again: a failed run leaves no empty directory.
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            let probe = check_output_dir(dir);
            let _ = std::fs::remove_dir(dir);
            return probe;
        }
        Err(e) => return Err(io(dir)(e)),
    }
    let probe = dir.join(format!(".write-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(io(dir))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_links_directories_and_devices_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = write_output(&link, b"x").unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let e = write_output(dir.path(), b"x").unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
        if Path::new("/dev/null").exists() {
            let e = check_output_path(Path::new("/dev/null"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
        let out = dir.path().join("out.bin");
        write_output(&out, b"one").unwrap();
        write_output(&out, b"two").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"two");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn an_output_directory_is_checked_without_leaving_one_behind() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("a/b");
        check_output_dir(&new).unwrap();
        assert!(!new.exists());
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let e = check_output_dir(&file).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let e = check_output_dir(&file.join("sub")).unwrap_err().to_string();
        assert!(e.contains("f"), "{e}");
    }
}
