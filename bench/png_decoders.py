"""Is a maintained PNG decoder faster than Pillow here, with identical pixels? (issue 23, item 2)

    python bench/png_decoders.py [--files 300]

Not a project dependency: run it with an interpreter that has whichever of opencv-python-headless,
pyspng and imagecodecs is to be compared (a missing one is skipped). On bench/scale.py's 512-px
slices, 8-bit and 16-bit with sBIT, file bytes in memory: ms per file to decode, in one thread
and in a pool of os.cpu_count() threads (wall x threads / files: a decoder that holds the GIL
gains nothing from the pool), and whether every decoded array equals Pillow's.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # noqa: E402  (bench/scale.py: where the slices are)


def pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def decoders() -> dict[str, Callable[[bytes], np.ndarray]]:
    found: dict[str, Callable[[bytes], np.ndarray]] = {"Pillow": pillow}
    try:
        import cv2

        found["OpenCV imdecode"] = lambda data: cv2.imdecode(
            np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except ImportError:
        pass
    try:
        import pyspng

        found["pyspng"] = pyspng.load
    except ImportError:
        pass
    try:
        import imagecodecs

        found["imagecodecs png"] = imagecodecs.png_decode
        if imagecodecs.SPNG.available:
            found["imagecodecs spng"] = imagecodecs.spng_decode
    except ImportError:
        pass
    return found


def per_file_ms(decode: Callable[[bytes], np.ndarray], blobs: list[bytes], threads: int,
                repeat: int) -> float:
    for data in blobs[:10]:
        decode(data)
    start = time.perf_counter()
    for _ in range(repeat):
        if threads == 1:
            for data in blobs:
                decode(data)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(decode, blobs))
    return (time.perf_counter() - start) * threads / (repeat * len(blobs)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", type=Path, help="where bench/scale.py keeps its slices")
    args = parser.parse_args()
    data = args.data or scale.default_data_dir()
    threads = os.cpu_count() or 1
    found = decoders()
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}; {threads} threads")
    for variant in scale.VARIANTS:
        files = sorted((data / variant).glob("*/*.png"))
        files = files[:: max(1, len(files) // args.files)][: args.files]
        blobs = [path.read_bytes() for path in files]
        reference = [pillow(b) for b in blobs]
        print(f"\n{scale.VARIANTS[variant]}, {len(blobs)} files, "
              f"{np.mean([len(b) for b in blobs]) / 1024:.0f} KiB on average; ms per file:")
        print(f"  {'decoder':20}{'1 thread':>10}{f'{threads} threads':>12}  pixels")
        for name, decode in found.items():
            try:
                same = all(np.array_equal(decode(b), r)
                           for b, r in zip(blobs, reference, strict=True))
            except Exception as e:  # noqa: BLE001 - a decoder that cannot read these is reported
                print(f"  {name:20}{'fails: ' + type(e).__name__ + ': ' + str(e):>22}")
                continue
            one = per_file_ms(decode, blobs, 1, args.repeat)
            pooled = per_file_ms(decode, blobs, threads, args.repeat)
            print(f"  {name:20}{one:10.2f}{pooled:12.2f}  "
                  + ("identical to Pillow" if same else "DIFFER from Pillow"))


if __name__ == "__main__":
    main()
