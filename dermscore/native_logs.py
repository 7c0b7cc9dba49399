"""Quiet by default: TensorFlow's, absl's, oneDNN's and CUDA's start-up lines stay off a normal run's stderr.

TensorFlow 2.21 writes them from C++ through absl before ``absl::InitializeLog`` is called, which ignores
``TF_CPP_MIN_LOG_LEVEL``, so the only lever is the file descriptor: the process's stderr (fd 2) becomes
a pipe whose lines a thread forwards unless they are that chatter (absl's INFO and WARNING lines and a
few known-harmless CUDA registration errors, with their continuation lines), while Python's own ``sys.stderr`` (our messages, warnings,
the progress bar) writes to the real stderr directly. Errors from native code still come through.
``--verbose`` leaves all of it alone and does not lower TensorFlow's log level.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading

# absl / glog line heads at INFO or WARNING ("I0000 00:00:1795780046.312045    7339 port.cc:153] ..."),
# the older TensorFlow form ("2026-11-27 11:00:00.000000: W tensorflow/...:38] ..."), absl's notice
# that it is not initialised, and CUDA plugins registering twice or finding no driver (harmless).
CHATTER = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\]"
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] \S+:\d+\]"
    rb"|E\d{4} .*(Unable to register cu\w+ factory|failed call to cuInit|computation placer already registered))"
)
# Where any native log record starts; lines between two heads continue the record before them.
RECORD_HEAD = re.compile(rb"^(WARNING: All log messages|[IWEF]\d{4} |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] )")
LIBRARY_LOGGERS = ("tensorflow", "absl", "tf2onnx", "jax")
_installed: list[threading.Thread] = []


def apply(verbose: bool) -> None:
    """Before TensorFlow loads: keep its start-up lines off stderr, or with ``verbose`` keep everything.

    Only in a process whose ``sys.stderr`` is still its own: a program or test runner that captures it
    (``typer.testing.CliRunner``) sees Python's output as before and native lines are left alone.
    """
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")  # dermscore.runtime.configure would make it 3
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if _installed or sys.stderr is not sys.__stderr__ or sys.stderr is None:
        return
    _filter_native_stderr()


def _filter_native_stderr() -> None:
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = os.fdopen(os.dup(real), "w", buffering=1, encoding=sys.__stderr__.encoding,
                           errors="backslashreplace")
    thread = threading.Thread(target=_forward, args=(read_end, real), name="native-stderr", daemon=True)
    thread.start()
    _installed.append(thread)
    atexit.register(_drain, thread)


def _forward(read_end: int, real: int) -> None:
    dropping = False
    with os.fdopen(read_end, "rb") as pipe:
        for line in pipe:
            dropping = bool(CHATTER.match(line)) or (dropping and not RECORD_HEAD.match(line))
            if not dropping:
                os.write(real, line)


def _drain(thread: threading.Thread) -> None:
    """At exit, let the thread pass on what native code wrote last (children may keep the pipe open)."""
    sys.stderr.flush()
    os.close(2)
    thread.join(timeout=2)
