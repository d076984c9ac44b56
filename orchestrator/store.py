"""The results tree: Parquet schema, atomic writes, and reading it back (local, s3://, gs://).

Every file is written whole or not at all. On a file system that means a temp name in the same
folder, then a rename; on object storage a single PUT is already all-or-nothing. Readers ignore
temp names, so a crash mid-write never shows up as a result.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.axes import AXES

TMP_PREFIX = ".tmp-"

# The contract of DESIGN.md ("names are a contract; add columns freely, never rename these").
_RUN_FIELDS = [
    ("run_id", pa.string()), ("sweep", pa.string()), ("arch", pa.string()), ("dataset", pa.string()),
    ("noise", pa.string()),
    ("vary_init", pa.bool_()), ("vary_order", pa.bool_()), ("vary_augment", pa.bool_()), ("vary_impl", pa.bool_()),
    ("replica", pa.int32()),
    ("seed_init", pa.int64()), ("seed_order", pa.int64()), ("seed_augment", pa.int64()),
    ("accelerator_requested", pa.string()), ("accelerator", pa.string()), ("fingerprint_id", pa.string()),
    ("hostname", pa.string()), ("ray_node_id", pa.string()), ("ray_node_ip", pa.string()),
    ("gpu_name", pa.string()), ("gpu_count", pa.int32()), ("gpu_capability", pa.string()),
    ("gpu_driver", pa.string()), ("gpu_memory_mb", pa.int64()), ("gpu_sm_clock_mhz", pa.int32()),
    ("cuda_version", pa.string()), ("cudnn_version", pa.string()), ("torch_version", pa.string()),
    ("torchvision_version", pa.string()), ("ray_version", pa.string()), ("python_version", pa.string()),
    ("cpu_model", pa.string()), ("num_threads", pa.int32()), ("instance_type", pa.string()),
    ("env", pa.string()),  # JSON of an allow-list of environment variables, never the whole environment
    ("impl_flags", pa.string()),  # JSON of the determinism switches the worker really set
    ("spec_json", pa.string()),  # the RunSpec as it ran
    ("status", pa.string()), ("error", pa.string()), ("attempts", pa.int32()),
    ("epochs", pa.int32()), ("train_seconds", pa.float64()), ("epoch_seconds", pa.list_(pa.float64())),
    ("test_accuracy", pa.float64()), ("test_loss", pa.float64()),
    ("per_class_accuracy", pa.list_(pa.float64())), ("predictions", pa.list_(pa.int32())),
    ("weights_sha256", pa.string()), ("weights_norm", pa.float64()),
    ("precision", pa.string()), ("channels_last", pa.bool_()), ("compiled", pa.bool_()),  # tooling options
    ("epoch_metrics", pa.string()),  # JSON list of a user function's ctx.report calls: epoch, seconds, metrics
    ("cudnn_benchmark", pa.bool_()),  # tooling option: cuDNN autotuning on
    ("cublas_version", pa.string()), ("triton_version", pa.string()),  # loaded cuBLAS (GPU); Triton (compiled)
    ("tf32_override", pa.string()),  # NVIDIA_TF32_OVERRIDE: the driver-level TF32 switch, hashed in fingerprint_id
    ("tf32_settings", pa.string()),  # JSON of torch's TF32 switches as the GPU run used them; null on a CPU
    ("fingerprint_complete", pa.bool_()),  # false: a part that should be known was not (e.g. NVML failed)
    ("fingerprint_missing", pa.string()),  # comma-joined names of those parts; "" when complete
    ("vary_bitflip", pa.bool_()), ("seed_bitflip", pa.int64()),
    ("bitflip", pa.string()),  # the initial weight whose lowest bit was flipped, `name[flat index]`
    ("worker_pid", pa.int64()), ("worker_runs", pa.int32()),  # the process that ran it, and its runs before
    ("stack_spec", pa.string()),  # JSON of the stack's definition (orchestrator/axes.py Stack) the run executed in
    ("packages", pa.string()),  # JSON name -> version as imported in the worker (torch, numpy, nvidia-*, the stack's)
    ("cpu_capability", pa.string()),  # the CPU kernel ISA torch dispatched to (DEFAULT, AVX2, AVX512, ...)
    ("hip_version", pa.string()), ("miopen_version", pa.string()),  # AMD GPUs (ROCm builds of torch)
    ("dist_backend", pa.string()),  # gloo | nccl for a data-parallel replica (world_size > 1); null otherwise
    ("rank_pids", pa.list_(pa.int64())), ("rank_nodes", pa.list_(pa.string())),  # per rank: process, Ray node
    ("ranks_agree", pa.bool_()),  # every rank's fingerprint_id is the same
    ("epoch_lr", pa.list_(pa.float64())),  # built-in loop: learning rate of each epoch's first optimiser step
    ("attention_backend", pa.string()),  # SDPA kernel the built-in transformer's first attention call ran; else null
    ("traceback", pa.string()),  # a failed run's full traceback (also in OUT/logs/<run_id>.log); null when ok
    ("note", pa.string()),  # a user function's ctx.note calls: e.g. what its framework set process-wide
    ("epoch_weights_sha256", pa.list_(pa.string())),  # built-in loop: weights digest after each epoch
    ("epoch_sketch", pa.list_(pa.list_(pa.float64()))),  # built-in loop: runner.weights_sketch after each epoch
    ("row_sha256", pa.string()),  # digest of the row's other values (row_digests): a damaged file reads as damaged
    ("epoch_loss", pa.list_(pa.float64())),  # built-in loop: mean training loss per example of each epoch
]
# Every tooling axis has its column (orchestrator/axes.py); the first axes already have theirs above.
RUN_SCHEMA = pa.schema([*_RUN_FIELDS, *[(a.column, a.arrow) for a in AXES if a.column not in dict(_RUN_FIELDS)]])

LABELS_SCHEMA = pa.schema([("label", pa.int32()), ("subgroup", pa.int32())])


# How long one object-storage call may wait and retry. The SDK defaults are far longer (the GCS
# client retries for 15 minutes), so an unreachable bucket looked like a hang, not an error.
CONNECT_TIMEOUT_S = 5
REMOTE_TIMEOUT_S = 30


class StoreError(OSError):
    """OUT cannot be reached or read: one line naming the URI and what to check."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow file system and a path in it. s3:// and gs:// take their endpoint and credentials
    from the usual environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), and every call
    on them gives up after REMOTE_TIMEOUT_S."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), absolute(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)  # s3: resolves the bucket's region (SDK timeouts)
    except (OSError, pa.ArrowInvalid) as e:
        raise unreachable(uri, e) from None
    # from_uri takes no timeouts; rebuild the same file system (its pickling arguments) with them
    rebuild, (kwargs,) = fs.__reduce__()
    if isinstance(fs, pafs.S3FileSystem):
        kwargs |= {"connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": REMOTE_TIMEOUT_S}
    elif isinstance(fs, pafs.GcsFileSystem):
        kwargs |= {"retry_time_limit": timedelta(seconds=REMOTE_TIMEOUT_S)}
    return rebuild(kwargs), path


