"""The planning benchmark's pieces (``jobs/benchmark_planning.py``): catalogs, a counting S3.

- ``build_files``: the shared pool of small cutout / PSF files,
  ``{root}/{cutouts,psfs}/{band}/{k}.fits`` (planning reads only their listing), local or on
  object storage;
- ``build_catalog``: a real HATS catalog (pyarrow + hats metadata writers) of ``rows`` rows,
  ~``ROWS_PER_PARTITION`` per order-``ORDER`` partition over a patch whose area grows with
  the rows; every row names 6 cutout / PSF files drawn from the pool, so rows share files;
- ``serve_moto``: moto's S3 server on a free loopback port, counting every HTTP request it
  answers (``requests`` reads and resets the counts through ``COUNT_PATH``);
- ``peak_rss_kb`` (a process's VmHWM), ``ledger_bytes`` (the ledger's size), ``results_table``
  (the printed table).

The plan itself (``pipeline.plan``) is timed by the job, in a process of its own: validation
does not import pipeline.
"""

from __future__ import annotations

import json
import math
import resource
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from d4a_batch.schema import LEDGER_DIR, Col

BANDS = ("g", "r", "i")
ORDER = 10  # ~0.0033 deg^2 per partition
ROWS_PER_PARTITION = 1000
BUCKET = "bench"
COUNT_PATH = "/__d4a_requests__"
CREDS = {"key": "testing", "secret": "testing"}


def serve_moto() -> None:
    """Run moto's S3 server on a free loopback port (prints it), counting requests."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def counting(environ, start_response):
        if environ.get("PATH_INFO") == COUNT_PATH:
            with lock:
                body = json.dumps(counts).encode()
                if "reset" in environ.get("QUERY_STRING", ""):
                    counts.clear()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        with lock:
            m = environ["REQUEST_METHOD"]
            counts[m] = counts.get(m, 0) + 1
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counting, threaded=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def requests(url: str, reset: bool = False) -> dict[str, int]:
    """The counting server's requests by HTTP method (since start or the last reset);
    with ``reset``, zero them after reading."""
    with urllib.request.urlopen(url + COUNT_PATH + ("?reset=1" if reset else "")) as r:
        return json.loads(r.read())


def build_files(root: str, n_files: int, storage_options=None) -> None:
    """The shared pool: ``{root}/{cutouts,psfs}/{band}/{k}.fits`` (small files; planning
    reads only their listing)."""
    from d4a_batch.survey.storage import filesystem

    fs, path = filesystem(root, storage_options)
    for kind in ("cutouts", "psfs"):
        for b in BANDS:
            fs.makedirs(f"{path}/{kind}/{b}", exist_ok=True)
            for k in range(n_files):
                fs.pipe_file(f"{path}/{kind}/{b}/{k}.fits", f"{kind} {b} {k}\n".encode() * 4)


def build_catalog(root: Path, rows: int, files_root: str, n_files: int, seed: int = 0) -> int:
    """A HATS catalog of ``rows`` rows at ``root`` whose URIs point into ``files_root``;
    returns its partition count."""
    from hats.pixel_math.spatial_index import compute_spatial_index

    from d4a_batch.survey.hats_io import write_catalog_metadata, write_partition

    rng = np.random.default_rng(seed)
    area = rows / ROWS_PER_PARTITION * 41252.96 / (12 * 4**ORDER)  # deg^2
    side = math.sqrt(area)  # a square patch near the equator
    ra = 150.0 + rng.uniform(0, side, rows)
    dec = 2.0 + rng.uniform(0, side, rows)
    hp = compute_spatial_index(ra, dec)
    pix = hp >> (2 * (29 - ORDER))
    z = rng.uniform(0.2, 1.0, rows)
    pick = rng.integers(0, n_files, (len(BANDS), 2, rows))
    cols: dict[str, Any] = {
        Col.OBJECT_ID: np.arange(rows, dtype=np.int64) + 10**12,
        Col.RA: ra,
        Col.DEC: dec,
        "photoz_best": z,
        "photoz_err68_min": z - 0.05,
        "photoz_err68_max": z + 0.05,
        Col.HEALPIX: hp,
    }
    for i, b in enumerate(BANDS):
        for j, kind in enumerate(("cutout", "psf")):
            folder = f"{files_root}/{kind}s/{b}"
            names = np.array([f"{folder}/{k}.fits" for k in range(n_files)], dtype=object)
            cols[f"{b}_{kind}_uri"] = pa.array(names[pick[i, j]], pa.string()).dictionary_encode()
    table = pa.table(cols)
    order = np.argsort(pix, kind="stable")
    pix_sorted = pix[order]
    bounds = np.flatnonzero(np.diff(pix_sorted)) + 1
    pixels = []
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, rows]):
        p = int(pix_sorted[lo])
        write_partition(table.take(order[lo:hi]), str(root), ORDER, p)
        pixels.append((ORDER, p))
    write_catalog_metadata(str(root), pixels, f"bench_{rows}")
    return len(pixels)


def peak_rss_kb() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent
    across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def ledger_bytes(output: str, so: dict | None) -> int:
    """Bytes of the run ledger under ``output``."""
    from d4a_batch.survey.storage import filesystem, join_uri

    fs, path = filesystem(join_uri(output, LEDGER_DIR), so)
    return sum(int(info["size"]) for info in fs.find(path, detail=True).values())


def results_table(results: list[dict[str, Any]]) -> str:
    """The printed table: one line per (storage, rows)."""
    lines = [
        f"{'storage':>7} {'rows':>9} {'parts':>6} {'seconds':>8} {'requests':>9} "
        f"{'req/part':>8} {'peak MB':>8} {'growth MB':>9} "
        f"{'ledger kB':>9}"
    ]
    for r in results:
        req = r.get("requests")
        per_part = f"{req / r['partitions']:.2f}" if req else "-"
        lines.append(
            f"{r['storage']:>7} {r['catalog_rows']:>9} {r['partitions']:>6} {r['seconds']:>8.1f} "
            f"{req if req is not None else '-':>9} "
            f"{per_part:>8} "
            f"{r['driver_peak_mb']:>8.0f} {r['driver_growth_mb']:>9.0f} "
            f"{r['ledger_bytes'] / 1024:>9.1f}"
        )
    return "\n".join(lines)
