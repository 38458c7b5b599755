"""The registry of built-in data sets and the files behind them.

Data files are never shipped with the package. ``sources.tsv`` pins each file to an upstream
commit and a sha256; :func:`resolve_data_file` finds a file in a user-given data directory or in
the user cache, downloading it into the cache when neither has it, and checks its digest.
The per-data-set parsers live in :mod:`forgetless.data.builtin`, which registers them here.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import http.client
import os
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from forgetless.data.records import KINDS, Record
from forgetless.digests import read_sha256
from forgetless.errors import ForgetlessError
from forgetless.paths import cache_dir

DATA_DIR_ENV = "FORGETLESS_DATA_DIR"
SOURCES_FILE = Path(__file__).with_name("sources.tsv")
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class SourceFile:
    """One row of ``sources.tsv``: where a data file comes from and what it must hash to."""

    path: str
    source_repo: str
    commit: str
    source_path: str
    license: str
    bytes: int
    sha256: str

    @property
    def url(self) -> str:
        # Pinning the commit makes the bytes immutable, so the sha256 can never drift.
        quoted = urllib.parse.quote(self.source_path)
        return f"https://raw.githubusercontent.com/{self.source_repo}/{self.commit}/{quoted}"


@functools.cache
def sources() -> dict[str, SourceFile]:
    with SOURCES_FILE.open(encoding="utf-8", newline="") as handle:
        rows = csv.DictReader(handle, delimiter="\t")
        return {row["path"]: SourceFile(**{**row, "bytes": int(row["bytes"])}) for row in rows}


def describe_sources(relpaths: Iterable[str]) -> str:
    """'repo@commit (license)' for the distinct upstreams of ``relpaths``, for descriptions."""
    seen: dict[str, None] = {}
    for relpath in relpaths:
        source = sources()[relpath]
        seen[f"{source.source_repo}@{source.commit[:12]} ({source.license})"] = None
    return "; ".join(seen)


def data_cache_dir() -> Path:
    return cache_dir() / "data"


# Hashing every file on every load would dominate small runs; a file is re-checked only when its
# size or mtime changes, i.e. when someone replaced or edited it.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _verification_key(path: Path, expected: str) -> tuple[str, int, int, str]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected)


def verify_sha256(path: Path, expected: str) -> None:
    key = _verification_key(path, expected)
    if key in _VERIFIED:
        return
    actual = read_sha256(path)
    if actual != expected:
        raise ForgetlessError(
            f"data file {path} is corrupt or a different version: sha256 {actual}, "
            f"expected {expected}; delete it to fetch it again"
        )
    _VERIFIED.add(key)


def download_file(url: str, destination: Path) -> None:
    """Fetch ``url`` into ``destination``; the only code that touches the network."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        name = urllib.parse.unquote(url.rsplit("/", 1)[-1])
        with (
            destination.open("wb") as out,
            tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}") as bar,
        ):
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                bar.update(len(block))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _download_into_cache(source: SourceFile, target: Path, looked_in: list[Path]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # A temp file in the target's own directory makes os.replace atomic: an interrupted download
    # never leaves a truncated file where a later run would trust it.
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".part", dir=target.parent
    )
    os.close(handle)
    temp = Path(temp_name)
    try:
        try:
            download_file(source.url, temp)
        except (OSError, http.client.HTTPException, ValueError) as err:
            places = " or ".join(str(path) for path in looked_in)
            raise ForgetlessError(
                f"data file '{source.path}' is not in {places} and downloading {source.url} "
                f"failed ({_one_line(err)}); pass --data-dir or set {DATA_DIR_ENV} to a "
                f"directory that holds it"
            ) from None
        actual = read_sha256(temp)
        if actual != source.sha256:
            raise ForgetlessError(
                f"download of data file '{source.path}' from {source.url} has sha256 {actual}, "
                f"expected {source.sha256}"
            )
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    _VERIFIED.add(_verification_key(target, source.sha256))  # just hashed; no need to re-read


def resolve_data_file(relpath: str, data_dir: str | Path | None = None) -> Path:
    """Local path of a registered data file, downloading it into the user cache if needed.

    ``data_dir`` wins over ``$FORGETLESS_DATA_DIR``; either is used only if it holds the file,
    otherwise the user cache is tried, then the upstream copy pinned in ``sources.tsv``.
    """
    source = sources().get(relpath)
    if source is None:
        raise ForgetlessError(f"'{relpath}' is not a registered data file")
    given = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    looked_in: list[Path] = []
    if given is not None:
        looked_in.append(Path(given).expanduser())
    looked_in.append(data_cache_dir())
    for root in looked_in:
        candidate = root / relpath
        if candidate.is_file():
            verify_sha256(candidate, source.sha256)
            return candidate
    target = data_cache_dir() / relpath
    _download_into_cache(source, target, looked_in)
    return target