def unreachable(uri: str, error: BaseException) -> StoreError:
    """An OSError of a file-system call as one line naming OUT (and, for object storage, what to check)."""
    if isinstance(error, StoreError):
        return error
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    hint = ("; check the network, the credentials and the endpoint (AWS_ENDPOINT_URL, "
            "GOOGLE_APPLICATION_CREDENTIALS)" if "://" in uri else "")
    return StoreError(f"{uri}: cannot access the results storage ({first}){hint}")


def absolute(uri: str) -> str:
    """A local OUT as an absolute path: workers run in Tune's trial folders, not the caller's."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


WRITE_TRIES = 4  # a write that fails is tried again after 0.5, 1, 2 s: a storage hiccup is not a lost run


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes, tries: int = WRITE_TRIES) -> None:
    """Write a whole file atomically (temp name + rename locally, one PUT on object storage), tried
    `tries` times with backoff; the last failure is raised."""
    for attempt in range(tries):
        try:
            return _write_once(fs, path, data)
        except OSError:
            if attempt == tries - 1:
                raise
            time.sleep(0.5 * 2**attempt)


def _write_once(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    if not is_local(fs):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    finally:
        if exists(fs, tmp):
            fs.delete_file(tmp)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_table(fs: pafs.FileSystem, path: str, table: pa.Table, **options) -> None:
    buf = io.BytesIO()
    # a CRC per data page: a flipped bit in a row's values fails its read instead of changing it
    pq.write_table(table, buf, write_page_checksum=True, **options)
    write_bytes(fs, path, buf.getvalue())


def run_path(root: str, run_id: str) -> str:
    return f"{root}/runs/{run_id}.parquet"


def weights_path(root: str, run_id: str) -> str:
    return f"{root}/weights/{run_id}.safetensors"


def overhead_path(root: str, probe_id: str) -> str:
    return f"{root}/overhead/{probe_id}.parquet"


def log_path(root: str, trial_id: str) -> str:
    """The full error of a run or probe whose worker died, or the traceback of a run whose training
    raised (keyed by run_id); the terminal shows one line of it."""
    return f"{root}/logs/{trial_id}.log"


def labels_path(root: str, dataset: str) -> str:
    return f"{root}/datasets/{dataset}.parquet"


DIGEST = "row_sha256"


def row_digests(table: pa.Table) -> list[str]:
    """Per row, sha256 over the non-null values of every run column but the digest itself, by column
    name. Page checksums catch a flipped bit in a file's values; this catches the rest (measured:
    ~1.7% of single-byte flips in a run file's footer read back as other values, with no error).
    Nulls are left out so that a column added to the schema later (null in older files) keeps
    every older row's digest."""
    hs = [hashlib.sha256() for _ in range(table.num_rows)]
    for name in sorted(set(table.column_names) & set(RUN_SCHEMA.names) - {DIGEST}):
        col = table.column(name).combine_chunks()
        numeric_list = pa.types.is_list(col.type) and (pa.types.is_integer(col.type.value_type)
                                                        or pa.types.is_floating(col.type.value_type))
        if numeric_list:  # the values' bytes: predictions of 50,000 examples are not turned into Python ints
            off = col.offsets.to_numpy()
            vals = col.values.to_numpy(zero_copy_only=False)
            for i, (h, ok) in enumerate(zip(hs, col.is_valid().to_pylist())):
                if ok:
                    h.update(f"{name}:{off[i + 1] - off[i]}:".encode() + vals[off[i]:off[i + 1]].tobytes())
        else:
            for h, v in zip(hs, col.to_pylist()):
                if v is not None:
                    h.update(f"{name}={v!r};".encode())
    return [h.hexdigest() for h in hs]


