#!/usr/bin/env python3
"""Reads the JSON lines bench/compare.sh wrote (one per scenario, target and round) and prints a
Markdown table of medians per figure, with Wharf's ratio to RabbitMQ classic and quorum, and when
the run had a "baseline" target (another Wharf build), a before/after table of the two builds."""
import json
import statistics
import sys
from collections import defaultdict

# (scenario, metric, label, higher is better)
FIGURES = [
    ("S1", "msgs_per_s", "S1 throughput: confirmed (msgs/s)", True),
    ("S1", "e2e_msgs_per_s", "S1 throughput: consumed end to end (msgs/s)", True),
    ("S1", "cpu_us_per_msg", "S1 broker CPU per message (µs)", False),
    ("S1", "e2e_p99_ms", "S1 end-to-end p99 (ms)", False),
    ("S2", "msgs_per_s", "S2 throughput: confirmed (msgs/s)", True),
    ("S2", "e2e_msgs_per_s", "S2 throughput: consumed end to end (msgs/s)", True),
    ("S2", "cpu_us_per_msg", "S2 broker CPU per message (µs)", False),
    ("S3", "msgs_per_s", "S3 fan-out publishes: confirmed (msgs/s)", True),
    ("S3", "e2e_msgs_per_s", "S3 fan-out publishes: consumed by all 3 (msgs/s)", True),
    ("S3", "cpu_us_per_msg", "S3 broker CPU per publish (µs)", False),
    ("S4", "e2e_p50_ms", "S4 end-to-end p50 at 2,000/s (ms)", False),
    ("S4", "e2e_p99_ms", "S4 end-to-end p99 at 2,000/s (ms)", False),
    ("S4", "cpu_us_per_msg", "S4 broker CPU per message at 2,000/s (µs)", False),
    ("S5", "publish_msgs_per_s", "S5 backlog publish (msgs/s)", True),
    ("S5", "rss_mib", "S5 RSS with the backlog (MiB)", False),
    ("S5", "serving_after_s", "S5 serving again after restart (s)", False),
    ("S5", "drain_msgs_per_s", "S5 drain after restart (msgs/s)", True),
    ("S3x30", "msgs_per_s", "S3 with 30 queues: confirmed (msgs/s)", True),
    ("S3x30", "e2e_msgs_per_s", "S3 with 30 queues: consumed by all 30 (msgs/s)", True),
    ("S3x30", "cpu_us_per_msg", "S3 with 30 queues: broker CPU per publish (µs)", False),
    ("S6", "msgs_per_s", "S6 1,000 queues: confirmed (msgs/s)", True),
    ("S6", "e2e_msgs_per_s", "S6 1,000 queues: consumed end to end (msgs/s)", True),
    ("S6", "cpu_us_per_msg", "S6 broker CPU per message (µs)", False),
    ("S7", "kib_per_idle_queue", "S7 RSS per idle durable queue (KiB)", False),
    ("S7", "kib_per_idle_connection", "S7 RSS per idle connection with a channel and a consumer (KiB)", False),
    ("S7", "open_connections_s", "S7 time to open the connections (s)", False),
    ("S7", "declare_s", "S7 time to declare the queues (s)", False),
    ("S7", "restart_serving_s", "S7 restart with a message in every queue, until the last serves (s)", False),
    ("S8", "msgs_per_s", "S8 1 MiB messages: confirmed (msgs/s)", True),
    ("S8", "mb_per_s", "S8 1 MiB messages: confirmed (MB/s)", True),
    ("S8", "cpu_us_per_msg", "S8 broker CPU per message (µs)", False),
    ("F1", "failover_s", "F1 failover: leader's node killed to the next confirm (s)", False),
]
TARGETS = ["wharf", "classic", "quorum", "quorum3"]


def main(path):
    values = defaultdict(list)
    failures = []
    with open(path) as results:
        for line in results:
            row = json.loads(line)
            if row.get("missing", 0):
                failures.append(row)
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("round",):
                    values[(row["scenario"], key, row["target"])].append(value)
    three = any(target == "quorum3" for (_, _, target) in values)
    extra = " RabbitMQ quorum, 3 nodes |" if three else ""
    print(f"| figure | Wharf | RabbitMQ classic | RabbitMQ quorum |{extra} Wharf ÷ classic | Wharf ÷ quorum |")
    print("| --- | ---: | ---: | ---: |" + (" ---: |" if three else "") + " ---: | ---: |")
    for scenario, metric, label, _higher in FIGURES:
        medians = {}
        for target in TARGETS:
            samples = values.get((scenario, metric, target))
            medians[target] = statistics.median(samples) if samples else None
        if all(value is None for value in medians.values()):
            continue

        def show(value):
            if value is None:
                return "–"
            return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"

        def ratio(base):
            if medians["wharf"] is None or not medians[base]:
                return "–"
            return f"{medians['wharf'] / medians[base]:.2f}×"

        cluster = f" {show(medians['quorum3'])} |" if three else ""
        print(f"| {label} | {show(medians['wharf'])} | {show(medians['classic'])} | {show(medians['quorum'])} |{cluster} {ratio('classic')} | {ratio('quorum')} |")
    if any(target == "baseline" for (_, _, target) in values):
        print("\n| figure | Wharf | Wharf baseline | Wharf ÷ baseline |")
        print("| --- | ---: | ---: | ---: |")
        for scenario, metric, label, _higher in FIGURES:
            current = values.get((scenario, metric, "wharf"))
            baseline = values.get((scenario, metric, "baseline"))
            if not current or not baseline:
                continue
            now, before = statistics.median(current), statistics.median(baseline)
            change = f"{now / before:.2f}×" if before else "–"
            print(f"| {label} | {now:,.2f} | {before:,.2f} | {change} |")
    rounds = max((len(samples) for samples in values.values()), default=0)
    print(f"\nMedians of up to {rounds} rounds. Runs with missing messages: {len(failures)}.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
