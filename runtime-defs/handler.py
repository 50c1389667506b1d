#!/usr/bin/env python3
"""lithops-hpc warm handler: runs Lithops calls for the C++ dispatcher.

The dispatcher (src/dispatch/) starts one long-lived handler per slot, inside
the container (``singularity exec instance://NAME python3
/opt/lithops-hpc/handler.py``) or directly on the host, and talks to it with
JSON lines: one UTF-8 JSON object per line, in both directions.

Protocol (version 1)
--------------------
handler -> dispatcher, once, after setup::

    {"event": "ready", "pid": 1234, "python": "3.11", "lithops": "3.7.0"}

``lithops`` is null when Lithops cannot be imported; the handler still starts
and answers every task with ok:false and the import error.

dispatcher -> handler::

    {"id": 7, "action": "send_task" | "get_metadata" | "ping", "payload": {...}}

``payload`` is the decoded Lithops payload (the dispatcher already undid the
base64 of the AMQP message).

handler -> dispatcher, exactly one line per request, in request order::

    {"id": 7, "ok": true, "elapsed": 0.0123}
    {"id": 7, "ok": false, "error": "...", "elapsed": 0.0123}
    {"id": 7, "ok": true, "elapsed": 0.0001, "echo": {...}}      (ping only)

``ok`` says whether the handler could run the call.  A *function* error is
ok:true: Lithops writes it to storage itself and the client raises it.
ok:false means the call could not be run at all (Lithops missing, job data
already deleted by the client, an exception inside function_handler...).
A line that is not a JSON object with an integer id is answered with
``"id": null`` and ok:false.

Actions:

- ``send_task``: a Lithops job payload (normally one call).  Runs
  ``lithops.worker.function_handler(payload)`` in this process the way the
  stock singularity entry point does (fresh ``__LITHOPS_ACTIVATION_ID``,
  ``__LITHOPS_BACKEND=singularity``, log level from the payload), with
  ``worker_processes`` forced to 1.  Lithops itself forks a JobRunner process
  per call, so user code never runs in the handler process.
- ``get_metadata``: computes ``lithops.worker.utils.get_runtime_metadata()``
  and stores it, JSON-encoded, with ``InternalStorage(payload).put_data`` at
  ``lithops.jobs/<runtime_name>.meta`` (the payload is the client's storage
  config plus ``runtime_name`` and ``log_level``), exactly like the stock
  entry point.  ok:true once stored.
- ``ping``: echoes the payload; needs no Lithops.

Process rules:

- stdout is the protocol channel only.  At start the real stdout is moved to
  a private descriptor and fd 1 is pointed at fd 2, so Lithops logging and
  anything user code prints goes to stderr.  Processes forked from the
  handler get /dev/null on the private descriptor and on stdin, and die with
  the handler (PR_SET_PDEATHSIG) so no call outlives a killed handler.
- EOF on stdin: exit 0.  SIGTERM: kill the running call's processes and exit
  at once (status 143).  SIGINT is ignored (the dispatcher owns shutdown).

Tests replace Lithops by putting a fake ``lithops`` package first on
PYTHONPATH (tests/fake-lithops).  Python 3.9+, standard library only.
"""

import json
import os
import signal
import sys
import time
import traceback
import uuid

_HANDLER_PID = os.getpid()
_PROTO_FD = -1          # private copy of the original stdout
_LITHOPS = None         # lithops module once imported
_LITHOPS_ERROR = None   # text of the import error, if any


# --------------------------------------------------------------------------
# stdio plumbing

def _log(msg):
    sys.stderr.write("lithops-hpc handler[%d]: %s\n" % (os.getpid(), msg))
    sys.stderr.flush()


def _setup_stdio():
    """Keep the real stdout for the protocol; send fd 1 to stderr."""
    global _PROTO_FD
    try:
        sys.stdout.flush()
    except Exception:
        pass
    _PROTO_FD = os.dup(1)            # non-inheritable by default
    os.dup2(2, 1)
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except Exception:
        pass