# (paths of the split's files, kind, split) -> records without ids, in file order.
Parser = Callable[[Sequence[Path], str, str], Iterable[Record]]
# (split, subset) -> relpaths of the files that make up that split.
FileLister = Callable[[str, str | None], Sequence[str]]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    kinds: tuple[str, ...]  # the first one is the data set's native kind
    splits: tuple[str, ...]
    default_split: str
    files: FileLister
    parse: Parser
    subsets: tuple[str, ...] = ()
    default_subset: str | None = None
    # Limits on use beyond the license's name (research only, non-commercial), for `data list`.
    terms: str = ""

    def __post_init__(self) -> None:
        assert self.kinds and set(self.kinds) <= set(KINDS), self.kinds
        assert self.default_split in self.splits, self.default_split
        assert (self.default_subset in self.subsets) if self.subsets else not self.default_subset

    @property
    def native_kind(self) -> str:
        return self.kinds[0]

    def all_files(self) -> list[str]:
        subsets: Sequence[str | None] = self.subsets or (None,)
        listed = (rel for split in self.splits for sub in subsets for rel in self.files(split, sub))
        return list(dict.fromkeys(listed))

    @property
    def licenses(self) -> str:
        table = sources()
        return ", ".join(dict.fromkeys(table[relpath].license for relpath in self.all_files()))

    @property
    def size_bytes(self) -> int:
        table = sources()
        return sum(table[relpath].bytes for relpath in self.all_files())


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in DATASETS:
        raise ValueError(f"data set {spec.name!r} registered twice")
    DATASETS[spec.name] = spec
    return spec


def add_builtin(
    name: str,
    summary: str,
    kinds: tuple[str, ...],
    files: FileLister,
    parse: Parser,
    splits: tuple[str, ...] = ("test",),
    subsets: tuple[str, ...] = (),
    terms: str = "",
) -> DatasetSpec:
    """Register a data set read from files of ``sources.tsv``; its description names them."""
    # Training splits are the default where there is one: training on a test split by accident
    # would silently contaminate every later evaluation.
    default_split = "train" if "train" in splits else splits[0]
    spec = DatasetSpec(
        name=name,
        description=summary,
        kinds=kinds,
        splits=splits,
        default_split=default_split,
        files=files,
        parse=parse,
        subsets=subsets,
        default_subset=subsets[0] if subsets else None,
        terms=terms,
    )
    source = describe_sources(spec.all_files())
    return register(dataclasses.replace(spec, description=f"{summary} Source: {source}."))


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    spec = DATASETS.get(name)
    if spec is None:
        raise ForgetlessError(f"unknown data set '{name}'; known: {', '.join(list_datasets())}")
    return spec


def _pick(name: str, what: str, value: str | None, offered: Sequence[str], default: str) -> str:
    if value is None:
        return default
    if value not in offered:
        raise ForgetlessError(
            f"data set '{name}' has no {what} '{value}'; choose one of: {', '.join(offered)}"
        )
    return value


def load_dataset(
    name: str,
    kind: str | None = None,
    split: str | None = None,
    subset: str | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Records of a registered data set, in file order; ``limit`` keeps the first N.

    Ids are ``name[/subset]/split/N``; a parser that names its records itself (a pool names
    each record after the data set it came from) gets ``name/split/<its id>`` instead.
    """
    spec = get_dataset_spec(name)
    kind = _pick(name, "kind", kind, spec.kinds, spec.native_kind)
    split = _pick(name, "split", split, spec.splits, spec.default_split)
    if spec.subsets:
        subset = _pick(name, "subset", subset, spec.subsets, spec.default_subset or "")
    elif subset is not None:
        raise ForgetlessError(f"data set '{name}' has no subsets (got '{subset}')")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ForgetlessError(f"limit must be a non-negative integer, got {limit!r}")
    paths = [resolve_data_file(relpath, data_dir) for relpath in spec.files(split, subset)]
    prefix = "/".join(part for part in (name, subset, split) if part)
    records: list[Record] = []
    for record in spec.parse(paths, kind, split):
        if limit is not None and len(records) >= limit:
            break
        suffix = record.id or str(len(records))
        records.append(dataclasses.replace(record, id=f"{prefix}/{suffix}"))
    return records


def split_sizes(name: str, data_dir: str | Path | None = None) -> dict[str, int]:
    """Records per split (of the first subset) in the data set's native kind."""
    spec = get_dataset_spec(name)
    return {split: len(load_dataset(name, split=split, data_dir=data_dir)) for split in spec.splits}
