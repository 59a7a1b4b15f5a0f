#!/usr/bin/env python3
"""Traffic programs for Tessera's end-to-end tests and benchmark.

Plain TCP programs, unaware of Tessera. Every loop is bounded in count and in time.

  serve-blast PORT            for each connection: read "<back>\\n", hash all bytes until EOF,
                              answer "<sha256>\\n" then <back> deterministic bytes, close.
  blast HOST PORT SIZE BACK   send SIZE deterministic bytes, half-close, read the answer;
                              check both digests; print JSON.
  serve-echo PORT             echo every connection until EOF (threaded).
  echo-many HOST PORT N       N concurrent connections, each sends a line and expects it back.
  rr HOST PORT COUNT          COUNT small request/responses on one connection; latencies (JSON).
  connrate HOST PORT SECONDS MAX   open/close connections (one ping each) for SECONDS or MAX.
  hold HOST PORT SECONDS      one connection, a ping every 50 ms for SECONDS; prints "open",
                              then how it ended: "reset ...", "eof" or "still open".
"""
import hashlib, json, random, socket, sys, threading, time

CHUNK = 1 << 16


def payload(seed, size):
    rnd = random.Random(seed)
    left = size
    while left > 0:
        n = min(CHUNK * 16, left)
        yield rnd.randbytes(n)
        left -= n


def serve(port, handler):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1024)
    while True:
        conn, peer = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handler, args=(conn, peer), daemon=True).start()


def blast_handler(conn, peer):
    with conn:
        f = conn.makefile("rb")
        back = int(f.readline())
        h = hashlib.sha256()
        while True:
            b = f.read1(CHUNK)
            if not b:
                break
            h.update(b)
        conn.sendall(h.hexdigest().encode() + b"\n")
        for b in payload(2, back):
            conn.sendall(b)
        print(json.dumps({"peer": peer[0], "port": peer[1]}), flush=True)


def echo_handler(conn, peer):
    with conn:
        while True:
            b = conn.recv(CHUNK)
            if not b:
                break
            conn.sendall(b)


def blast(host, port, size, back):
    t0 = time.monotonic()
    s = socket.create_connection((host, port), timeout=60)
    s.sendall(b"%d\n" % back)
    sent = hashlib.sha256()
    for b in payload(1, size):
        sent.update(b)
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)  # half-close: the answer must still arrive
    f = s.makefile("rb")
    their = f.readline().strip().decode()
    got = hashlib.sha256()
    n = 0
    while True:
        b = f.read1(CHUNK)
        if not b:
            break
        got.update(b)
        n += len(b)
    want = hashlib.sha256()
    for b in payload(2, back):
        want.update(b)
    print(json.dumps({
        "sent_ok": their == sent.hexdigest(),
        "received_ok": got.hexdigest() == want.hexdigest() and n == back,
        "received": n,
        "seconds": time.monotonic() - t0,
    }))


def echo_many(host, port, n):
    ok, errors, lock = [0], [], threading.Lock()

    def one(i):
        try:
            s = socket.create_connection((host, port), timeout=20)
            line = b"ping %d\n" % i
            s.sendall(line)
            got = b""
            while len(got) < len(line):
                b = s.recv(64)
                if not b:
                    break
                got += b
            s.close()
            with lock:
                if got == line:
                    ok[0] += 1
                else:
                    errors.append("conn %d got %r" % (i, got))
        except Exception as e:  # report, do not hide
            with lock:
                errors.append("conn %d: %s" % (i, e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    print(json.dumps({"ok": ok[0], "errors": errors[:10]}))


def rr(host, port, count):
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    lat = []
    deadline = time.monotonic() + 60
    for _ in range(count):
        t0 = time.perf_counter_ns()
        s.sendall(msg)
        got = 0
        while got < len(msg):
            b = s.recv(CHUNK)
            if not b:
                raise SystemExit("connection closed")
            got += len(b)
        lat.append((time.perf_counter_ns() - t0) / 1000.0)
        if time.monotonic() > deadline:
            break
    s.close()
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    print(json.dumps({"count": len(lat), "p50_us": pick(0.50), "p99_us": pick(0.99)}))


def connrate(host, port, seconds, limit):
    n, errors = 0, 0
    t0 = time.monotonic()
    while n < limit and time.monotonic() - t0 < seconds:
        try:
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"p")
            if s.recv(1) != b"p":
                errors += 1
            s.close()
            n += 1
        except OSError:
            errors += 1
            if errors > 100:
                break
    dt = time.monotonic() - t0
    print(json.dumps({"connections": n, "errors": errors, "seconds": dt, "per_second": n / dt}))


def hold(host, port, seconds):
    s = socket.create_connection((host, port), timeout=5)
    print("open", flush=True)
    t = time.time()
    while time.time() - t < seconds:
        try:
            s.sendall(b"ping")
            if not s.recv(16):
                print("eof", flush=True)
                return
        except OSError as e:
            print("reset", e, flush=True)
            return
        time.sleep(0.05)
    print("still open", flush=True)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "serve-blast":
        serve(int(args[0]), blast_handler)
    elif cmd == "serve-echo":
        serve(int(args[0]), echo_handler)
    elif cmd == "blast":
        blast(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif cmd == "echo-many":
        echo_many(args[0], int(args[1]), int(args[2]))
    elif cmd == "rr":
        rr(args[0], int(args[1]), int(args[2]))
    elif cmd == "hold":
        hold(args[0], int(args[1]), float(args[2]))
    elif cmd == "connrate":
        connrate(args[0], int(args[1]), float(args[2]), int(args[3]))
    else:
        raise SystemExit("unknown command " + cmd)


if __name__ == "__main__":
    main()
