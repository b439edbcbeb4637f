//! Migration URIs in QEMU's syntax (`tcp:HOST:PORT`, `unix:PATH`) and the sockets behind
//! them.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::socket_file;

/// Where a migration goes or comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// `tcp:HOST:PORT`; `HOST` may be a name, an IPv4 address, an IPv6 address in brackets,
    /// or `0` for every address (QEMU's `tcp:0:4444`).
    Tcp { host: String, port: u16 },
    /// `unix:PATH`.
    Unix(PathBuf),
}

/// Why a URI cannot be used; the texts are QEMU's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriError(pub String);

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UriError {}

impl std::str::FromStr for MigrationUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<MigrationUri, UriError> {
        if let Some(address) = uri.strip_prefix("tcp:") {
            let bad = || UriError(format!("error parsing address '{address}'"));
            let (host, port) = match address.strip_prefix('[') {
                Some(v6) => {
                    let (host, rest) = v6.split_once(']').ok_or_else(bad)?;
                    (host, rest.strip_prefix(':').ok_or_else(bad)?)
                }
                None => address.rsplit_once(':').ok_or_else(bad)?,
            };
            if host.is_empty() {
                return Err(bad());
            }
            let port = port
                .parse()
                .map_err(|_| UriError(format!("error parsing port in address '{address}'")))?;
            return Ok(MigrationUri::Tcp {
                host: host.to_string(),
                port,
            });
        }
        if let Some(path) = uri.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(UriError(format!("error parsing address '{path}'")));
            }
            return Ok(MigrationUri::Unix(PathBuf::from(path)));
        }
        Err(UriError(format!("unknown migration protocol: {uri}")))
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUri::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl MigrationUri {
    /// The host as the socket layer wants it (`0` is every IPv4 address).
    fn host(host: &str) -> &str {
        if host == "0" {
            "0.0.0.0"
        } else {
            host
        }
    }

    /// Connects, giving up after `timeout` per address. The error is the OS's, in QEMU's
    /// words ("Failed to connect to 'HOST:PORT': ...").
    pub fn connect(&self, timeout: Duration) -> io::Result<Connection> {
        let failed = |what: String, e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("Failed to connect to '{what}': {}", os_text(&e)),
            )
        };
        match self {
            MigrationUri::Tcp { host, port } => {
                let what = format!("{host}:{port}");
                let addresses = (Self::host(host), *port)
                    .to_socket_addrs()
                    .map_err(|e| failed(what.clone(), e))?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for address in addresses {
                    match TcpStream::connect_timeout(&address, timeout) {
                        Ok(stream) => {
                            stream.set_nodelay(true)?;
                            return Ok(Connection::Tcp(stream));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(failed(what, last))
            }
            MigrationUri::Unix(path) => UnixStream::connect(path)
                .map(Connection::Unix)
                .map_err(|e| failed(path.display().to_string(), e)),
        }
    }

    /// Listens for a source. A Unix socket file left by a process that died is replaced;
    /// a live one, or any other file, is an error.
    pub fn listen(&self) -> io::Result<Listener> {
        match self {
            MigrationUri::Tcp { host, port } => {
                let listener = TcpListener::bind((Self::host(host), *port))?;
                let bound = listener.local_addr()?;
                Ok(Listener::Tcp {
                    listener,
                    address: MigrationUri::Tcp {
                        host: bound.ip().to_string(),
                        port: bound.port(),
                    },
                })
            }
            MigrationUri::Unix(path) => Ok(Listener::Unix {
                listener: socket_file::bind(path)?,
                path: path.clone(),
            }),
        }
    }
}

/// An error as the OS words it ("Connection refused"), without Rust's "(os error 111)".
pub(super) fn os_text(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// A listening socket for an incoming migration. A Unix socket's file goes with it.
#[derive(Debug)]
pub enum Listener {
    /// TCP, and the address bound (with the port the system chose for port 0).
    Tcp {
        listener: TcpListener,
        address: MigrationUri,
    },
    /// A Unix socket and its file.
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

impl Listener {
    /// Waits up to `timeout` for a connection; `None` if none came.
    pub fn accept(&self, timeout: Duration) -> io::Result<Option<Connection>> {
        let ready = |fd: std::os::fd::BorrowedFd<'_>| -> io::Result<bool> {
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
            match nix::poll::poll(
                &mut fds,
                nix::poll::PollTimeout::try_from(millis).unwrap_or(nix::poll::PollTimeout::MAX),
            ) {
                Ok(n) => Ok(n > 0),
                Err(nix::errno::Errno::EINTR) => Ok(false),
                Err(e) => Err(e.into()),
            }
        };
        use std::os::fd::AsFd;
        match self {
            Listener::Tcp { listener, .. } => {
                if !ready(listener.as_fd())? {
                    return Ok(None);
                }
                let (stream, _) = listener.accept()?;
                stream.set_nodelay(true)?;
                Ok(Some(Connection::Tcp(stream)))
            }
            Listener::Unix { listener, .. } => {
                if !ready(listener.as_fd())? {
                    return Ok(None);
                }
                Ok(Some(Connection::Unix(listener.accept()?.0)))
            }
        }
    }

    /// The address it listens on (the port the system chose for `tcp:HOST:0`).
    pub fn address(&self) -> MigrationUri {
        match self {
            Listener::Tcp { address, .. } => address.clone(),
            Listener::Unix { path, .. } => MigrationUri::Unix(path.clone()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A migration connection.
#[derive(Debug)]
pub enum Connection {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix socket.
    Unix(UnixStream),
}

impl Connection {
    /// Another handle on the same connection (one thread writes while another reads).
    pub fn try_clone(&self) -> io::Result<Connection> {
        match self {
            Connection::Tcp(s) => s.try_clone().map(Connection::Tcp),
            Connection::Unix(s) => s.try_clone().map(Connection::Unix),
        }
    }

    /// Ends both directions: a blocked reader or writer on another handle returns.
    pub fn shutdown(&self) {
        let _ = match self {
            Connection::Tcp(s) => s.shutdown(Shutdown::Both),
            Connection::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Sets how long a read may wait (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_read_timeout(timeout),
            Connection::Unix(s) => s.set_read_timeout(timeout),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.read(buf),
            Connection::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write(buf),
            Connection::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.flush(),
            Connection::Unix(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_as_qemu_reads_them() {
        let tcp = |host: &str, port| MigrationUri::Tcp {
            host: host.into(),
            port,
        };
        assert_eq!("tcp:0:4444".parse(), Ok(tcp("0", 4444)));
        assert_eq!("tcp:localhost:1".parse(), Ok(tcp("localhost", 1)));
        assert_eq!("tcp:[::1]:4444".parse(), Ok(tcp("::1", 4444)));
        assert_eq!(
            "unix:/tmp/m.sock".parse(),
            Ok(MigrationUri::Unix("/tmp/m.sock".into()))
        );
        for (uri, text) in [
            ("exec:cat", "unknown migration protocol: exec:cat"),
            ("foo:bar", "unknown migration protocol: foo:bar"),
            ("tcp:nohostport", "error parsing address 'nohostport'"),
            ("tcp::4444", "error parsing address ':4444'"),
            ("tcp:host:port", "error parsing port in address 'host:port'"),
            (
                "tcp:host:99999",
                "error parsing port in address 'host:99999'",
            ),
            ("tcp:[::1:4444", "error parsing address '[::1:4444'"),
        ] {
            assert_eq!(
                uri.parse::<MigrationUri>(),
                Err(UriError(text.into())),
                "{uri}"
            );
        }
        assert_eq!(tcp("::1", 5).to_string(), "tcp:[::1]:5");
    }

    #[test]
    fn a_refused_connection_says_so_in_qemus_words() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let e = MigrationUri::Tcp {
            host: "127.0.0.1".into(),
            port,
        }
        .connect(Duration::from_secs(2))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Failed to connect to '127.0.0.1:{port}': Connection refused")
        );
    }
}
