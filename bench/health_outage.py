"""How long /api/v1/health takes to show a MongoDB outage: starts SecantusDB and the
service on 127.0.0.1, polls health every 50 ms, kills the database (SIGKILL, or SIGTERM
with --term), and prints the seconds until health answers 503, for each --bin, --runs
times.

    bench/health_outage.py [--bin BINARY ...] [--runs N] [--term]
"""
import argparse
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(base):
    try:
        with urllib.request.urlopen(base + "/api/v1/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return None


def once(binary, sig):
    mport, port = free_port(), free_port()
    storage = tempfile.mkdtemp(prefix="bench-health-mongo-")
    mongo = subprocess.Popen(
        [os.path.join(ROOT, ".tools/venv/bin/secantusd-py"), "--host", "127.0.0.1", "--port",
         str(mport), "--storage-path", storage, "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"PATH": os.environ.get("PATH", ""), "HOST": "127.0.0.1", "PORT": str(port),
           "MONGO_URI": f"mongodb://127.0.0.1:{mport}/?directConnection=true",
           "LOG_LEVEL": "warn"}
    svc = subprocess.Popen([binary, "serve"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    base = f"http://127.0.0.1:{port}"
    try:
        t = time.time()
        while health(base) != 200:
            if time.time() - t > 60:
                raise SystemExit("service not healthy")
            time.sleep(0.05)
        time.sleep(2)  # a few pings on a live database
        mongo.send_signal(sig)
        t = time.time()
        while health(base) != 503:
            if time.time() - t > 30:
                return None
            time.sleep(0.05)
        return time.time() - t
    finally:
        svc.terminate()
        svc.wait(10)
        mongo.kill()
        mongo.wait(10)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", action="append")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--term", action="store_true")
    args = ap.parse_args()
    sig = signal.SIGTERM if args.term else signal.SIGKILL
    print(f"| binary | database stopped by | seconds to 503 (each run) | median |")
    print("|---|---|---|---|")
    for binary in args.bin or [os.path.join(ROOT, "target/release/search-img")]:
        secs = [once(binary, sig) for _ in range(args.runs)]
        shown = ", ".join("never" if s is None else f"{s:.2f}" for s in secs)
        ok = [s for s in secs if s is not None]
        med = f"{statistics.median(ok):.2f}" if ok else "-"
        print(f"| {os.path.basename(binary)} | {sig.name} | {shown} | {med} |")


if __name__ == "__main__":
    main()
