"""What do a search's checkpoints cost in a bucket? Bytes written per trial-epoch, and bytes of
checkpoints read by evaluation, before and after weights and resume state were split (issue 21).

One run: a small search (ResNet-18 and ResNet-50, AdamW, 32 px, demo data) into a bucket on a
local S3 API server (moto's, behind a counter of the HTTP bodies it receives and sends), twice:
"before" is the code of BASELINE (checked out into a temporary git worktree, run by a venv that
shares this one's packages but not its editable ctscan, so that Ray's workers import the same
code as the driver), "after" is this working tree with its default --checkpoint-every for a
bucket. Both train in fp32 on the CPU, so the same trials see the same numbers; `ctscan tune`
evaluates at its end as usual.

    python bench/checkpoint_traffic.py [--trials 4] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import boto3
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

from data_utils.demo import make_demo_data

logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise

REPO = Path(__file__).resolve().parent.parent
BASELINE = "cdbfe63"  # main before issue 21: the full resume state in every epoch's checkpoint
BUCKET = "bench"
SPACE = """start_with: [{arch: resnet18}, {arch: resnet50}]
arch: {choice: [resnet18, resnet50]}
optimizer: adamw
lr: {loguniform: [1.0e-4, 1.0e-2]}
"""


class Counting:
    """WSGI middleware: bytes of request bodies written into trial folders, and of responses
    read from checkpoints, by the run name in the path."""

    def __init__(self, app):
        self.app = app
        self.bytes = Counter()

    def __call__(self, environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
        run = path.split("/runs/", 1)[-1].split("/", 1)[0] if "/runs/" in path else "-"
        if method in ("PUT", "POST"):
            # An aws-chunked body says its payload's size in a header of its own.
            size = int(environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH")
                       or environ.get("CONTENT_LENGTH") or 0)
            self.bytes[run, "written" if "/trial_" in path else "written elsewhere"] += size
        response = self.app(environ, start_response)
        if method == "GET" and "/checkpoint_" in path:
            return self._counted(response, (run, "checkpoints read"))
        return response

    def _counted(self, response, key):
        for chunk in response:
            self.bytes[key] += len(chunk)
            yield chunk
        getattr(response, "close", lambda: None)()


def start_s3() -> tuple[Counting, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    counting = Counting(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, counting, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return counting, f"http://127.0.0.1:{port}"


def baseline_python(tmp: Path) -> Path:
    """A Python that imports BASELINE's ctscan and this venv's other packages."""
    code, venv = tmp / "baseline", tmp / "baseline-venv"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(code),
                    BASELINE], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = sysconfig.get_paths()["purelib"]
    # A plain path in a .pth file: the site folder's own .pth files (the editable ctscan) are
    # not read.
    pth = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (pth / "baseline.pth").write_text(f"{code}\n{site}\n")
    return venv / "bin" / "python"


def tune(python: Path, data: Path, space: Path, name: str, args, env: dict, extra=()) -> float:
    command = [str(python), "-m", "ctscan", "tune", str(data), "--storage-path",
               f"s3://{BUCKET}/runs", "--name", name, "--search-space", str(space),
               "--num-samples", str(args.trials), "--max-epochs", str(args.epochs),
               "--image-size", "32", "--max-concurrent", "2", "--group-by", "none",
               "--bootstrap", "200", "--seed", "0", *extra]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name}: ctscan tune failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def epochs_trained(name: str) -> int:
    body = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"runs/{name}/trials.json")
    return sum(t["epochs"] for t in json.loads(body["Body"].read()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per search")
    parser.add_argument("--epochs", type=int, default=6, help="max epochs per trial")
    args = parser.parse_args()
    counting, endpoint = start_s3()
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_demo_data(tmp / "data", n_per_class=40, size=64)
        (tmp / "space.yaml").write_text(SPACE)
        try:
            seconds = {
                "before": tune(baseline_python(tmp), data, tmp / "space.yaml", "before", args,
                               env),
                # fp32 as the baseline trains on a CPU: the same trials, the same numbers.
                "after": tune(Path(sys.executable), data, tmp / "space.yaml", "after", args, env,
                              ["--precision", "fp32"]),
            }
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(tmp / "baseline")], check=True)
    print(f"load average {os.getloadavg()[0]:.2f}; baseline {BASELINE}; {args.trials} trials "
          f"(ResNet-18/50, AdamW, 32 px), at most {args.epochs} epochs, ASHA")
    per_epoch = {}
    print(f"{'':8} {'epochs':>7} {'written MB':>11} {'MB/epoch':>9} {'evaluate read MB':>17} "
          f"{'other writes MB':>16} {'time s':>7}")
    for name in ("before", "after"):
        epochs = epochs_trained(name)
        written = counting.bytes[name, "written"]
        per_epoch[name] = written / epochs
        print(f"{name:8} {epochs:>7} {written / 1e6:>11.0f} {per_epoch[name] / 1e6:>9.1f} "
              f"{counting.bytes[name, 'checkpoints read'] / 1e6:>17.0f} "
              f"{counting.bytes[name, 'written elsewhere'] / 1e6:>16.1f} {seconds[name]:>7.0f}")
    print(f"bytes written per trial-epoch, after / before: "
          f"{per_epoch['after'] / per_epoch['before']:.2f}")


if __name__ == "__main__":
    main()
