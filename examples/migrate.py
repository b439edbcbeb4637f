#!/usr/bin/env python3
"""A live migration driven over QMP, the way one drives QEMU's.

Nothing here is specific to dirtyvm: pointed at two QEMUs (the destination started with
`-incoming tcp:0:4444`), it does the same.

  1. negotiate capabilities on the source, turn on the `events` capability and, if asked,
     set `max-bandwidth` and `downtime-limit`;
  2. `migrate` to the destination's URI;
  3. poll `query-migrate` once a second, printing a progress line, until the migration is
     `completed`, `failed` or `cancelled`;
  4. print the final `query-migrate` and the MIGRATION events seen; with the destination's
     QMP socket, check that the guest runs there;
  5. with --quit, quit both.

Usage: migrate.py SOURCE_QMP URI [--dest-qmp DEST_QMP] [--max-bandwidth BYTES_PER_S]
                  [--downtime-limit MS] [--quit]

Exits 0 when the migration completed (and the destination runs the guest); otherwise prints
why and exits 1. Standard library only.
"""

import argparse
import json
import sys
import time

from qmp import Qmp, QmpError


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source_qmp")
    parser.add_argument("uri")
    parser.add_argument("--dest-qmp")
    parser.add_argument("--max-bandwidth", type=int)
    parser.add_argument("--downtime-limit", type=int)
    parser.add_argument("--quit", action="store_true")
    args = parser.parse_args()

    source = Qmp(args.source_qmp)
    source.cmd("qmp_capabilities")
    source.cmd(
        "migrate-set-capabilities",
        capabilities=[{"capability": "events", "state": True}],
    )
    parameters = {}
    if args.max_bandwidth is not None:
        parameters["max-bandwidth"] = args.max_bandwidth
    if args.downtime_limit is not None:
        parameters["downtime-limit"] = args.downtime_limit
    if parameters:
        source.cmd("migrate-set-parameters", **parameters)
    source.cmd("migrate", uri=args.uri)
    while True:
        info = source.cmd("query-migrate")
        status = info.get("status")
        if status in ("completed", "failed", "cancelled"):
            break
        ram = info.get("ram", {})
        print(
            f"{status}: {info.get('total-time', 0)} ms, "
            f"{ram.get('transferred', 0) / 2**20:.1f} MiB sent, "
            f"{ram.get('remaining', 0) / 2**20:.1f} MiB remaining, "
            f"{ram.get('mbps', 0):.0f} Mbit/s, pass {ram.get('dirty-sync-count', 0)}, "
            f"expected downtime {info.get('expected-downtime', '-')} ms",
            flush=True,
        )
        time.sleep(1)
    print("query-migrate:", json.dumps(info))
    seen = [e["data"]["status"] for e in source.events if e["event"] == "MIGRATION"]
    print("MIGRATION events:", " ".join(seen))
    ok = status == "completed"
    if not ok:
        print(f"migration {status}: {info.get('error-desc', 'no reason given')}")
    if args.dest_qmp:
        destination = Qmp(args.dest_qmp)
        destination.cmd("qmp_capabilities")
        run_state = destination.cmd("query-status")["status"]
        print("destination:", run_state)
        ok = ok and run_state == "running"
        if args.quit:
            destination.cmd("quit")
    if args.quit:
        source.cmd("quit")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (QmpError, OSError) as error:
        print(f"migrate.py: {error}", file=sys.stderr)
        sys.exit(1)