# Built once: json.dumps with any option builds a new encoder every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def _write_line(obj):
    data = (_ENCODER.encode(obj) + "\n").encode("utf-8")
    view = memoryview(data)
    while view:
        n = os.write(_PROTO_FD, view)
        view = view[n:]


def _after_fork_in_child():
    """Runs in every process forked from the handler (JobRunner ...)."""
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            if _PROTO_FD >= 0:
                os.dup2(devnull, _PROTO_FD)
            os.dup2(devnull, 0)
        finally:
            os.close(devnull)
    except OSError:
        pass
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.getppid() == _HANDLER_PID:
        _set_pdeathsig(signal.SIGKILL)


def _set_pdeathsig(sig):
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except Exception:
        pass


def _kill_children():
    """Kill the processes of a running call (multiprocessing children)."""
    try:
        import multiprocessing
        for child in multiprocessing.active_children():
            try:
                child.kill()
            except Exception:
                pass
    except Exception:
        pass


def _on_sigterm(signum, frame):
    _kill_children()
    os._exit(128 + signum)


# --------------------------------------------------------------------------
# Lithops

def _import_lithops():
    global _LITHOPS, _LITHOPS_ERROR
    try:
        import lithops  # noqa: F401  (imported for its version and warm-up)
        _LITHOPS = lithops
    except BaseException as exc:  # ImportError, SyntaxError, SystemExit ...
        _LITHOPS_ERROR = "%s: %s" % (type(exc).__name__, exc)
        _log("cannot import lithops: " + _LITHOPS_ERROR)
        return
    try:
        # Warm the worker path now so the first task does not pay for it.
        import lithops.worker  # noqa: F401
    except BaseException as exc:
        _LITHOPS_ERROR = "%s: %s" % (type(exc).__name__, exc)
        _log("cannot import lithops.worker: " + _LITHOPS_ERROR)


def _lithops_version():
    if _LITHOPS is None:
        return None
    version = getattr(_LITHOPS, "__version__", None)
    if version is None:
        try:
            from lithops.version import __version__ as version
        except Exception:
            version = None
    return None if version is None else str(version)


class HandlerError(Exception):
    """The call could not be run (answered with ok:false)."""


def _require_lithops():
    if _LITHOPS is None or _LITHOPS_ERROR is not None:
        raise HandlerError("lithops is not usable in this runtime (%s)"
                           % (_LITHOPS_ERROR or "not imported"))


def _setup_logger(payload):
    try:
        from lithops.utils import setup_lithops_logger
    except Exception:
        return
    try:
        setup_lithops_logger(payload.get("log_level", "INFO"))
    except Exception as exc:
        _log("setup_lithops_logger failed: %s" % exc)


_LOG_LEVEL = object()    # the level last applied (none yet)


def _apply_log_level(payload):
    global _LOG_LEVEL
    level = payload.get("log_level", "INFO")
    if level != _LOG_LEVEL:
        _setup_logger(payload)
        _LOG_LEVEL = level


def _environ_snapshot():
    """os.environ as it is now.  CPython keeps it encoded in os.environ._data:
    copying and comparing that skips decoding every variable on every call
    (the bulk of a short call's cost in this handler)."""
    data = getattr(os.environ, "_data", None)
    return dict(data) if isinstance(data, dict) else dict(os.environ)


def _restore_environ(saved):
    """Undo a call's changes to os.environ (keep Lithops' warm marker)."""
    warm = os.environ.get("WARM_CONTAINER")
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        env, unset, put = data, os.unsetenv, os.putenv
    else:
        env, unset, put = os.environ, None, None
    for key in env.keys() - saved.keys():   # set difference, in C
        if unset:
            unset(key)
        del env[key]
    if env != saved:                        # usually equal by now: one C compare
        for key, value in saved.items():
            if env.get(key) != value:
                if put:
                    put(key, value)
                env[key] = value
    if warm is not None:
        os.environ["WARM_CONTAINER"] = warm


