#!/bin/bash
# GPU binding on a real GPU node: does every slot of a GPU runtime get its
# own GPU, and do concurrent calls really run on different GPUs?
#
#   salloc -N1 --gpus-per-node=4 bench/gpu-binding.sh [--sif IMAGE.sif] [--per-slot N]
#
# Run it inside a Slurm allocation that has GPUs (--gpus-per-node or
# --gres=gpu:N), from a shell where the Lithops client is configured for
# lithops-hpc (backend singularity, the broker's amqp_url: `lithops-hpc up`
# does it) and lithops-hpc and nvidia-smi are in PATH. Without --sif the
# host engine runs the handlers (the node's Python must have Lithops).
#
# It starts `lithops-hpc deploy --gpus-per-slot N` on the allocation's first
# node, waits for it to be ready, maps one call per slot with the Lithops
# client; each call opens a CUDA context on the one device it sees (libcuda
# through ctypes: no framework needed), holds 64 MiB there and waits until
# every call has done the same, then asks nvidia-smi which GPUs hold compute
# processes. PASS: every call saw exactly N devices, no two calls share a GPU
# (PCI bus id), and nvidia-smi shows a process on each of them. The
# deployment is stopped at the end.
set -euo pipefail

SIF=()
PER_SLOT=1
while (($#)); do
    case $1 in
        --sif) SIF=(--sif "$2"); shift 2 ;;
        --per-slot) PER_SLOT=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "gpu-binding.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -n ${SLURM_JOB_ID:-} ]] || { echo "gpu-binding.sh: run inside an allocation with GPUs (salloc --gpus-per-node=N)" >&2; exit 2; }
command -v lithops-hpc >/dev/null || { echo "gpu-binding.sh: lithops-hpc not in PATH" >&2; exit 2; }

engine=()
((${#SIF[@]})) || engine=(--engine host)
node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
srun -N1 -n1 -w "$node" --overlap lithops-hpc deploy "${SIF[@]}" "${engine[@]}" --gpus-per-slot "$PER_SLOT" \
    >"gpu-binding-$SLURM_JOB_ID.log" 2>&1 &
deploy_pid=$!
trap 'lithops-hpc stop "$SLURM_JOB_ID" >/dev/null 2>&1 || true; wait "$deploy_pid" || true' EXIT

# Ready, with its GPU slots: the status file says how many.
slots=""
for _ in $(seq 300); do
    slots=$(lithops-hpc status --json "$SLURM_JOB_ID" 2>/dev/null | /usr/bin/env python3 -c '
import json, sys
d = json.load(sys.stdin)
r = d["ranks"][0]
print(len(r["gpus"]) if r["state"] == "ready" else "")' 2>/dev/null || true)
    [[ -n $slots ]] && break
    kill -0 "$deploy_pid" 2>/dev/null || { echo "deploy ended:"; tail -20 "gpu-binding-$SLURM_JOB_ID.log"; exit 1; }
    sleep 1
done
[[ -n $slots ]] || { echo "FAIL: the deployment was not ready in 300 s (gpu-binding-$SLURM_JOB_ID.log)"; exit 1; }
lithops-hpc status "$SLURM_JOB_ID" | grep -E "GPUs|RANK|^0 " || true

SLOTS=$slots PER_SLOT=$PER_SLOT python3 - <<'PY'
import ctypes, os, subprocess, sys, time, uuid
import lithops

slots, per_slot = int(os.environ["SLOTS"]), int(os.environ["PER_SLOT"])
meet = f"/tmp/lhpc-gpu-binding-{uuid.uuid4().hex}"  # node-local: every call of the map runs on this node


def probe(i, meet=meet, n=slots):
    cu = ctypes.CDLL("libcuda.so.1")
    assert cu.cuInit(0) == 0, "cuInit failed"
    count = ctypes.c_int()
    cu.cuDeviceGetCount(ctypes.byref(count))
    dev, ctx, mem = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
    cu.cuDeviceGet(ctypes.byref(dev), 0)
    bus = ctypes.create_string_buffer(32)
    cu.cuDeviceGetPCIBusId(bus, 32, dev)
    cu.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev)
    cu.cuMemAlloc_v2(ctypes.byref(mem), 64 << 20)
    os.makedirs(meet, exist_ok=True)
    open(os.path.join(meet, str(i)), "w").close()
    deadline = time.time() + 120
    while len(os.listdir(meet)) < n and time.time() < deadline:
        time.sleep(0.1)
    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=gpu_bus_id", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.split()
    return {"call": i, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "count": count.value,
            "bus": bus.value.decode().upper(), "met": len(os.listdir(meet)), "apps": [a.upper() for a in apps]}


fexec = lithops.FunctionExecutor()
res = fexec.get_result(fexec.map(probe, range(slots)))
ok = True
for r in sorted(res, key=lambda r: r["call"]):
    print(f"call {r['call']}: CUDA_VISIBLE_DEVICES={r['visible']} devices={r['count']} bus={r['bus']}")
    ok &= r["count"] == per_slot and r["met"] == slots
buses = [r["bus"] for r in res]
ok &= len(set(buses)) == len(buses) == slots
# nvidia-smi writes 00000000:3B:00.0, CUDA 0000:3B:00.0: compare the tail.
held = {a.split(":", 1)[-1] for r in res for a in r["apps"]}
ok &= all(b.split(":", 1)[-1] in held for b in buses)
print("nvidia-smi compute processes on:", sorted(held))
print("PASS" if ok else "FAIL: devices shared, missing, or calls not concurrent")
sys.exit(0 if ok else 1)
PY
