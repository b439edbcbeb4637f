"""A minimal QMP client for the example sessions: one JSON object per line, events kept.

Standard library only; `from qmp import Qmp, QmpError` in a script beside it.
"""

import json
import socket


class QmpError(Exception):
    pass


class Qmp:
    """A connection to a QMP server: the greeting read, capabilities not yet negotiated."""

    def __init__(self, path, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rw", encoding="utf-8", newline="")
        # Events that came before replies, oldest first.
        self.events = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.version = greeting["QMP"]["version"]

    def _read(self):
        line = self.file.readline()
        if not line:
            raise QmpError("the server closed the connection")
        return json.loads(line)

    def cmd(self, name, **arguments):
        """Runs `name` and returns its reply's `return`; an error reply raises QmpError."""
        request = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self.file.write(json.dumps(request) + "\r\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                error = reply["error"]
                raise QmpError(f"{name}: {error['class']}: {error['desc']}")
            return reply["return"]

    def close(self):
        self.file.close()
        self.sock.close()
