#!/usr/bin/env python3
"""Prints the CPU seconds (user + system) and resident memory of a process and all its
descendants (of several, summed: a cluster's nodes), as one JSON object: {"cpu_s": ..., "rss_mib": ...}. Used by bench/compare.sh to
sample each broker (Wharf is one process; RabbitMQ is beam.smp under a shell script, plus helpers).
"""
import json
import os
import sys


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def tree(pid):
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        pending.extend(children(current))
    return pids


def sample(pid):
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    cpu_ticks, rss_pages = 0, 0
    for member in tree(pid):
        try:
            with open(f"/proc/{member}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            # After the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14) ... rss(21)
            cpu_ticks += int(fields[11]) + int(fields[12])
            rss_pages += int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
    return {"cpu_s": cpu_ticks / ticks, "rss_mib": rss_pages * page / 2**20}


if __name__ == "__main__":
    samples = [sample(int(pid)) for pid in sys.argv[1:]]
    print(json.dumps({key: sum(each[key] for each in samples) for key in ("cpu_s", "rss_mib")}))
