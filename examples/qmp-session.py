#!/usr/bin/env python3
"""A QMP session written for QEMU's dirty-rate and dirty-limit commands.

Nothing here is specific to dirtyvm: pointed at a QEMU started with
`-accel kvm,dirty-ring-size=4096 -qmp unix:/tmp/qmp.sock,server=on,wait=off`, it does the
same. It follows QEMU's own test (tests/qtest/migration: vcpu_dirty_limit):

  1. negotiate capabilities;
  2. measure the VM's dirty rate for 1 s in dirty-ring mode, polling until measured;
  3. limit vCPU 0 to half of it (at least 1 MB/s);
  4. poll the limiter once a second (up to 20 times) until vCPU 0's current rate is under
     the limit plus QEMU's 25 MB/s tolerance;
  5. cancel the limit, check that none is left, and quit.

Usage: qmp-session.py SOCKET    (e.g. dirtyvm run --workload write:64M --qmp SOCKET)

Exits 0 on success; on an error reply or an unmet expectation, prints it and exits 1.
Standard library only.
"""

import sys
import time

from qmp import Qmp, QmpError

# QEMU's DIRTYLIMIT_TOLERANCE_RANGE, MB/s.
TOLERANCE = 25


def session(path):
    qmp = Qmp(path)
    qemu = qmp.version["qemu"]
    print(
        f"connected: QEMU {qemu['major']}.{qemu['minor']}.{qemu['micro']} "
        f"({qmp.version.get('package', '')})"
    )
    qmp.cmd("qmp_capabilities")

    # Measure the origin dirty rate.
    qmp.cmd("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-ring"})
    for _ in range(300):
        info = qmp.cmd("query-dirty-rate")
        if info["status"] == "measured":
            break
        time.sleep(0.05)
    else:
        raise QmpError(f"the dirty rate was not measured within 15 s: {info}")
    rate = info["dirty-rate"]
    print(f"dirty rate: {rate} MB/s over {info['calc-time']} s ({info['mode']})")
    for vcpu in info.get("vcpu-dirty-rate", []):
        print(f"  vCPU {vcpu['id']}: {vcpu['dirty-rate']} MB/s")

    # Limit vCPU 0 to half of it.
    quota = max(rate // 2, 1)
    qmp.cmd("set-vcpu-dirty-limit", **{"cpu-index": 0, "dirty-rate": quota})
    print(f"limited vCPU 0 to {quota} MB/s")
    met = False
    for _ in range(20):
        time.sleep(1)
        limits = qmp.cmd("query-vcpu-dirty-limit")
        vcpu0 = [l for l in limits if l["cpu-index"] == 0]
        if len(vcpu0) != 1 or vcpu0[0]["limit-rate"] != quota:
            raise QmpError(f"query-vcpu-dirty-limit: no limit of {quota} on vCPU 0: {limits}")
        current = vcpu0[0]["current-rate"]
        print(f"  vCPU 0: {current} MB/s (limit {quota})")
        if current < quota + TOLERANCE:
            met = True
            break
    if not met:
        raise QmpError(f"vCPU 0 stayed above {quota} + {TOLERANCE} MB/s for 20 s")

    qmp.cmd("cancel-vcpu-dirty-limit", **{"cpu-index": 0})
    left = qmp.cmd("query-vcpu-dirty-limit")
    if left != []:
        raise QmpError(f"limits left after cancel-vcpu-dirty-limit: {left}")
    print("limit cancelled")

    qmp.cmd("quit")
    print("quit")
    qmp.close()


def main():
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} QMP-SOCKET", file=sys.stderr)
        return 2
    try:
        session(sys.argv[1])
    except (QmpError, OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
