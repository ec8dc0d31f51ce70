"""A user's Python object named on the command line: ``path/to/file.py:name`` or ``package.module:name`` (reward
functions, environments, tools), imported with one-line errors."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path


def import_object(spec: str, flag: str, kind: str, builtins: str = "") -> object:
    """The object SPEC names; a ValueError naming `flag` and SPEC for a malformed spec, a missing file, a module that
    fails to import or lacks the name. `kind` ("function", "class") and `builtins` ("'synthetic', ", the built-in
    names) are for the messages."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"{flag} {spec}: expected {builtins}'path/to/file.py:{kind}' or 'package.module:{kind}'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ValueError(f"{flag} {spec}: {path}: file not found")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ValueError:
        raise
    except Exception as err:  # any failure of the user's module, a SyntaxError included, is its import failing
        raise ValueError(f"{flag} {spec}: cannot import {target}: {type(err).__name__}: {err}") from err
    if not hasattr(module, name):
        raise ValueError(f"{flag} {spec}: {target} has no {kind} {name!r}")
    return getattr(module, name)
