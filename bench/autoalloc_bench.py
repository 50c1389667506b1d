"""The measuring half of bench/autoalloc.sh (run it through that script, which
sets up the rig and the environment). Prints one line per round and a summary."""
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(os.environ["LHPC_SOURCE_ROOT"])
sys.path.insert(0, str(ROOT / "tests" / "integration"))
import lhpc_test as lt  # noqa: E402

BIN = os.environ["LHPC_BIN"]
WORK = Path(os.environ["LHPC_BENCH_WORK"])
ROUNDS = int(os.environ["LHPC_BENCH_ROUNDS"])
POLL = os.environ["LHPC_BENCH_POLL"]
IDLE = float(os.environ["LHPC_BENCH_IDLE"])
SERVING = 15  # seconds measured with one job serving and nothing to do, each round
TEMPLATE = ROOT / "slurm" / "lithops-deploy.sh"
IMAGE = WORK / "rt.sif"
TICK = os.sysconf("SC_CLK_TCK")


def setup(name):
    d = WORK / name
    d.mkdir()
    (d / "records").mkdir()
    url = lt.fresh_vhost(name)
    conf = d / "config.toml"
    with open(os.open(conf, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(f'[singularity]\nengine = "host"\nworker_processes = 2\npython = "/usr/bin/python3"\n'
                f'[rabbitmq]\namqp_url = "{url}"\n[deploy]\ndrain_timeout = 3\ncleanup = true\n'
                f'[health]\ninterval = 1\n')
    env = dict(os.environ, LITHOPS_HPC_CONFIG=str(conf), LITHOPS_HPC_STATE_DIR=str(d / "state"))
    return d, url, env


def publish_one(d, url, tag):
    payload = lt.make_send_task(1, tag, {"lhpc_test": {"sleep": 0, "record_dir": str(d / "records")}})
    t0 = time.time()
    lt.publish_lithops(url, "send_task", payload)
    return t0


def first_done(d, tag, timeout=300):
    def found():
        names = [p.name for p in (d / "records").glob(f"{tag}-*.json")]
        return names[0] if names else None
    name = lt.wait_until(found, timeout, f"task {tag} done", interval=0.05)
    return int(name.rsplit("-", 1)[1].split(".")[0]) / 1e9


def ctld_log(env):
    out = subprocess.run(["scontrol", "show", "config"], env=env, capture_output=True, text=True).stdout
    m = re.search(r"(?m)^SlurmctldLogFile\s*=\s*(\S+)", out)
    return Path(m.group(1)) if m else None


def slurm_times(env, jid):
    """(submitted, allocated) unix times: from slurmctld's log, which stamps each event to the
    millisecond (the rig's, or any readable one); else scontrol's SubmitTime/StartTime, to the second."""
    log = ctld_log(env)
    if log and log.is_file():
        stamps = {}
        for line in log.read_text(errors="replace").splitlines():
            m = re.match(rf"\[(\S+)\] (_slurm_rpc_submit_batch_job:|sched: Allocate|sched/backfill: Started|backfill: Started) JobId={jid}\b", line)
            if m:
                key = "submit" if m.group(2).startswith("_slurm_rpc") else "start"
                stamps.setdefault(key, datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").timestamp())
        if len(stamps) == 2:
            return stamps["submit"], stamps["start"]
    out = subprocess.run(["scontrol", "-o", "show", "job", jid], env=env, capture_output=True, text=True).stdout

    def t(key):
        m = re.search(rf"\b{key}=(\S+)", out)
        return datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").timestamp()
    return t("SubmitTime"), t("StartTime")


def wait_gone(env, jid):
    def gone():
        r = subprocess.run(["squeue", "-h", "-j", jid], env=env, capture_output=True, text=True)
        return not r.stdout.strip()
    lt.wait_until(gone, 120, f"job {jid} to end", interval=0.5)


def manual_round(i):
    d, url, env = setup(f"manual-{i}")
    t0 = publish_one(d, url, f"m{i}")
    r = subprocess.run(["sbatch", "--parsable", "-N1", f"--output={d}/job-%j.out", f"--chdir={d}", str(TEMPLATE),
                        str(IMAGE), "--cleanup"], env=env, capture_output=True, text=True, check=True)
    jid = r.stdout.strip().split(";")[0]
    done = first_done(d, f"m{i}")
    submit, start = slurm_times(env, jid)
    subprocess.run([BIN, "stop", jid, "--timeout", "60"], env=env, capture_output=True)
    wait_gone(env, jid)
    return {"total": done - t0, "react": submit - t0, "slurm": start - submit, "ours": done - start}


def cpu_seconds(pid):
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def state(d):
    return json.loads((d / "state" / "autoalloc" / "state.json").read_text())


def counters(d):
    return state(d)["counters"]


def rate(d, pid, seconds):
    c0, cpu0, t0 = counters(d), cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    c1, cpu1, el = counters(d), cpu_seconds(pid), time.monotonic() - t0
    per_min = {k: (c1[k] - c0[k]) * 60 / el for k in c0}
    return (cpu1 - cpu0) / el, per_min


def autoalloc_rounds():
    d, url, env = setup("auto")
    log = open(d / "controller.log", "w")
    # --idle-timeout: long enough to measure a serving job's cost after its first task.
    p = subprocess.Popen([BIN, "autoalloc", "--sif", str(IMAGE), "--poll", POLL, "--idle-timeout",
                          str(SERVING + 5), "--max-nodes", "1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        lt.wait_until(lambda: (d / "state" / "autoalloc" / "state.json").exists(), 20, "controller state")
        idle_cpu, idle_q = rate(d, p.pid, IDLE)
        rounds, busy, serving = [], [], []
        for i in range(ROUNDS):
            # Publish at a random point of the poll cycle: right after the scale-to-zero the
            # bench would otherwise always publish just after a poll (a reaction of a whole --poll).
            time.sleep(random.uniform(0, float(POLL)))
            t0 = publish_one(d, url, f"a{i}")
            cpu0, tm0 = cpu_seconds(p.pid), time.monotonic()
            done = first_done(d, f"a{i}")
            busy.append((cpu_seconds(p.pid) - cpu0) / (time.monotonic() - tm0))
            serving.append(rate(d, p.pid, SERVING))  # one job serving, the queue empty
            jid = re.findall(r"submitted job (\d+)", (d / "controller.log").read_text())[-1]
            submit, start = slurm_times(env, jid)
            rounds.append({"total": done - t0, "react": submit - t0, "slurm": start - submit, "ours": done - start})
            lt.wait_until(lambda: not state(d)["jobs"], 120, "scale back to zero", interval=0.5)
            wait_gone(env, jid)
        return rounds, idle_cpu, idle_q, busy, serving
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


def show(label, r):
    print(f"{label}: first task done {r['total']:.2f} s after publish = react {r['react']:.2f} + "
          f"Slurm scheduling {r['slurm']:.2f} + our start-up {r['ours']:.2f} s")


def main():
    manual = []
    for i in range(ROUNDS):
        manual.append(manual_round(i))
        show(f"manual sbatch round {i + 1}", manual[-1])
    auto, idle_cpu, idle_q, busy, serving = autoalloc_rounds()
    for i, r in enumerate(auto):
        show(f"autoalloc round {i + 1}", r)
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    print(f"median first-task latency: autoalloc {med(auto, 'total'):.2f} s, manual sbatch {med(manual, 'total'):.2f} s,"
          f" ratio {med(auto, 'total') / med(manual, 'total'):.2f}")
    for label, rs in (("autoalloc", auto), ("manual sbatch", manual)):
        print(f"median split ({label}): react {med(rs, 'react'):.2f} s, Slurm {med(rs, 'slurm'):.2f} s,"
              f" ours {med(rs, 'ours'):.2f} s")
    print(f"controller idle (--poll {POLL}, {IDLE:.0f} s, no job): CPU {idle_cpu * 100:.2f} %, per minute: "
          f"{idle_q['broker_queries']:.1f} broker, {idle_q['scheduler_queries']:.1f} scheduler queries, "
          f"{idle_q['sbatch_calls']:.1f} sbatch")
    s_cpu = statistics.median(c for c, _ in serving)
    s_q = {k: statistics.median(q[k] for _, q in serving) for k in serving[0][1]}
    print(f"controller with one job serving (--poll {POLL}, {SERVING} s x {len(serving)}, medians): CPU {s_cpu * 100:.2f} %,"
          f" per minute: {s_q['broker_queries']:.1f} broker, {s_q['scheduler_queries']:.1f} scheduler queries,"
          f" {s_q['sbatch_calls']:.1f} sbatch")
    print(f"controller CPU from publish to first task done: median {statistics.median(busy) * 100:.2f} %")


if __name__ == "__main__":
    main()
