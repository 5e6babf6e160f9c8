"""How fast and how big is the search index? (a benchmark, not a CI test)

Builds pathapp's FAISS index folder through its own API (`open_index(...).add`, slides of 10,000
tiles, 250,000 vectors per transaction, `kind="auto"`: exact up to 50k, then IVF with 4-bit
fast-scan PQ whose shortlist is re-ranked exactly against the stored float16 vectors) and measures,
each phase in its own process so that its peak RSS is its own:
- build: wall time, index size on disk (search structure and vector store apart), peak RSS;
- search: p50/p99 latency of one k=10 query (single queries, one at a time), recall@10 against exact
  search, peak RSS, for a sweep of nprobe and shortlist (the defaults marked);
- exact: the same queries by brute force (streamed), which gives the ground truth, and at ≤ 1M the
  latency of one exact query on an in-memory `IndexFlatIP` for comparison.

Data: synthetic 384-d vectors (a mixture of 4,096 Gaussian clusters, centres N(0, I), within-cluster
noise of 1.0 per dimension, as large as the centres: near-ties that approximate search must sort out;
queries are fresh draws from the same mixture), generated chunk by chunk from a seed so that no
phase ever holds all of them; plus real embeddings, written by `real`: every tissue tile of the
H&E slides in ../shared/data and the EBHI-Seg images, embedded by `pathapp infer` with a random
ViT-S/14 (384-d, LayerScale 1: no pretrained weights can be downloaded here).

    python benchmarks/bench_index.py real --out /tmp/bench-index-real            # ≈10 min, once
    flock /work/heavy.lock nice -n 5 python benchmarks/bench_index.py run --sizes 1000000 10000000 \\
        --real /tmp/bench-index-real/real.npy --work /tmp/bench-index --json benchmarks/results/index.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DIM = 384
CENTRES = 4096
NOISE = 1.0
CHUNK = 250_000  # vectors per index transaction (25 slides of 10,000 tiles)
TILES_PER_SLIDE = 10_000
K = 10
SWEEP = [(16, 100), (32, 100), (32, 200), (64, 200), (64, 400), (128, 400)]


# ------------------------------------------------------------------------------------ data

def centres(seed: int, dim: int) -> np.ndarray:
    return np.random.default_rng([seed, 0]).standard_normal((CENTRES, dim)).astype(np.float32)


def synthetic(n: int, dim: int, seed: int, stream: int = 1):
    """Yield (start, float32 chunk) covering n vectors; chunk i depends only on (seed, stream, i).
    Drawn in place (one chunk of memory, the same values as centre + noise): at 10M every phase
    must stay under 2 GiB, and the caller drops each chunk before asking for the next."""
    c = centres(seed, dim)
    for i, start in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - start)
        rng = np.random.default_rng([seed, stream, i])
        which = rng.integers(0, CENTRES, m)
        chunk = rng.standard_normal((m, dim), dtype=np.float32)
        chunk *= NOISE
        for a in range(0, m, 16_384):
            chunk[a : a + 16_384] += c[which[a : a + 16_384]]
        yield start, chunk
        del chunk


def real_chunks(path: Path, n: int):
    v = np.load(path, mmap_mode="r")[:n]
    for start in range(0, len(v), CHUNK):
        yield start, np.array(v[start : start + CHUNK], np.float32)


def dataset(args: argparse.Namespace, name: str, n: int):
    if name == "synthetic":
        return synthetic(n, DIM, args.seed), synthetic(args.queries, DIM, args.seed, stream=2)
    v = np.load(args.real, mmap_mode="r")
    queries = np.asarray(v[n : n + args.queries], np.float32)  # held out: not in the index
    return real_chunks(Path(args.real), n), iter([(0, queries)])


# ------------------------------------------------------------------------------------ phases (children)

def phase_build(args: argparse.Namespace) -> dict:
    from pathapp.index import IndexModel, SlideEntry, SlideRecord, open_index

    data, _ = dataset(args, args.data, args.n)
    folder = Path(args.work) / "idx"
    model = IndexModel("bench", "bench-" + args.data, DIM, 0.5, 224)
    t0 = time.perf_counter()
    adds = []
    with open_index(folder, create=True, kind=args.kind) as idx:
        for start, chunk in data:
            entries = []
            for a in range(0, len(chunk), TILES_PER_SLIDE):
                part = chunk[a : a + TILES_PER_SLIDE]
                key = f"/bench/slide{(start + a) // TILES_PER_SLIDE:06d}.svs"
                rec = SlideRecord(key=key, slide_path=key, name=Path(key).stem, n_tiles=len(part), footprint=448.0,
                                  slide_mpp=0.25)
                coords = np.column_stack([np.arange(len(part)) % 100, np.arange(len(part)) // 100]) * 448
                entries.append(SlideEntry(rec, part, coords))
            t = time.perf_counter()
            idx.add(entries, model)
            adds.append(time.perf_counter() - t)
            print(f"build: {start + len(chunk):,} vectors, {time.perf_counter() - t0:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
            del chunk, part, entries  # before the generator draws the next chunk
        info = idx.describe()
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    structure = sum(v for k, v in files.items() if k.startswith("faiss-"))
    store = sum(v for k, v in files.items() if k.startswith(("vectors-", "slides-")))
    return {"build_s": time.perf_counter() - t0, "add_s_max": max(adds), "kind": info["kind"], "ivf": info["ivf"],
            "structure_bytes": structure, "store_bytes": store, "disk_bytes": info["bytes_on_disk"]}


def phase_exact(args: argparse.Namespace) -> dict:
    """Ground truth by streamed brute force; at ≤ 1M also one-query latency of an in-memory flat index."""
    import faiss

    data, queries = dataset(args, args.data, args.n)
    q = np.concatenate([c for _, c in queries])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best_s = np.full((len(q), K), -np.inf, np.float32)
    best_i = np.zeros((len(q), K), np.int64)
    flat = None
    if args.n <= 1_000_000:
        flat = faiss.IndexFlatIP(DIM)
    for start, chunk in data:
        chunk /= np.sqrt(np.einsum("ij,ij->i", chunk, chunk))[:, None]
        s, top = faiss.knn(q, chunk, K, metric=faiss.METRIC_INNER_PRODUCT)  # blocked: no queries × chunk matrix
        cand_s = np.concatenate([best_s, s], 1)
        cand_i = np.concatenate([best_i, top + start], 1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
        if flat is not None:
            flat.add(chunk)
        del chunk
    np.save(Path(args.work) / "truth.npy", best_i)
    out: dict = {}
    if flat is not None:
        out["flat_latency_ms"] = _latencies(lambda v: flat.search(v[None], K), q)
    return out


def phase_search(args: argparse.Namespace) -> dict:
    from pathapp.index import open_index

    _, queries = dataset(args, args.data, args.n)
    q = np.concatenate([c for _, c in queries])
    truth = np.load(Path(args.work) / "truth.npy")
    rows = []
    with open_index(Path(args.work) / "idx") as idx:
        first = {k: int(Path(k).stem[5:]) * TILES_PER_SLIDE for k in idx.slides()}  # slide -> its first vector
        ivf = idx.manifest.get("ivf")
        sweep = [(None, None)] + (SWEEP if ivf else [])
        for nprobe, shortlist in sweep:
            idx.nprobe, idx.shortlist = nprobe, shortlist
            idx.search_tiles(q[:20], K)  # warm: the structure loaded, pages of the store touched
            found = []
            lat = _latencies(lambda v, found=found: found.append(idx.search_tiles(v, K)[0]), q)
            ids = [[first[t.slide] + t.tile for t in r] for r in found[-len(q):]]
            recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, truth)]))
            used = (nprobe or (ivf or {}).get("nprobe"), shortlist or (ivf or {}).get("shortlist"))
            rows.append({"nprobe": used[0], "shortlist": used[1], "default": nprobe is None,
                         "recall_at_10": recall, **lat})
    return {"search": rows}


def _latencies(fn, q: np.ndarray) -> dict:
    times = []
    for v in q:
        t = time.perf_counter()
        fn(v)
        times.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


# ------------------------------------------------------------------------------------ driver

def child(args: argparse.Namespace, phase: str) -> dict:
    """Run one phase in a fresh process; its result and its own peak RSS (from wait4)."""
    cmd = [sys.executable, __file__, "phase", phase, "--n", str(args.n), "--data", args.data, "--work", args.work,
           "--seed", str(args.seed), "--queries", str(args.queries), "--kind", args.kind]
    if args.real:
        cmd += ["--real", str(args.real)]
    out = Path(args.work) / f"{phase}.json"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd + ["--result", str(out)], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"phase {phase} failed ({status})")
    return {**json.loads(out.read_text()), f"{phase}_peak_rss_mib": usage.ru_maxrss / 1024,
            f"{phase}_wall_s": time.perf_counter() - t0, f"{phase}_load_average_at_end": os.getloadavg()}


def cpu() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    import faiss

    return {"model": fields.get("Model name", "").strip(), "cpus": os.cpu_count(),
            "flags": fields.get("Flags", "").strip(), "faiss": faiss.__version__,
            "faiss_simd": faiss.get_compile_options(), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def run(args: argparse.Namespace) -> None:
    results = {"cpu": cpu(), "free_gib_at_start": _free_gib(), "runs": []}
    plan = [("synthetic", n) for n in args.sizes]
    if args.real:
        plan.append(("real", len(np.load(args.real, mmap_mode="r")) - args.queries))
    for name, n in plan:
        work = Path(args.work) / f"{name}-{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        sub = argparse.Namespace(**{**vars(args), "n": n, "data": name, "work": str(work)})
        row = {"data": name, "n": n, "dim": DIM}
        for phase in ("build", "exact", "search"):
            row.update(child(sub, phase))
            print(json.dumps(row), file=sys.stderr, flush=True)
        if name == "real":  # also the real vectors under IVF-PQ, forced (auto keeps so few exact)
            shutil.rmtree(work / "idx")
            forced = argparse.Namespace(**{**vars(sub), "kind": "ivfpq"})
            row["forced_ivfpq"] = {**child(forced, "build"), **child(forced, "search")}
        results["runs"].append(row)
        shutil.rmtree(work, ignore_errors=True)  # 10M leaves 7.7 GB of float16 vectors
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results)


def _free_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


def print_table(results: dict) -> None:
    print(f"CPU: {results['cpu']['model']}, {results['cpu']['cpus']} cores; FAISS {results['cpu']['faiss']} "
          f"({results['cpu']['faiss_simd']})")
    print("| data | vectors | structure | build | structure + store on disk | build peak RSS | "
          "nprobe / shortlist | recall@10 | p50 | p99 | search peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        for variant in [r] + ([{**r, **r["forced_ivfpq"], "n": r["n"]}] if "forced_ivfpq" in r else []):
            for s in variant["search"]:
                print(f"| {variant['data']} | {variant['n']:,} | {variant['kind']} | {variant['build_s']:.0f} s | "
                      f"{variant['structure_bytes'] / 2**20:.0f} + {variant['store_bytes'] / 2**20:.0f} MiB | "
                      f"{variant['build_peak_rss_mib']:.0f} MiB | "
                      f"{s['nprobe'] or '-'} / {s['shortlist'] or '-'}{' (default)' if s['default'] else ''} | "
                      f"{s['recall_at_10']:.3f} | {s['p50_ms']:.1f} ms | {s['p99_ms']:.1f} ms | "
                      f"{variant['search_peak_rss_mib']:.0f} MiB |")
        if "flat_latency_ms" in r:
            print(f"| {r['data']} | {r['n']:,} | exact IndexFlatIP in memory | | | {r['exact_peak_rss_mib']:.0f} MiB | "
                  f"| 1.000 | {r['flat_latency_ms']['p50_ms']:.1f} ms | {r['flat_latency_ms']['p99_ms']:.1f} ms | |")


# ------------------------------------------------------------------------------------ real vectors

def make_real(out: Path) -> None:
    """Real 384-d tile embeddings: `pathapp infer` with a random ViT-S/14 over the H&E slides and
    the EBHI-Seg images, at 0.5 µm/px and at 1 µm/px, collected into real.npy (shuffled, seeded)."""
    import csv

    import h5py

    sys.path.insert(0, str(ROOT / "tests"))
    from vit_factory import tiny_vit

    from pathapp.models.bundle import Bundle, save_bundle
    from pathapp.models.registry import get_spec

    out.mkdir(parents=True, exist_ok=True)
    spec = get_spec("dinov2_vits14")
    bundle = save_bundle(Bundle.from_model(tiny_vit(spec), spec, tile_size=224, mpp=0.5,
                                           provenance={"source_weights": "random, LayerScale 1"}), out / "vits14.pathapp")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with open(DATA / "labeled/ebhi-seg/labels.csv") as f:
        images = [str(DATA / "labeled/ebhi-seg" / r["image"]) for r in csv.DictReader(f)]
    groups = [  # (inputs, their µm/px when the files lack it: TCGA's estimated from its nuclei, EBHI's ≈ 1)
        ([str(DATA / "wsi/aperio" / s) for s in ("CMU-1-Small-Region.svs", "luna-1065626.svs")]
         + [str(DATA / "wsi/ome-tiff/OS-1-detail.ome.tif")], None),
        ([str(DATA / "wsi/aperio/tcga-cr-7395-01a-01-ts1.svs")], "1.0")]
    groups += [([p for p in images if f"/{label}/" in p], "1.0") for label in sorted({Path(p).parts[-3] for p in images})]
    for mpp in ("0.5", "1.0"):
        for i, (inputs, slide_mpp) in enumerate(groups):  # one folder per group: EBHI names repeat across classes
            cmd = [sys.executable, "-m", "pathapp", "infer", *inputs, "--model", str(bundle), "--mpp", mpp,
                   "--out", str(out / f"mpp{mpp}" / f"group{i}"), "--workers", "0"]
            subprocess.run(cmd + (["--slide-mpp", slide_mpp] if slide_mpp else []), env=env, check=False,  # failures: fewer vectors
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    feats = [h5py.File(p)["features"][()] for p in sorted(out.rglob("embeddings.h5"))]
    v = np.concatenate(feats).astype(np.float32)
    np.random.default_rng(0).shuffle(v)
    np.save(out / "real.npy", v)
    print(f"real: {len(v):,} vectors from {len(feats)} slides/images -> {out / 'real.npy'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    r.add_argument("--real", type=Path, default=None)
    r.add_argument("--work", default="/tmp/bench-index")
    r.add_argument("--json", default=None)
    r.add_argument("--queries", type=int, default=200)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--kind", default="auto")
    m = sub.add_parser("real")
    m.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("phase")
    p.add_argument("phase", choices=["build", "exact", "search"])
    for a in ("--data", "--work", "--result", "--kind"):
        p.add_argument(a, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--queries", type=int, required=True)
    p.add_argument("--real", default=None)
    args = ap.parse_args()
    if args.cmd == "run":
        run(args)
    elif args.cmd == "real":
        make_real(args.out)
    else:
        result = {"build": phase_build, "exact": phase_exact, "search": phase_search}[args.phase](args)
        Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
