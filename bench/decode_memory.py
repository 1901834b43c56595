"""Decode memory of the service: peak RSS (VmHWM) when large photos are uploaded to
/api/v1/search/image, one at a time and four at once, each file against a fresh service
process (VmHWM only grows), with the decode time from the Server-Timing header.

    bench/decode_memory.py [--bin BINARY ...] [--model DIR] [--env K=V ...] [--files F ...]
                           [--out FILE.md]

Several --bin give a before/after table from one run. Starts its own SecantusDB and the
service on 127.0.0.1; needs `make setup` and `scripts/make_large_images.py` output
(`make bench-decode` does both).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LARGE = os.path.join(ROOT, ".tools/data/large")
FILES = [
    "cmyk-progressive-444-4096.jpg",
    "rgb-progressive-444-4096.jpg",
    "rgb-baseline-420-4096.jpg",
    "rgba-4096.png",
    "rgb-baseline-1600.jpg",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, limit=60):
    t = time.time()
    while time.time() - t < limit:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"{url} not up after {limit} s")


def vm(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def upload(base, data):
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(
        base + "/api/v1/search/image?top_k=1", data=body, method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            timing = r.headers.get("Server-Timing", "")
            return r.status, timing, ""
    except urllib.error.HTTPError as e:
        return e.code, "", json.loads(e.read() or b"{}").get("detail", "")


def decode_ms(timing):
    for part in timing.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name == "decode":
            return float(dur)
    return None


def measure(binary, model, mongo_uri, name, concurrent, extra_env):
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""), "MONGO_URI": mongo_uri,
        "MONGO_DB_NAME": "bench_decode", "MODEL_PATH": model, "HOST": "127.0.0.1",
        "PORT": str(port), "LAZY_LOAD_MODEL": "false", "DECODE_TIMEOUT_SECS": "60",
        "LOG_LEVEL": "warn",
    }
    env.update(extra_env)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([binary, "serve"], env=env, stdout=log, stderr=log,
                            cwd=tempfile.gettempdir())
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/api/v1/health")
        small = open(os.path.join(ROOT, ".tools/data/skimage/coffee.png"), "rb").read()
        for _ in range(3):  # model loaded, first pass done, warm
            upload(base, small)
        warm = vm(proc.pid, "VmHWM")
        data = open(os.path.join(LARGE, name), "rb").read()
        results = [None] * concurrent
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, upload(base, data)))
                   for i in range(concurrent)]
        t = time.time()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.time() - t
        peak = vm(proc.pid, "VmHWM")
        codes = sorted({r[0] for r in results})
        decodes = [d for d in (decode_ms(r[1]) for r in results) if d is not None]
        detail = next((r[2] for r in results if r[2]), "")
        return {
            "file": name, "concurrent": concurrent, "codes": codes, "detail": detail,
            "warm_mb": warm / 1e6, "peak_mb": peak / 1e6, "added_mb": (peak - warm) / 1e6,
            "decode_ms_median": statistics.median(decodes) if decodes else None,
            "wall_s": wall,
        }
    finally:
        proc.terminate()
        proc.wait(10)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", action="append")
    ap.add_argument("--model", default=os.path.join(ROOT, "models/out/clip-vit-b32-int8/model.onnx"))
    ap.add_argument("--env", action="append", default=[], help="K=V for the service")
    ap.add_argument("--files", nargs="+", default=FILES)
    ap.add_argument("--out")
    args = ap.parse_args()
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    bins = args.bin or [os.path.join(ROOT, "target/release/search-img")]
    storage = tempfile.mkdtemp(prefix="bench-decode-mongo-")
    mport = free_port()
    mongo = subprocess.Popen(
        [os.path.join(ROOT, ".tools/venv/bin/secantusd-py"), "--host", "127.0.0.1", "--port",
         str(mport), "--storage-path", storage, "--cache-size", "256M", "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"mongodb://127.0.0.1:{mport}/?directConnection=true"
    rows = []
    try:
        time.sleep(1.5)
        for binary in bins:
            for name in args.files:
                for c in (1, 4):
                    r = measure(binary, args.model, uri, name, c, extra_env)
                    r["bin"] = binary
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr)
    finally:
        mongo.terminate()
        mongo.wait(10)
    lines = [
        f"model {os.path.relpath(args.model, ROOT)}; service env {extra_env or 'defaults'}; VmHWM of a fresh service after 3 warm "
        "searches (warm) and after the uploads (peak)", "",
        "| binary | file | uploads at once | status | warm MB | peak MB | added MB | decode ms (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = "" if r["decode_ms_median"] is None else f"{r['decode_ms_median']:.0f}"
        status = ",".join(map(str, r["codes"])) + (f" ({r['detail']})" if r["detail"] else "")
        lines.append(f"| {os.path.basename(r['bin'])} | {r['file']} | {r['concurrent']} | {status} "
                     f"| {r['warm_mb']:.0f} | {r['peak_mb']:.0f} | {r['added_mb']:.0f} | {d} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
