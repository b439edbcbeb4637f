//! Unix socket files a process listens on (QMP's, an incoming migration's): a file left by a
//! process that died is replaced; a live socket, or any other file, is never touched.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Checks that a server can listen at `path` (see [`bind`]), without touching it; the error
/// says why not, without repeating the path.
pub fn check_path(path: &Path) -> io::Result<()> {
    let invalid = |reason: String| io::Error::new(io::ErrorKind::InvalidInput, reason);
    let length = path.as_os_str().len();
    if length == 0 {
        return Err(invalid("the path is empty".into()));
    }
    if length > MAX_SOCKET_PATH {
        return Err(invalid(format!(
            "the path is {length} bytes long; a Unix socket path holds at most \
             {MAX_SOCKET_PATH} (use a shorter path or a relative one)"
        )));
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(invalid(format!("{} is not a directory", dir.display()))),
        Err(e) => return Err(invalid(format!("directory {}: {e}", dir.display()))),
    }
    match in_use(path)? {
        false => Ok(()),
        true => Err(in_use_error()),
    }
}

fn in_use_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        "another process listens there: stop it or choose another path",
    )
}

/// Whether a live server listens at `path`: false for nothing there or a socket left by a
/// process that died; an error, saying what is there, for any other file.
pub fn in_use(path: &Path) -> io::Result<bool> {
    let file = match fs::symlink_metadata(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    if !file.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is there: remove it or choose another path",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => Ok(false),
        Err(error) => Err(io::Error::new(
            error.kind(),
            format!("cannot tell whether the socket there is in use: {error}"),
        )),
    }
}

/// Listens at `path`, replacing a socket file nobody listens on; anything [`check_path`]
/// refuses is an error.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    check_path(path)?;
    if fs::symlink_metadata(path).is_ok() {
        fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}
