"""What a hostile or careless client costs `mamba-deploy serve`: a text prompt of megabytes sent to
a server with --max-prompt-tokens (time to its 400, and how long GET /health waits meanwhile:
the handler that tokenizes holds the interpreter), and a request trickled a byte at a time (how
long it holds its connection and thread). Each --src runs in its own server process on the
shipped demo-mamba2; prints a table and writes JSON.

    python benchmarks/serve_limits.py [--mib 1,4] [--src OTHER_CHECKOUT/src ...] [--out FILE]

A checkout without --request-timeout runs at its fixed 60 s socket timeout; the trickle is cut
off by this script after --trickle-cap seconds (then shown as ">= cap").
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "demo-mamba2"
LIMIT = 2048  # --max-prompt-tokens
WORDS = "the quick brown fox jumps over the lazy dog while the model reads its prompt ".split()


def start(src: str, timeout_flag: bool) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "mamba_deploy", "serve", str(MODEL), "--port", "0", "--quiet", "--threads", "1",
           "--max-prompt-tokens", str(LIMIT)] + (["--request-timeout", "2"] if timeout_flag else [])
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": src}, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    port = int(re.search(r":(\d+)\s", line).group(1))
    return proc, port


def has_timeout_flag(src: str) -> bool:
    out = subprocess.run([sys.executable, "-m", "mamba_deploy", "serve", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": src}).stdout
    return "--request-timeout" in out


def health_ms(port: int) -> float:
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", "/health")
    conn.getresponse().read()
    conn.close()
    return 1e3 * (time.perf_counter() - t)


def big_prompt(port: int, mib: float) -> dict:
    """POST a text prompt of `mib` MiB; /health polled every 20 ms meanwhile."""
    n = int(mib * 2**20)
    text = " ".join(WORDS[i % len(WORDS)] for i in range(n // 4))[:n]
    body = json.dumps({"prompt": text, "max_tokens": 1})
    worst, done = [0.0], threading.Event()

    def poll():
        while not done.is_set():
            worst[0] = max(worst[0], health_ms(port))
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    elapsed = time.perf_counter() - t
    conn.close()
    done.set()
    poller.join()
    return {"mib": mib, "status": resp.status, "answer_s": round(elapsed, 3), "worst_health_ms": round(worst[0], 1)}


def trickle(port: int, cap: float) -> float:
    """Seconds a client sending a byte every 0.2 s keeps its connection (capped at `cap`)."""
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nX-Filler: ")
        while time.perf_counter() - t < cap:
            try:
                sock.sendall(b"a")
                if sock.recv(1) == b"":
                    break
            except socket.timeout:
                continue
            except OSError:
                break
    return round(time.perf_counter() - t, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", default="1,4")
    ap.add_argument("--src", action="append", default=None, help="a checkout's src folder (repeat to compare)")
    ap.add_argument("--trickle-cap", type=float, default=10.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    for src in a.src or [str(ROOT / "src")]:
        flag = has_timeout_flag(src)
        proc, port = start(src, flag)
        try:
            health_ms(port)  # the tokenizer and model are loaded by now; the first request warms up
            for mib in (float(x) for x in a.mib.split(",")):
                rows.append({"src": src, **big_prompt(port, mib)})
            held = trickle(port, a.trickle_cap)
            rows.append({"src": src, "trickle_held_s": held, "capped": held >= a.trickle_cap,
                         "request_timeout": 2 if flag else "60 (socket timeout per recv)"})
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{'src':<40} {'case':<22} {'status':>6} {'answer s':>9} {'worst /health ms':>17}")
    for r in rows:
        if "mib" in r:
            print(f"{r['src'][-40:]:<40} {str(r['mib']) + ' MiB prompt':<22} {r['status']:>6} {r['answer_s']:>9} "
                  f"{r['worst_health_ms']:>17}")
        else:
            held = (">= " if r["capped"] else "") + str(r["trickle_held_s"])
            print(f"{r['src'][-40:]:<40} {'trickled request':<22} {'':>6} {held:>9} {'(held s)':>17}")
    if a.out:
        from mamba_deploy.atomic import write_json  # a temporary name, then renamed

        write_json(a.out, rows)


if __name__ == "__main__":
    main()
