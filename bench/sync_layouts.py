#!/usr/bin/env python3
"""What one durable batch costs in each candidate store layout, on the disk this runs on (issue #18).

Usage: python3 bench/sync_layouts.py DIR   (DIR on the disk to measure; files are left there).
Each line is appends per second, 1 KiB records, batches of 64 as group commit forms them under
load: A today (one file per queue, each synced), B a shared journal, C syncfs, D parallel syncs."""
import ctypes
import os
import sys
import threading
import time

d = sys.argv[1]
os.makedirs(d, exist_ok=True)
libc = ctypes.CDLL("libc.so.6", use_errno=True)
rec = b"x" * 1024
def files(n, tag):
    fds = [os.open(os.path.join(d, f"{tag}-{i}"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) for i in range(n)]
    return fds
def run(name, batch_fn, seconds=4.0):
    n = 0; t0 = time.time()
    while time.time() - t0 < seconds:
        n += batch_fn()
    dt = time.time() - t0
    print(f"{name}: {n/dt:,.0f} appends/s", flush=True)
# A: today's layout, 64 queues: each batch writes one record to each of 64 files and fdatasyncs each
fds = files(64, "q")
def a():
    for fd in fds: os.write(fd, rec)
    for fd in fds: os.fdatasync(fd)
    return 64
run("A per-queue files, 64 dirty per batch, 64 fdatasyncs", a)
# A2: the same, 1,000 queues: batch of 64 records to 64 of 1,000 files
fds1000 = files(1000, "r"); idx = [0]
def a2():
    chosen = [fds1000[(idx[0] + i * 15) % 1000] for i in range(64)]; idx[0] += 1
    for fd in chosen: os.write(fd, rec)
    for fd in chosen: os.fdatasync(fd)
    return 64
run("A2 per-queue files among 1,000, 64 dirty per batch", a2)
# B: shared journal: the batch's 64 records in one write to one file, one fdatasync
j = files(1, "journal")[0]
big = rec * 64
def b():
    os.write(j, big); os.fdatasync(j); return 64
run("B shared journal, 64 records per batch, 1 fdatasync", b)
# B2: shared journal, preallocated (overwrite in place, no size change)
pre = files(1, "pre")[0]
os.posix_fallocate(pre, 0, 128 * 1024 * 1024)
os.fsync(pre)
off = [0]
def b2():
    os.pwrite(pre, big, off[0]); off[0] = (off[0] + len(big)) % (120 * 1024 * 1024); os.fdatasync(pre); return 64
run("B2 shared journal preallocated, 64 records per batch, 1 fdatasync", b2)
# C: per-queue files, then one syncfs for all of them
def c():
    for fd in fds: os.write(fd, rec)
    libc.syncfs(fds[0]); return 64
run("C per-queue files, 64 dirty, one syncfs", c)
# D: per-queue files, fdatasyncs issued in parallel from 8 threads
def d_():
    for fd in fds: os.write(fd, rec)
    def worker(part):
        for fd in part: os.fdatasync(fd)
    ts = [threading.Thread(target=worker, args=(fds[i::8],)) for i in range(8)]
    [t.start() for t in ts]; [t.join() for t in ts]
    return 64
run("D per-queue files, 64 dirty, fdatasync from 8 threads", d_)
# E: one sync loop baseline
def e():
    os.write(j, rec); os.fdatasync(j); return 1
run("E one record + fdatasync loop", e)
