"""Fake lithops.worker.function_handler driven by payload["lhpc_test"].

lhpc_test keys (all optional):
  sleep: float        seconds each call takes
  wait_for: path      each call waits until this file exists (at most 300 s):
                      a test decides when a call ends, without guessing a time
  record_dir: path    write <job_key>-<call_id>-<pid>-<ns>.json per finished call
  crash: "always" | "once" | null
                      SIGKILL the calling (handler) process; "once" only when
                      crash_marker does not exist yet (it is created first)
  crash_marker: path
  fail: bool          raise RuntimeError (an exception inside function_handler)
  missing_data: bool  raise StorageNoSuchKeyError, as when the client already
                      deleted the job's data
  print: str          print() it and os.write() it to fd 1 (must not reach the
                      protocol channel)
  setenv: {name: value}
                      set in os.environ first, as a function that changes its
                      environment does (the handler must undo it)
  probe_env: name     record that variable as os.environ and a child process
                      see it (probe / probe_c; null when unset)
  square: true        each call reads the integer at <JOBS_PREFIX>/<job_key>/<call_id>/in
                      from the Redis of payload["config"]["redis"] and writes its square
                      to .../out: as a Lithops call reads its data from, and writes its
                      result to, the storage the client's config names (Lithops' Redis
                      backend passes that section to redis.Redis(**section) without its
                      storage_bucket and user_agent keys)
"""
import json
import logging
import os
import signal
import subprocess
import sys
import time

from lithops.storage.utils import StorageNoSuchKeyError
from lithops.utils import setup_lithops_logger

logger = logging.getLogger('lithops.worker.handler')


def _crash(test):
    mode = test.get('crash')
    if mode == 'always':
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == 'once':
        marker = test['crash_marker']
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def _square_in_redis(payload, call_id):
    import redis
    from lithops.constants import JOBS_PREFIX
    section = {k: v for k, v in payload['config']['redis'].items() if k not in ('storage_bucket', 'user_agent')}
    r = redis.Redis(**section)
    key = f"{JOBS_PREFIX}/{payload['job_key']}/{call_id}"
    x = int(r.get(key + '/in'))
    r.set(key + '/out', str(x * x))
    r.close()


def function_handler(payload):
    job_key = payload['job_key']
    # As the real one (Lithops 3.7): create_job() loads the function and
    # data, logging at whatever level the logger has, and only then
    # setup_lithops_logger(job.log_level).
    logger.debug('loading function and data of %s (before the task level is set)', job_key)
    setup_lithops_logger(payload.get('log_level'))
    logger.info('Tasks received: %d - Worker processes: 1', len(payload['call_ids']))
    logger.debug('debug line of %s', job_key)
    test = payload.get('lhpc_test') or {}
    _crash(test)
    if test.get('missing_data'):
        bucket = payload.get('config', {}).get('lithops', {}).get('storage', 'fake')
        raise StorageNoSuchKeyError(bucket, payload.get('func_key', f'lithops.jobs/{job_key}/func.pickle'))
    for name, value in (test.get('setenv') or {}).items():
        os.environ[name] = value
    if test.get('fail'):
        raise RuntimeError('fake function_handler failure requested by lhpc_test.fail')
    for call_id in payload['call_ids']:
        start = time.time()
        if test.get('print') is not None:
            text = str(test['print'])
            print(text)
            sys.stdout.flush()
            os.write(1, (text + '\n').encode())
        if test.get('sleep'):
            time.sleep(float(test['sleep']))
        if test.get('wait_for'):
            deadline = time.monotonic() + 300
            while not os.path.exists(test['wait_for']) and time.monotonic() < deadline:
                time.sleep(0.02)
        if test.get('square'):
            _square_in_redis(payload, call_id)
        end = time.time()
        record_dir = test.get('record_dir')
        if record_dir:
            record = {
                'job_key': job_key, 'call_id': call_id, 'pid': os.getpid(),
                'start': start, 'end': end,
                'worker_processes': payload.get('worker_processes'),
                'activation_id': os.environ.get('__LITHOPS_ACTIVATION_ID'),
                'backend': os.environ.get('__LITHOPS_BACKEND'),
                'rank': os.environ.get('LITHOPS_HPC_RANK'),  # which rank's handler ran it
                'marker': os.environ.get('LITHOPS_FAKE_MARKER'),  # which image ran it (a test's label)
            }
            probe = test.get('probe_env')
            if probe:
                child = subprocess.run(['sh', '-c', 'printf "%s" "${' + probe + '-}"'], capture_output=True, text=True)
                record['probe'] = os.environ.get(probe)
                record['probe_c'] = child.stdout or None
            name = f'{job_key}-{call_id}-{os.getpid()}-{time.time_ns()}.json'
            tmp = os.path.join(record_dir, '.' + name + '.tmp')
            with open(tmp, 'w') as f:
                json.dump(record, f)
            os.replace(tmp, os.path.join(record_dir, name))
