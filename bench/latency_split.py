#!/usr/bin/env python3
"""Splits wharf-bench's end-to-end latency into client and broker shares, from a packet capture.

Usage:
    tcpdump -i lo -n -s 1500 -w run.pcap 'tcp and greater 1000' &   # while wharf-bench runs
    python3 bench/latency_split.py run.pcap

For every message (identified by the sequence number wharf-bench writes into its body) it takes
the time the body frame of its basic.publish reached the broker's socket and the time the body
frame of its basic.deliver left it, and the send time wharf-bench wrote into the body. It prints,
per broker port, percentiles of: client send -> broker socket (the load generator's publish
side), broker in -> delivery out (the broker's own share, including the loopback stack), and
send -> delivery on the wire. The end-to-end figure wharf-bench reports minus the last one is
the load generator's consume side. Only packets that start at a frame boundary are decoded (most
do at a fixed rate); when several runs in the capture use the same port, the first is kept, and a
delivery more than DELIVERY_WINDOW_S after its publish is taken for another run's and skipped.
"""
import collections
import struct
import sys

DELIVERY_WINDOW_S = 1.0


def packets(path):
    with open(path, "rb") as capture:
        header = capture.read(24)
        nanoseconds = struct.unpack("<I", header[:4])[0] == 0xA1B23C4D
        link = struct.unpack("<I", header[20:24])[0]
        link_bytes = {1: 14, 113: 16}.get(link, 4)
        while True:
            record = capture.read(16)
            if len(record) < 16:
                return
            seconds, fraction, captured, _ = struct.unpack("<IIII", record)
            data = capture.read(captured)
            at = seconds + fraction / (1e9 if nanoseconds else 1e6)
            ip = data[link_bytes:]
            tcp = ip[(ip[0] & 15) * 4 :]
            source_port, destination_port = struct.unpack(">HH", tcp[:4])
            yield at, source_port, destination_port, tcp[(tcp[12] >> 4) * 4 :]


def percentiles(values):
    values = sorted(values)
    count = len(values)
    return " ".join(f"p{q}={values[min(count - 1, int(count * q / 100))] * 1e3:.3f} ms" for q in (50, 90, 99))


def main():
    published = collections.defaultdict(dict)
    delivered = collections.defaultdict(dict)
    sent = {}
    for at, source_port, destination_port, payload in packets(sys.argv[1]):
        offset, kind = 0, None
        while offset + 7 <= len(payload):
            frame_type, _, size = struct.unpack(">BHI", payload[offset : offset + 7])
            if frame_type not in (1, 2, 3) or offset + 8 + size > len(payload):
                break
            if frame_type == 1 and size >= 4:
                class_id, method_id = struct.unpack(">HH", payload[offset + 7 : offset + 11])
                if (class_id, method_id) == (60, 40):
                    kind = ("publish", destination_port)
                elif (class_id, method_id) == (60, 60):
                    kind = ("deliver", source_port)
            if frame_type == 3 and size >= 20 and kind:
                body = payload[offset + 7 : offset + 7 + size]
                seq = struct.unpack("<Q", body[4:12])[0]
                if kind[0] == "publish":
                    published[kind[1]].setdefault(seq, at)
                    sent.setdefault((kind[1], seq), struct.unpack("<Q", body[12:20])[0] / 1e9)
                elif seq in published[kind[1]] and 0 <= at - published[kind[1]][seq] < DELIVERY_WINDOW_S:
                    delivered[kind[1]].setdefault(seq, at)
            offset += 8 + size
    for port, arrivals in published.items():
        both = [seq for seq in arrivals if seq in delivered[port]]
        if len(both) < 100:
            continue
        print(f"broker port {port}: {len(both)} messages")
        print("  client send -> broker socket:", percentiles([arrivals[s] - sent[(port, s)] for s in both]))
        print("  broker in -> delivery out   :", percentiles([delivered[port][s] - arrivals[s] for s in both]))
        print("  send -> delivery on the wire:", percentiles([delivered[port][s] - sent[(port, s)] for s in both]))


if __name__ == "__main__":
    main()
