//! The files a user names for dirtyvm to write (`--report`, `--plot`): checked before the VM
//! boots, and written without ever replacing what is not a regular file.
//!
//! - A new path, or a regular file (also through symlinks, which stay symlinks), is replaced
//!   atomically: the content goes to a temporary file created exclusively, with an
//!   unpredictable name, in the same directory, and is renamed over the file. A reader sees
//!   the old file or the new one, never half of one, and nothing else in the directory is
//!   touched.
//! - A character device (`/dev/null`, a terminal) or a FIFO is written through: opened for
//!   writing, never created, truncated or replaced. A FIFO nobody reads is an error, not a
//!   hang.
//! - Anything else (a directory, a socket, a block device, a dangling symlink, a path with a
//!   trailing slash) is refused before the run, with the reason.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::BuildHasher;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A checked output path.
#[derive(Debug, Clone)]
pub struct OutputFile {
    /// The path as the user gave it.
    path: PathBuf,
    how: How,
}

#[derive(Debug, Clone)]
enum How {
    /// Replace this file (symlinks resolved) atomically.
    Replace(PathBuf),
    /// Write into this device or FIFO.
    WriteThrough { fifo: bool },
}

/// Why an output path cannot be used; `Display` names the option, the path and the reason.
#[derive(Debug)]
pub struct OutputError {
    option: &'static str,
    path: PathBuf,
    reason: String,
}

impl fmt::Display for OutputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.option,
            self.path.display(),
            self.reason
        )
    }
}

impl std::error::Error for OutputError {}