def do_send_task(payload):
    _require_lithops()
    if not isinstance(payload.get("call_ids"), list) or not payload["call_ids"]:
        raise HandlerError("send_task payload has no call_ids")
    from lithops.worker import function_handler

    # What the stock entry point does per message: a fresh activation id,
    # the backend name.  One call per handler process: Lithops'
    # multi-process path is not used.
    payload["worker_processes"] = 1
    # The task's log level before function_handler runs: Lithops sets it
    # only after loading the function and data (create_job), which would
    # otherwise log at the previous task's level (DEBUG lines for an INFO
    # task).  Only when it changes: the logger setup costs a call's time.
    _apply_log_level(payload)
    saved_env = _environ_snapshot()
    saved_cwd = os.getcwd()
    os.environ["__LITHOPS_ACTIVATION_ID"] = uuid.uuid4().hex[:12]
    os.environ["__LITHOPS_BACKEND"] = "singularity"
    try:
        function_handler(payload)
    finally:
        _restore_environ(saved_env)
        try:
            os.chdir(saved_cwd)
        except OSError:
            pass


def do_get_metadata(payload):
    _require_lithops()
    runtime_name = payload.get("runtime_name")
    if not runtime_name:
        raise HandlerError("get_metadata payload has no runtime_name")
    from lithops.constants import JOBS_PREFIX
    from lithops.storage import InternalStorage
    from lithops.worker.utils import get_runtime_metadata

    _apply_log_level(payload)
    runtime_meta = get_runtime_metadata()
    internal_storage = InternalStorage(payload)
    key = "/".join([JOBS_PREFIX, runtime_name + ".meta"])
    internal_storage.put_data(key, json.dumps(runtime_meta))
    _log("runtime metadata stored at %s" % key)


# --------------------------------------------------------------------------
# main loop

def _error_text(exc):
    text = "%s: %s" % (type(exc).__name__, exc)
    if type(exc).__name__ == "StorageNoSuchKeyError":
        text += " (job data not in storage: deleted by the client?)"
    return " ".join(text.split())[:4000]


def handle(request):
    """Answer one request object; always returns the response dict."""
    req_id = request.get("id")
    action = request.get("action")
    payload = request.get("payload")
    start = time.monotonic()
    response = {"id": req_id, "ok": True}
    try:
        if action == "ping":
            response["echo"] = payload
        elif not isinstance(payload, dict):
            raise HandlerError("payload must be a JSON object")
        elif action == "send_task":
            do_send_task(payload)
        elif action == "get_metadata":
            do_get_metadata(payload)
        else:
            raise HandlerError("unknown action %r" % (action,))
    except HandlerError as exc:
        response["ok"] = False
        response["error"] = str(exc)
    except BaseException as exc:  # SystemExit/KeyboardInterrupt from Lithops too
        response["ok"] = False
        response["error"] = _error_text(exc)
        _log("%s %s failed:\n%s" % (action, req_id, traceback.format_exc()))
    response["elapsed"] = round(time.monotonic() - start, 6)
    return response


def _parse(line):
    try:
        request = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, "request is not valid JSON: %s" % exc
    if not isinstance(request, dict):
        return None, "request is not a JSON object"
    req_id = request.get("id")
    if isinstance(req_id, bool) or not isinstance(req_id, int):
        return None, "request has no integer id"
    return request, None


def main():
    _setup_stdio()
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)

    _import_lithops()

    _write_line({
        "event": "ready",
        "pid": os.getpid(),
        "python": "%d.%d" % sys.version_info[:2],
        "lithops": _lithops_version(),
    })

    stdin = sys.stdin.buffer
    while True:
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            continue
        if not line:
            break                       # EOF: the dispatcher is done with us
        if not line.strip():
            continue
        request, problem = _parse(line)
        if request is None:
            _write_line({"id": None, "ok": False, "error": problem,
                         "elapsed": 0.0})
            continue
        try:
            _write_line(handle(request))
        except (BrokenPipeError, OSError) as exc:
            _log("protocol channel closed (%s); exiting" % exc)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
