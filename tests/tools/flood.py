#!/usr/bin/python3
"""Spoofed handshake flood for the end-to-end flood test (scapy builds, a raw socket sends).

  flood.py PCAP IFACE DST_MAC SERVER PORT SECONDS MAX
      Takes the first token-bearing SYN and ACK to SERVER:PORT from the capture and builds
      FRAMES Ethernet frames, each from a random spoofed source address (outside 10.0.0.0/8)
      and port with a random sequence number, of four kinds in turn:
        syn-no-token     a plain SYN to PORT
        syn-token        the captured SYN with its token (message), as if sent again
        syn-token-port   the same to a random port (every packet with our option is queued)
        ack-proof        the captured ACK with its proof, for no handshake of ours
      then sends them round-robin from an AF_PACKET socket on IFACE to DST_MAC (the server
      host's interface), for SECONDS seconds or MAX frames, whichever comes first. Prints
      JSON: {"sent": N, "seconds": S, "rate": N/S, "frames": FRAMES}.
"""
import json
import random
import socket
import sys
import time

from scapy.all import IP, TCP, Ether, conf, get_if_hwaddr, rdpcap

conf.verb = 0
EXID = b"\x7e\x55"
FRAMES = 4096


def tagged(tcp):
    return any(
        kind == 253 and isinstance(value, bytes) and value[:2] == EXID
        for kind, value in tcp.options
    )


def spoofed_source():
    while True:
        first = random.randint(1, 223)
        if first not in (10, 127):
            return "%d.%d.%d.%d" % (first, random.randint(0, 255), random.randint(0, 255), random.randint(1, 254))


def respoof(ip, dport=None):
    """The packet from a random source, port and sequence number, checksums redone."""
    p = ip.copy()
    p[IP].src = spoofed_source()
    p[TCP].sport = random.randint(1024, 65535)
    p[TCP].seq = random.getrandbits(32)
    if "A" in str(p[TCP].flags):
        p[TCP].ack = random.getrandbits(32)
    if dport is not None:
        p[TCP].dport = dport
    del p[IP].chksum, p[TCP].chksum
    return IP(bytes(p))


def main(pcap, iface, dst_mac, server, port, seconds, most):
    port = int(port)
    syn = ack = None
    for p in rdpcap(pcap):
        if IP not in p or TCP not in p or p[IP].dst != server or p[TCP].dport != port:
            continue
        if not tagged(p[TCP]):
            continue
        flags = str(p[TCP].flags)
        if flags == "S" and syn is None:
            syn = p[IP]
        elif flags == "A" and ack is None:
            ack = p[IP]
    if syn is None or ack is None:
        sys.exit("no token-bearing SYN and ACK to %s:%d in %s" % (server, port, pcap))
    eth = Ether(dst=dst_mac, src=get_if_hwaddr(iface))
    frames = []
    for i in range(FRAMES):
        kind = i % 4
        if kind == 0:
            pkt = IP(src=spoofed_source(), dst=server) / TCP(
                sport=random.randint(1024, 65535), dport=port, flags="S", seq=random.getrandbits(32)
            )
        elif kind == 1:
            pkt = respoof(syn)
        elif kind == 2:
            pkt = respoof(syn, dport=random.randint(1, 65535))
        else:
            pkt = respoof(ack)
        frames.append(bytes(eth / pkt))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    sent, t0 = 0, time.monotonic()
    deadline = t0 + float(seconds)
    most = int(most)
    send = s.send
    while sent < most and time.monotonic() < deadline:
        for f in frames:
            try:
                send(f)
            except OSError:  # a full device queue: the frame is lost, as on a wire
                pass
        sent += len(frames)
    elapsed = time.monotonic() - t0
    print(json.dumps({"sent": sent, "seconds": elapsed, "rate": sent / elapsed, "frames": FRAMES}))


if __name__ == "__main__":
    main(*sys.argv[1:8])
