"""Prints N distinct free loopback ports (default 1), for scripts that start servers whose
addresses must be known before they start (cluster members name each other).

The ports are taken below the kernel's ephemeral range: a port found by binding port 0 lies in
that range and, once released, can be taken by any outgoing connection made meanwhile (a node
dialling its peers), so the server meant to bind it would fail with "address in use".
"""
import random
import socket
import sys

count = int(sys.argv[1]) if len(sys.argv) > 1 else 1
with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
    ephemeral_first = int(ranges.read().split()[0])
held = []
for port in random.sample(range(10000, max(ephemeral_first, 11000)), 1000):
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))
    except OSError:
        probe.close()
        continue
    held.append(probe)
    if len(held) == count:
        break
if len(held) < count:
    sys.exit(f"free_ports.py: found only {len(held)} of {count} free ports")
print(" ".join(str(probe.getsockname()[1]) for probe in held))
for probe in held:
    probe.close()