def labels_name(workload: dict) -> str:
    """The name of a dataset's labels file, keyed by everything that defines the dataset: two
    `text` workloads over different dataset_roots (or loader options) have different test sets
    and must not share one labels file. A dataset defined by its name alone keeps its bare name."""
    defined = {k: workload[k] for k in ("dataset_root", "dataset_args") if workload.get(k)}
    digest = hashlib.sha256(json.dumps(defined, sort_keys=True).encode()).hexdigest()[:10]
    return f"{workload.get('dataset')}-{digest}" if defined else str(workload.get("dataset"))


def run_table(rows: list[dict]) -> pa.Table:
    """Rows as RUN_SCHEMA with each row's digest filled in (absent columns null)."""
    table = pa.Table.from_pylist([{k: row.get(k) for k in RUN_SCHEMA.names} for row in rows], schema=RUN_SCHEMA)
    return table.set_column(table.schema.get_field_index(DIGEST), DIGEST, pa.array(row_digests(table), pa.string()))


def write_run(fs: pafs.FileSystem, root: str, row: dict) -> None:
    """One Parquet file per run, named by run_id: a re-run replaces it, never duplicates it."""
    write_table(fs, run_path(root, row["run_id"]), run_table([row]))


def amend_run(fs: pafs.FileSystem, root: str, run_id: str, **columns) -> None:
    """Rewrite one run's file with some columns changed (the driver's word on a run, e.g. how many
    tries its trial took, which the run's own process cannot know)."""
    with fs.open_input_file(run_path(root, run_id)) as f:
        row = pq.read_table(f).to_pylist()[0]
    write_run(fs, root, row | columns)


