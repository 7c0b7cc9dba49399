"""Job files: `dermscore run --config job.toml` — a scheduled job's options in one reviewed file.

The keys are the fields of ``dermscore.run.RunOptions`` (``batch_size`` or ``batch-size``), so every
run option can be set here and a new option needs no second list to keep in step. Tables set dataclass
options field by field (``[thresholds]``). Relative paths are taken relative to the job file, so a job
behaves the same whatever directory cron starts it in. Unknown keys are an error naming the key and
the file: a misspelt ``skip_faild = true`` must not silently do nothing in a nightly job.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from dermscore.errors import UsageError


def load_job(path: Path, target: type) -> dict[str, Any]:
    """Read ``path`` into keyword arguments for the dataclass ``target`` (``RunOptions``)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read the job file ({exc.strerror or exc}).") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: not a valid UTF-8 TOML file: {exc}.") from exc
    return _fields(raw, target, path, prefix="")


def _fields(raw: dict[str, Any], target: type, path: Path, prefix: str) -> dict[str, Any]:
    hints = typing.get_type_hints(target)
    known = [f.name for f in dataclasses.fields(target)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        where = f"{prefix}{key}"
        if name not in known:
            raise UsageError(
                f"{path}: unknown key '{where}'. Known keys{' in [' + prefix[:-1] + ']' if prefix else ''}: "
                f"{', '.join(known)}."
            )
        if name in values:
            raise UsageError(f"{path}: '{where}' is given twice (as {name} and {name.replace('_', '-')}).")
        values[name] = _coerce(value, hints[name], path, where)
    return values


def _coerce(value: Any, expected: Any, path: Path, where: str) -> Any:
    """Check a TOML value against a field's annotation; paths are made relative to the job file."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if Path in options and str in options and isinstance(value, str):
            # "a bundle folder or a bundle name": a path when it exists beside the job file
            candidate = _path(value, path)
            return candidate if candidate.exists() else value
        for option in options:
            try:
                return _coerce(value, option, path, where)
            except UsageError:
                continue
        raise UsageError(f"{path}: '{where}' has the wrong type: got {value!r}, expected {_describe(expected)}.")
    if origin is list:
        if not isinstance(value, list):
            raise UsageError(f"{path}: '{where}' must be a list, e.g. {where} = [...]; got {value!r}.")
        return [_coerce(item, args[0], path, f"{where}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(expected):
        if not isinstance(value, dict):
            raise UsageError(f"{path}: '{where}' must be a table, e.g. [{where}]; got {value!r}.")
        return expected(**_fields(value, expected, path, prefix=f"{where}."))
    checks = {
        Path: lambda v: isinstance(v, str),
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    if expected not in checks:
        raise UsageError(f"{path}: '{where}' cannot be set in a job file; give it on the command line.")
    if not checks[expected](value):
        raise UsageError(f"{path}: '{where}' has the wrong type: got {value!r}, expected {_describe(expected)}.")
    if expected is Path:
        return _path(value, path)
    return float(value) if expected is float else value


def _path(value: str, job_file: Path) -> Path:
    return job_file.resolve().parent / Path(value).expanduser()


def _describe(expected: Any) -> str:
    names = {Path: "a path (string)", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    args = [a for a in typing.get_args(expected) if a is not type(None)] or [expected]
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args)
