//! The QMP socket: one client at a time, on one thread.
//!
//! The thread polls (accept on a non-blocking listener, reads with a timeout) so that
//! [`Server::shut_down`] and [`Server::notify_shutdown`] take effect within [`POLL`] whatever
//! the client does (a client that trickles bytes forever included); a client that stops
//! reading is dropped after [`WRITE_TIMEOUT`].

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::protocol::{host_shutdown_event, Session};
use super::Backend;
use crate::socket_file;

/// How long the server thread waits for a client or for input before looking at its flags.
const POLL: Duration = Duration::from_millis(100);
/// How long a client may leave replies unread before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_millis(500);
/// Input read and discarded after the server ends a session, so that a client still
/// sending sees its reply and an orderly end of stream rather than a reset: at most this
/// much, for at most [`LINGER_TIME`], and not once the server is stopping.
const LINGER_BYTES: usize = 16 << 20;
/// See [`LINGER_BYTES`].
const LINGER_TIME: Duration = Duration::from_secs(1);

/// A QMP server on a Unix socket. Stopping it (or dropping it) joins the thread and removes
/// the socket file.
pub struct Server {
    path: PathBuf,
    /// The bound socket file's (device, inode): the file removed at stop only if it is still
    /// this one.
    socket_file: (u64, u64),
    flags: Arc<Flags>,
    thread: Option<JoinHandle<()>>,
}

/// Requests from the owner to the server thread.
#[derive(Default)]
struct Flags {
    stopping: AtomicBool,
    shutdown_pending: AtomicBool,
}

impl Server {
    /// Listens at `path` and serves clients on a thread named `qmp`. A socket file left by a
    /// process that died is replaced; a live one, or any other file, is an error.
    pub fn spawn(path: &Path, backend: Arc<dyn Backend>) -> io::Result<Server> {
        let listener = socket_file::bind(path)?;
        listener.set_nonblocking(true)?;
        let bound = fs::symlink_metadata(path)?;
        let flags = Arc::new(Flags::default());
        let thread = thread::Builder::new().name("qmp".into()).spawn({
            let flags = Arc::clone(&flags);
            move || serve(&listener, &backend, &flags)
        })?;
        Ok(Server {
            path: path.to_path_buf(),
            socket_file: (bound.dev(), bound.ino()),
            flags,
            thread: Some(thread),
        })
    }

    /// Tells the connected client, if any, that the VM is shutting down by itself (a signal
    /// or the time limit): the event QEMU sends before exiting.
    pub fn notify_shutdown(&self) {
        // Release pairs with the Acquire swap in `Flags::take_shutdown` on the server thread.
        self.flags.shutdown_pending.store(true, Ordering::Release);
    }

    /// Stops serving: the client, if any, is disconnected, after any pending SHUTDOWN event;
    /// the thread is joined and the socket file removed. Dropping the server does the same.
    pub fn shut_down(mut self) {
        self.stop_serving();
    }

    fn stop_serving(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        // Release pairs with the Acquire loads in `Flags::stopping` on the server thread.
        self.flags.stopping.store(true, Ordering::Release);
        // A server thread that panicked left nothing to clean up but the socket file.
        let _ = thread.join();
        let still_ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|file| (file.dev(), file.ino()) == self.socket_file);
        if still_ours {
            // Best effort: a file that vanished meanwhile is what we wanted anyway.
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_serving();
    }
}

impl Flags {
    fn stopping(&self) -> bool {
        // Acquire pairs with the Release store in `Server::shut_down`.
        self.stopping.load(Ordering::Acquire)
    }

    fn take_shutdown(&self) -> bool {
        // Acquire pairs with the Release store in `Server::notify_shutdown`.
        self.shutdown_pending.swap(false, Ordering::Acquire)
    }
}

/// The server thread.
fn serve(listener: &UnixListener, backend: &Arc<dyn Backend>, flags: &Flags) {
    while !flags.stopping() {
        match listener.accept() {
            Ok((client, _)) => {
                // A client's I/O error ends its session and nothing else.
                let _ = serve_client(client, backend, flags);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                // Events with no client to hear them are dropped, as QEMU's would be.
                flags.take_shutdown();
                backend.migration().take_events();
                thread::sleep(POLL);
            }
            // Out of file descriptors or the like: retry later rather than spin.
            Err(_) => thread::sleep(POLL),
        }
    }
}

fn serve_client(
    mut client: UnixStream,
    backend: &Arc<dyn Backend>,
    flags: &Flags,
) -> io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(POLL))?;
    client.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut session = Session::new(Arc::clone(backend));
    send(&mut client, &[Session::greeting()])?;
    let mut input = vec![0; 64 << 10];
    loop {
        send(&mut client, &session.pending_events())?;
        if flags.take_shutdown() {
            send(&mut client, &[host_shutdown_event()])?;
        }
        if flags.stopping() {
            return Ok(());
        }
        let read = match client.read(&mut input) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(error) if is_transient(&error) => continue,
            Err(error) => return Err(error),
        };
        let output = session.feed(&input[..read]);
        send(&mut client, &output.lines)?;
        if output.close {
            linger(client, &mut input, flags);
            return Ok(());
        }
    }
}

fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn send(client: &mut UnixStream, lines: &[String]) -> io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut wire = String::new();
    for line in lines {
        wire.push_str(line);
        wire.push_str("\r\n");
    }
    client.write_all(wire.as_bytes())
}

/// Ends a session the server chose to end: end of stream to the client, then its remaining
/// input discarded until it closes, goes quiet for [`POLL`], sends [`LINGER_BYTES`], or
/// [`LINGER_TIME`] passes, or the server is stopping.
fn linger(mut client: UnixStream, input: &mut [u8], flags: &Flags) {
    if client.shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + LINGER_TIME;
    let mut discarded = 0;
    while discarded < LINGER_BYTES && std::time::Instant::now() < deadline && !flags.stopping() {
        match client.read(input) {
            Ok(0) => return,
            Ok(read) => discarded += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