def list_files(fs: pafs.FileSystem, folder: str, suffix: str) -> list[str]:
    """Finished files under `folder` (temp names of writes in flight or interrupted are not)."""
    return sorted(i.path for i in _finished(fs, folder, suffix))


def _finished(fs: pafs.FileSystem, folder: str, suffix: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return [i for i in infos if i.is_file and i.path.endswith(suffix) and not i.base_name.startswith(TMP_PREFIX)]


# runs/ holds one file per run and, after `compact`, a few compacted files of many runs each.
COMPACTED_PREFIX = "compacted-"
COMPACT_RUNS = 1000  # runs per compacted file: bounded memory while compacting, few requests when reading
COMPACT_AT = 500  # per-run files at which a sweep compacts at its end; fewer read fast and stay easy to inspect
# files per scan while compacting: a multi-file scan holds ~0.4 MB per small file until it ends
# (measured: 1,000 files 533 MB peak RSS, 250 files 256 MB), so a compacted file is read in slices
COMPACT_SCAN = 250
COMPACT_ROW_GROUP = 64  # runs per row group: a reader streams a compacted file instead of loading it whole


def _is_compacted(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith(COMPACTED_PREFIX)


def _by_precedence(paths: list[str]) -> list[str]:
    """Newest first: per-run files (written after any compaction that could hold the same run),
    then compacted files newest first (their names start with a zero-padded time)."""
    return [p for p in paths if not _is_compacted(p)] + sorted(filter(_is_compacted, paths), reverse=True)


def _read(fs: pafs.FileSystem, paths: list[str], columns: list[str]) -> pa.Table:
    """Read run files against RUN_SCHEMA (columns added since a file was written come back null),
    each row tagged with the file it came from (`__filename`); page checksums written by write_table
    are checked (files written before them have none). pyarrow.dataset is imported here: it imports
    pandas, ~0.3 s of every worker process's start, and workers only write."""
    import pyarrow.dataset as ds

    verified = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(
        page_checksum_verification=True))
    return ds.dataset(paths, format=verified, filesystem=fs, schema=RUN_SCHEMA).to_table(
        columns=[*columns, "__filename"])


def _read_ours(fs: pafs.FileSystem, paths: list[str], columns: list[str]) -> pa.Table:
    """One multi-file scan; if some file is bad, find it and keep the rest. Rows without a
    run_id (foreign Parquet files) are dropped."""
    scan = list(dict.fromkeys([*columns, "run_id"]))
    try:
        tables = [_read(fs, paths, scan)] if paths else []
    except (pa.ArrowException, OSError):
        tables = []
        for path in paths:
            try:
                tables.append(_read(fs, [path], scan))
            except (pa.ArrowException, OSError):
                pass
    schema = pa.schema([RUN_SCHEMA.field(c) for c in scan] + [pa.field("__filename", pa.string())])
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return table.filter(pc.is_valid(table["run_id"]))


def _newest_per_run(table: pa.Table, paths: list[str]) -> pa.Table:
    """One row per run_id: the one from the file earliest in `paths` (newest first)."""
    rank = {p: i for i, p in enumerate(paths)}
    ranks = np.fromiter((rank[f] for f in table["__filename"].to_pylist()), int, table.num_rows)
    ids = np.asarray(table["run_id"].to_pylist(), dtype=str)
    order = np.lexsort((ranks, ids))
    first = np.ones(len(order), bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    return table.take(np.sort(order[first]))


def read_runs(uri: str, columns: list[str] | None = None) -> pa.Table:
    """All run rows under OUT/runs (per-run and compacted files) in one multi-file scan, one row
    per run_id, the newest. Unreadable or foreign files (no run_id) are skipped with one warning
    that counts them: one bad file must not hide a thousand good ones."""
    fs, root = resolve(uri)
    paths, cols = _by_precedence(list_files(fs, f"{root}/runs", ".parquet")), columns or RUN_SCHEMA.names
    table = _read_ours(fs, paths, cols)
    if set(RUN_SCHEMA.names) <= set(cols):  # every value read: check each row against its digest
        stored = table[DIGEST].to_pylist()
        table = table.filter(pa.array([s is None or s == d for s, d in zip(stored, row_digests(table))], pa.bool_()))
    skipped = sorted(set(paths) - set(table["__filename"].to_pylist()))
    if skipped:
        names = ", ".join(p.rsplit("/", 1)[-1] for p in skipped[:3]) + (", …" if len(skipped) > 3 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable, damaged or foreign Parquet file(s) under "
                      f"{uri.rstrip('/')}/runs ({names}): their runs count as not run, and a resumed sweep runs "
                      "them again", stacklevel=2)
    return _newest_per_run(table, paths).select(cols)


def compact(uri: str, runs_per_file: int = COMPACT_RUNS, at_least: int = 1) -> int:
    """Merge the per-run files under OUT/runs into compacted files of up to `runs_per_file` runs,
    so that reading 10,000 runs takes a few requests, not 10,000. Does nothing when there are
    fewer than `at_least` per-run files. Returns how many per-run files were merged.

    Safe while runs are still being written: each compacted file is written whole first, then
    exactly the per-run files it holds are deleted, and only if unchanged since they were read (a
    run rewritten meanwhile keeps its newer per-run file, which readers prefer). A crash in between
    leaves a run in both places; readers keep one row per run_id.
    """
    fs, root = resolve(uri)
    folder = f"{root}/runs"
    infos = sorted((i for i in _finished(fs, folder, ".parquet") if not _is_compacted(i.path)), key=lambda i: i.path)
    if len(infos) < at_least:
        return 0
    merged = 0
    for start in range(0, len(infos), runs_per_file):
        chunk = {i.path: i for i in infos[start:start + runs_per_file]}
        paths = list(chunk)
        table = pa.concat_tables([_read_ours(fs, paths[s:s + COMPACT_SCAN], RUN_SCHEMA.names)
                                  for s in range(0, len(paths), COMPACT_SCAN)])
        if not table.num_rows:
            continue
        name = f"{COMPACTED_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        write_table(fs, f"{folder}/{name}", table.drop_columns(["__filename"]), row_group_size=COMPACT_ROW_GROUP)
        for path in set(table["__filename"].to_pylist()):
            now = fs.get_file_info(path)
            if (now.mtime, now.size) == (chunk[path].mtime, chunk[path].size):
                fs.delete_file(path)
                merged += 1
    return merged


def ok_run_ids(uri: str) -> set[str]:
    """Runs already finished with status ok, their rows whole: a resumed sweep skips exactly these."""
    t = read_runs(uri)
    return {r for r, s in zip(t["run_id"].to_pylist(), t["status"].to_pylist()) if s == "ok"}


def done_probe_ids(uri: str) -> set[str]:
    """Probes whose file exists under OUT/overhead: a resumed sweep does not run them again."""
    fs, root = resolve(uri)
    return {p.rsplit("/", 1)[1].removesuffix(".parquet") for p in list_files(fs, f"{root}/overhead", ".parquet")}