impl OutputFile {
    /// Checks that `path`, given with `option`, can be written at the end of the run.
    pub fn check(option: &'static str, path: &Path) -> Result<OutputFile, OutputError> {
        let refuse = |reason: String| OutputError {
            option,
            path: path.to_path_buf(),
            reason,
        };
        if path.as_os_str().is_empty() {
            return Err(refuse("the path is empty".into()));
        }
        if path.as_os_str().as_encoded_bytes().ends_with(b"/") {
            return Err(refuse(
                "a path ending in '/' names a directory; give a file name".into(),
            ));
        }
        let how = match fs::metadata(path) {
            Ok(meta) => {
                let kind = meta.file_type();
                if kind.is_file() {
                    let target = fs::canonicalize(path)
                        .map_err(|e| refuse(format!("cannot resolve it: {e}")))?;
                    How::Replace(target)
                } else if kind.is_char_device() || kind.is_fifo() {
                    How::WriteThrough {
                        fifo: kind.is_fifo(),
                    }
                } else {
                    let what = if kind.is_dir() {
                        "a directory"
                    } else if kind.is_socket() {
                        "a socket"
                    } else if kind.is_block_device() {
                        "a block device"
                    } else {
                        "not a regular file"
                    };
                    return Err(refuse(format!(
                        "is {what}; give a regular file, a new path, a character device or a \
                         FIFO"
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if fs::symlink_metadata(path).is_ok() {
                    return Err(refuse(
                        "is a symlink to a file that does not exist; dirtyvm does not create \
                         files through symlinks"
                            .into(),
                    ));
                }
                How::Replace(path.to_path_buf())
            }
            Err(e) => return Err(refuse(format!("cannot look at it: {e}"))),
        };
        if let How::Replace(target) = &how {
            // Prove the directory takes a new file now, rather than after the run.
            let dir = parent(target);
            match fs::metadata(&dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(refuse(format!("{} is not a directory", dir.display())));
                }
                Err(e) => {
                    return Err(refuse(format!("directory {}: {e}", dir.display())));
                }
            }
            let (probe, _) = create_temporary(target)
                .map_err(|e| refuse(format!("cannot create a file in {}: {e}", dir.display())))?;
            let _ = fs::remove_file(probe);
        }
        Ok(OutputFile {
            path: path.to_path_buf(),
            how,
        })
    }

    /// The path as the user gave it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `content` as the module docs say.
    pub fn write(&self, content: &[u8]) -> io::Result<()> {
        match &self.how {
            How::Replace(target) => replace(target, content),
            How::WriteThrough { fifo } => write_through(&self.path, *fifo, content),
        }
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates a new file beside `target`, exclusively, under a name nobody can predict.
fn create_temporary(target: &Path) -> io::Result<(PathBuf, File)> {
    let name = target.file_name().unwrap_or_default();
    let random = std::collections::hash_map::RandomState::new();
    for attempt in 0u32.. {
        let mut temp = OsString::from(".");
        temp.push(name);
        temp.push(format!(
            ".{:016x}.tmp",
            random.hash_one((std::process::id(), attempt))
        ));
        let temp = parent(target).join(temp);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp)
        {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => continue,
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns")
}

fn replace(target: &Path, content: &[u8]) -> io::Result<()> {
    let (temp, mut file) = create_temporary(target)?;
    let written = (|| {
        if let Ok(meta) = fs::metadata(target) {
            // The new file keeps the permissions of the one it replaces.
            file.set_permissions(fs::Permissions::from_mode(meta.permissions().mode()))?;
        }
        file.write_all(content)?;
        file.sync_all()?;
        fs::rename(&temp, target)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

fn write_through(path: &Path, fifo: bool, content: &[u8]) -> io::Result<()> {
    // A FIFO opened for writing blocks until someone reads; non-blocking, it fails at once
    // when nobody does.
    let flags = if fifo { libc::O_NONBLOCK } else { 0 };
    let mut file = OpenOptions::new()
        .write(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => io::Error::other("no process is reading the FIFO"),
            _ => e,
        })?;
    if fifo {
        // The reader is there: write at its pace from now on.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )?;
    }
    file.write_all(content)?;
    file.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("dirtyvm-output-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn entries(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn new_and_regular_files_are_replaced_and_nothing_is_left_behind() {
        let dir = Dir::new("replace");
        let path = dir.0.join("r.json");
        let out = OutputFile::check("--report", &path).unwrap();
        assert!(
            dir.entries().is_empty(),
            "the check left {:?}",
            dir.entries()
        );
        out.write(b"one").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        out.write(b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(dir.entries(), ["r.json"]);
    }

    #[test]
    fn a_symlink_stays_a_symlink_and_its_target_is_replaced() {
        let dir = Dir::new("symlink");
        let target = dir.0.join("real.json");
        fs::write(&target, "old").unwrap();
        let link = dir.0.join("link.json");
        symlink(&target, &link).unwrap();
        OutputFile::check("--report", &link)
            .unwrap()
            .write(b"new")
            .unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(dir.entries(), ["link.json", "real.json"]);

        let dangling = dir.0.join("dangling.json");
        symlink(dir.0.join("missing"), &dangling).unwrap();
        let e = OutputFile::check("--report", &dangling).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn devices_are_written_through_and_never_replaced() {
        let null = OutputFile::check("--report", Path::new("/dev/null")).unwrap();
        null.write(b"report").unwrap();
        assert!(fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
        let full = OutputFile::check("--report", Path::new("/dev/full")).unwrap();
        let e = full.write(b"report").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(fs::metadata("/dev/full")
            .unwrap()
            .file_type()
            .is_char_device());
    }

    #[test]
    fn a_fifo_is_written_through_or_refused_when_nobody_reads() {
        let dir = Dir::new("fifo");
        let fifo = dir.0.join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let out = OutputFile::check("--report", &fifo).unwrap();
        let e = out.write(b"nobody").unwrap_err();
        assert!(e.to_string().contains("reading the FIFO"), "{e}");
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || fs::read(fifo).unwrap())
        };
        // Wait for the reader to open its end.
        let mut result = out.write(b"somebody");
        for _ in 0..200 {
            if result.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            result = out.write(b"somebody");
        }
        result.unwrap();
        assert_eq!(reader.join().unwrap(), b"somebody");
        assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
    }

    #[test]
    fn directories_sockets_and_missing_directories_are_refused() {
        let dir = Dir::new("refuse");
        fs::write(dir.0.join("file"), "").unwrap();
        let cases = [
            (dir.0.clone(), "is a directory"),
            (dir.0.join("sub/"), "ending in '/'"),
            (dir.0.join("missing/r.json"), "No such file"),
            (dir.0.join("file/r.json"), "Not a directory"),
            (PathBuf::new(), "empty"),
        ];
        for (path, reason) in cases {
            let e = OutputFile::check("--report", &path).unwrap_err();
            let text = e.to_string();
            assert!(
                text.starts_with("--report") && text.contains(reason),
                "{}: {text}",
                path.display()
            );
        }
        let socket = dir.0.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let e = OutputFile::check("--plot", &socket).unwrap_err();
        assert!(e.to_string().contains("is a socket"), "{e}");
        assert_eq!(dir.entries(), ["file", "sock"]);
    }
}
