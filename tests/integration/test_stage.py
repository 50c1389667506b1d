#!/usr/bin/env python3
"""`lithops-hpc stage` under real Open MPI: 4 ranks, each its own "node"
(LITHOPS_HPC_NODE_ID=node<rank>) with its own directory (%n in --sif-path).

Run: meson test -C build integration/stage
 or  LHPC_BIN=build/lithops-hpc LHPC_BUILD_ROOT=build /usr/bin/python3 tests/integration/test_stage.py

Images come from tests/tools/make-sif (valid SIFs of exact sizes). Outcomes
are read from the JSON that `stage --json` prints and from the files left on
disk, never from timing. Waits poll against a deadline; no blind sleeps.
"""

import filecmp
import json
import os
import pty
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import unittest
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lhpc_test import wait_until  # noqa: E402

BIN = os.environ.get("LHPC_BIN", "build/lithops-hpc")
BUILD = Path(os.environ.get("LHPC_BUILD_ROOT", Path(BIN).resolve().parent))
MAKE_SIF = str(BUILD / "tests" / "tools" / "make-sif")
MPIRUN = shutil.which("mpirun") or "/usr/bin/mpirun"
NP = 4
MiB = 1 << 20
EXIT_USAGE, EXIT_IMAGE, EXIT_STAGE = 2, 4, 7

# Every rank runs through this: records its pid (so a test can signal the
# ranks the way scancel does), names its node, and lets one rank run under a
# test-chosen wrapper (no DAC override, a tiny disk, a file-size limit).
RANK_WRAPPER = r'''
echo $$ > "$LHPC_T_PIDS/$OMPI_COMM_WORLD_RANK"
export LITHOPS_HPC_NODE_ID=node$((OMPI_COMM_WORLD_RANK / ${LHPC_T_PER_NODE:-1}))
if [ "$OMPI_COMM_WORLD_RANK" = "${LHPC_T_SPECIAL_RANK:--1}" ]; then eval "$LHPC_T_SPECIAL"; fi
exec "$0" "$@"
'''


def make_sif(path, size=None):
    subprocess.run([MAKE_SIF, str(path)] + ([str(size)] if size is not None else []), check=True)
    return Path(path)


def min_sif_size():
    return int(subprocess.run([MAKE_SIF, "--min-size"], check=True, capture_output=True, text=True).stdout)


class StageTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.path.exists(MAKE_SIF):
            raise unittest.SkipTest(f"{MAKE_SIF} not built")

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="lhpc-stage-"))
        self.addCleanup(self._cleanup_tmp)
        self.base = self.tmp / "nodes"          # node N's sif_path: base/nodeN
        self.pids = self.tmp / "pids"
        self.pids.mkdir()
        self.job = f"t{os.getpid()}-{self.id().rsplit('.', 1)[-1]}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LITHOPS_HPC_"))}
        self.env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                        LITHOPS_HPC_STATE_DIR=str(self.tmp / "state"), LITHOPS_HPC_JOB_ID=self.job,
                        LHPC_T_PIDS=str(self.pids))

    def _cleanup_tmp(self):
        for p in self.tmp.rglob("*"):  # a test may have left a read-only directory behind
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        for m in getattr(self, "mounts", []):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- helpers

    def argv(self, sif, *extra, np=NP, sif_path=None):
        return [MPIRUN, "--oversubscribe", "--allow-run-as-root", "-np", str(np),
                "sh", "-c", RANK_WRAPPER, BIN, "stage", "--sif", str(sif),
                "--sif-path", sif_path or str(self.base / "%n"), *extra]

    def start(self, sif, *extra, np=NP, env=None, sif_path=None):
        for p in self.pids.iterdir():
            p.unlink()
        return subprocess.Popen(self.argv(sif, *extra, np=np, sif_path=sif_path), env={**self.env, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stage(self, sif, *extra, np=NP, env=None, sif_path=None, timeout=120):
        p = self.start(sif, *extra, np=np, env=env, sif_path=sif_path)
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err

    def stage_json(self, sif, *extra, **kw):
        rc, out, err = self.stage(sif, "--json", *extra, **kw)
        self.assertEqual(rc, 0, f"stage failed:\n{err}")
        return json.loads(out), err

    def node_dir(self, n, job=None):
        return self.base / f"node{n}" / f"lithops-hpc-{os.geteuid()}-{job or self.job}"

    def all_files(self):
        return sorted(str(p.relative_to(self.base)) for p in self.base.rglob("*") if not p.is_dir()) \
            if self.base.exists() else []

    def partials(self):
        return [f for f in self.all_files() if ".part-" in f]

    def partials_written(self):
        def size(f):
            try:
                return (self.base / f).stat().st_size
            except FileNotFoundError:
                return 0
        return sum(1 for f in self.partials() if size(f) > 0)

    def private_dirs(self):
        return sorted(str(p) for p in self.base.glob("*/lithops-hpc-*")) if self.base.exists() else []

    def assert_staged_everywhere(self, src, result, nodes=NP):
        self.assertEqual(result["nodes"], nodes)
        self.assertEqual(result["bytes"], src.stat().st_size)
        self.assertEqual(len(result["xxh3_128"]), 32)
        for n in range(nodes):
            d = self.node_dir(n)
            copy = d / src.name
            self.assertEqual(result["paths"][f"node{n}"], str(copy))
            self.assertTrue(filecmp.cmp(src, copy, shallow=False), f"{copy} differs from {src}")
            self.assertEqual(stat.S_IMODE(d.stat().st_mode), 0o700, f"{d} is not private")
            record = json.loads((d / (src.name + ".stage.json")).read_text())
            self.assertEqual(record["xxh3_128"], result["xxh3_128"])
            self.assertEqual(record["size"], src.stat().st_size)
        self.assertEqual(self.partials(), [])

    # ---------------------------------------------------------------- copies

    def test_copies_are_byte_identical_for_every_size_that_matters(self):
        chunk = 1  # MiB: the edges below are edges of this chunk
        sizes = {
            "smallest-valid": min_sif_size(),
            "exact-multiple": 2 * MiB,
            "one-byte-over": 2 * MiB + 1,
            "several-chunks": 5 * MiB + 12345,
        }
        for label, size in sizes.items():
            with self.subTest(label, size=size):
                src = make_sif(self.tmp / f"{label}.sif", size)
                result, err = self.stage_json(src, "--chunk-mib", str(chunk))
                self.assertFalse(result["skipped"])
                self.assertEqual(result["nodes_copied"], NP)
                self.assert_staged_everywhere(src, result)
                self.assertIn(f"staged {label}.sif", err)  # the final summary line
                self.assertIn("MB/s", err)

    def test_plain_output_is_the_staged_paths(self):
        src = make_sif(self.tmp / "rt.sif", 3 * MiB)
        rc, out, err = self.stage(src)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.splitlines(), [str(self.node_dir(n) / "rt.sif") for n in range(NP)])

    def test_second_run_skips_the_transfer(self):
        src = make_sif(self.tmp / "rt.sif", 3 * MiB + 7)
        first, _ = self.stage_json(src, "--chunk-mib", "1")
        inodes = [(self.node_dir(n) / "rt.sif").stat().st_ino for n in range(NP)]
        second, err = self.stage_json(src, "--chunk-mib", "1")
        self.assertTrue(second["skipped"])
        self.assertEqual(second["nodes_copied"], 0)
        self.assertEqual(second["xxh3_128"], first["xxh3_128"])
        self.assertIn("already staged on all 4 node(s)", err)
        self.assertEqual([(self.node_dir(n) / "rt.sif").stat().st_ino for n in range(NP)], inodes)
        self.assert_staged_everywhere(src, second)

    def test_only_the_node_that_lost_its_copy_gets_a_new_one(self):
        src = make_sif(self.tmp / "rt.sif", 2 * MiB)
        self.stage_json(src)
        (self.node_dir(2) / "rt.sif").unlink()
        kept = (self.node_dir(1) / "rt.sif").stat().st_ino
        again, _ = self.stage_json(src)
        self.assertFalse(again["skipped"])
        self.assertEqual(again["nodes_copied"], 1)
        self.assertEqual((self.node_dir(1) / "rt.sif").stat().st_ino, kept)
        self.assert_staged_everywhere(src, again)

    def test_a_changed_source_is_staged_again(self):
        src = make_sif(self.tmp / "rt.sif", 2 * MiB)
        first, _ = self.stage_json(src)
        make_sif(self.tmp / "new.sif", 2 * MiB + 100).rename(src)
        second, _ = self.stage_json(src)
        self.assertFalse(second["skipped"])
        self.assertNotEqual(second["xxh3_128"], first["xxh3_128"])
        self.assert_staged_everywhere(src, second)

    def test_a_tampered_copy_is_not_trusted(self):
        src = make_sif(self.tmp / "rt.sif", 2 * MiB)
        self.stage_json(src)
        copy = self.node_dir(3) / "rt.sif"
        with open(copy, "r+b") as f:  # same size, one byte different, mtime moves
            f.seek(MiB)
            f.write(b"\xff")
        again, _ = self.stage_json(src)
        self.assertEqual(again["nodes_copied"], 1)
        self.assert_staged_everywhere(src, again)

    def test_a_new_job_links_an_earlier_jobs_verified_copy(self):
        src = make_sif(self.tmp / "rt.sif", 2 * MiB)
        self.stage_json(src)
        old_job = self.job
        self.job = self.env["LITHOPS_HPC_JOB_ID"] = old_job + "-next"
        result, err = self.stage_json(src)
        self.assertEqual(result["nodes_copied"], NP)
        self.assertIn("hard-linked an earlier job's verified copy on 4", err)
        for n in range(NP):
            self.assertEqual((self.node_dir(n) / "rt.sif").stat().st_ino,
                             (self.node_dir(n, old_job) / "rt.sif").stat().st_ino)
        self.assert_staged_everywhere(src, result)

    def test_several_ranks_per_node_share_one_copy(self):
        src = make_sif(self.tmp / "rt.sif", 2 * MiB)
        result, _ = self.stage_json(src, env={"LHPC_T_PER_NODE": "2"})
        self.assertEqual(result["nodes"], 2)
        self.assertEqual(sorted(result["paths"]), ["node0", "node1"])
        self.assert_staged_everywhere(src, result, nodes=2)

    def test_cleanup_removes_what_stage_put_there(self):
        src = make_sif(self.tmp / "rt.sif", 2 * MiB)
        self.stage_json(src)
        rc, _, err = self.stage(src, "--cleanup")
        self.assertEqual(rc, 0, err)
        self.assertEqual(self.all_files(), [])
        self.assertEqual(self.private_dirs(), [])

    def test_transfer_none_checks_the_shared_image_and_copies_nothing(self):
        src = make_sif(self.tmp / "rt.sif", 2 * MiB)
        result, _ = self.stage_json(src, "--transfer", "none")
        self.assertEqual(set(result["paths"].values()), {str(src)})
        self.assertEqual(result["nodes"], NP)
        self.assertEqual(result["nodes_copied"], 0)
        self.assertFalse(self.base.exists())

    # ---------------------------------------------------------------- progress

    def test_batch_logs_get_a_progress_line_every_few_seconds(self):
        src = make_sif(self.tmp / "rt.sif", 14 * MiB)
        # 14 chunks of 1 MiB at 450 ms each (test-only throttle): one 5-second tick.
        rc, _, err = self.stage(src, "--chunk-mib", "1", env={"LITHOPS_HPC_STAGE_THROTTLE_MS": "450"})
        self.assertEqual(rc, 0, err)
        ticks = [line for line in err.splitlines() if "staging: " in line]
        self.assertGreaterEqual(len(ticks), 1, err)
        self.assertRegex(ticks[0], r"staging: [0-9.]+ MiB / 14\.0 MiB \(\d+%\), [0-9.]+ MB/s, ETA \d+:\d\d")
        self.assertNotIn("\r", err)
        self.assertRegex(err, r"staged rt\.sif \(14\.0 MiB\) on 4 node\(s\) in [0-9.]+ s: copied to 4 at [0-9.]+ MB/s")

    def test_a_terminal_gets_a_redrawn_progress_line(self):
        src = make_sif(self.tmp / "rt.sif", 6 * MiB)
        master, slave = pty.openpty()
        # One rank without a launcher (an MPI singleton), stderr on a terminal.
        p = subprocess.Popen([BIN, "stage", "--sif", str(src), "--sif-path", str(self.base / "solo"),
                              "--chunk-mib", "1"], env={**self.env, "LITHOPS_HPC_STAGE_THROTTLE_MS": "250"},
                             stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        chunks = []

        def drain():  # concurrently: a full terminal buffer would block the writer
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=drain)
        reader.start()
        out, _ = p.communicate(timeout=60)
        reader.join(timeout=10)
        os.close(master)
        tty = b"".join(chunks).decode(errors="replace")
        self.assertEqual(p.returncode, 0, tty)
        self.assertIn("\rstaging ", tty)
        self.assertRegex(tty, r"\rstaging [0-9.]+ MiB / 6\.0 MiB \(\d+%\), [0-9.]+ MB/s, ETA \d+:\d\d")
        self.assertIn("6.0 MiB / 6.0 MiB (100%)", tty)
        self.assertEqual(out.strip(), str(self.base / "solo" / f"lithops-hpc-{os.geteuid()}-{self.job}" / "rt.sif"))

    # ---------------------------------------------------------------- refusals

    def assert_refused_and_nothing_created(self, src, expect_in_err, *extra):
        rc, out, err = self.stage(src, *extra)
        self.assertEqual(rc, EXIT_IMAGE, err)
        self.assertIn(expect_in_err, err)
        self.assertEqual(out, "")
        self.assertFalse(self.base.exists(), f"something was created: {list(self.base.rglob('*'))}")
        # Rank 0 reports once; the other ranks exit with the same code quietly.
        errors = [line for line in err.splitlines() if "[error]" in line and "hint:" not in line]
        self.assertEqual(len(errors), 1, err)

    def test_corrupt_source_is_refused_before_anything_moves(self):
        data = bytearray(make_sif(self.tmp / "ok.sif", 2 * MiB).read_bytes())
        data[32:42] = b"SIF_MAGIX\0"
        bad = self.tmp / "corrupt.sif"
        bad.write_bytes(bytes(data))
        self.assert_refused_and_nothing_created(bad, "is not a SIF file")

    def test_empty_and_non_sif_and_missing_sources_are_refused(self):
        empty = self.tmp / "empty.sif"
        empty.touch()
        text = self.tmp / "notes.sif"
        text.write_text("Bootstrap: docker\nFrom: alpine\n" * 10)
        for src, msg in [(empty, "is empty"), (text, "not a SIF"), (self.tmp / "missing.sif", "missing.sif")]:
            with self.subTest(src=src.name):
                self.assert_refused_and_nothing_created(src, msg)

    def test_a_directory_shared_by_nodes_is_refused(self):
        src = make_sif(self.tmp / "rt.sif", MiB)
        rc, _, err = self.stage(src, sif_path=str(self.base / "shared"))
        self.assertEqual(rc, EXIT_USAGE, err)
        self.assertIn("is shared with another node", err)
        self.assertEqual(self.partials(), [])
        self.assertEqual(self.private_dirs(), [])

    def test_sbcast_outside_slurm_is_refused(self):
        src = make_sif(self.tmp / "rt.sif", MiB)
        rc, _, err = self.stage(src, "--transfer", "sbcast")
        self.assertEqual(rc, EXIT_USAGE, err)
        self.assertIn("SLURM_JOB_ID is not set", err)
        self.assertFalse(self.base.exists())

    # ---------------------------------------------------------------- other users (issue 12)

    def as_nobody(self, script):
        """The attacker's steps, as another local user."""
        subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "sh", "-c", script],
                       check=True, cwd="/")

    def test_a_private_directory_another_user_made_is_refused_not_used(self):
        src = make_sif(self.tmp / "rt.sif", 3 * MiB)
        ref, _ = self.stage_json(src, np=1, sif_path=str(self.tmp / "ref"))
        # A place both users reach, sticky like /tmp; job ids are predictable.
        self.tmp.chmod(0o755)
        shared = self.tmp / "shared"
        shared.mkdir(mode=0o777)
        shared.chmod(0o1777)
        evil = make_sif(self.tmp / "evil.sif", 3 * MiB)
        evil.write_bytes(evil.read_bytes()[:-4] + b"EVIL")
        evil.chmod(0o644)
        planted = shared / f"lithops-hpc-{os.geteuid()}-{self.job}"
        record = ("import json, os, sys; st = os.stat(sys.argv[1]); open(sys.argv[1] + '.stage.json', 'w').write("
                  "json.dumps({'format': 'lithops-hpc stage record 1', 'xxh3_128': sys.argv[2], 'size': st.st_size, "
                  "'file': {'dev': st.st_dev, 'ino': st.st_ino, 'size': st.st_size, 'mtime_ns': st.st_mtime_ns, "
                  "'ctime_ns': st.st_ctime_ns}, 'source': 'x'}))")
        self.as_nobody(f"mkdir -m 755 {planted} && cp {evil} {planted}/rt.sif && "
                       f"python3 -c \"{record}\" {planted}/rt.sif {ref['xxh3_128']}")
        rc, out, err = self.stage(src, "--json", np=1, sif_path=str(shared))
        self.assertEqual(rc, EXIT_STAGE, f"stage trusted another user's directory:\n{out}\n{err}")
        self.assertIn("belongs to nobody", err)
        self.assertIn("remove it", err)
        # --cleanup refuses too, and leaves their files alone.
        rc, _, err = self.stage(src, "--cleanup", np=1, sif_path=str(shared))
        self.assertEqual(rc, EXIT_STAGE, err)
        self.assertIn("belongs to nobody", err)
        self.assertTrue((planted / "rt.sif").exists())
        self.assertTrue((planted / "rt.sif.stage.json").exists())

    def test_a_job_id_that_leaves_sif_path_is_refused(self):
        src = make_sif(self.tmp / "rt.sif", MiB)
        rc, _, err = self.stage(src, np=1, env={"LITHOPS_HPC_JOB_ID": "../.."})
        self.assertEqual(rc, EXIT_USAGE, err)
        self.assertIn("job id", err)
        self.assertEqual(self.private_dirs(), [])
        self.assertEqual([p.name for p in self.tmp.iterdir() if p.name.startswith("lithops-hpc")], [])

    def test_a_fifo_given_as_the_image_is_refused_at_once(self):
        fifo = self.tmp / "rt.sif"
        os.mkfifo(fifo)
        p = self.start(fifo, np=1)
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            for pid in self.pids.iterdir():
                os.kill(int(pid.read_text()), signal.SIGKILL)
            p.communicate()
            self.fail("stage hung on a FIFO")
        self.assertEqual(p.returncode, EXIT_IMAGE, err)
        self.assertIn("FIFO", err)
        self.assertEqual(self.private_dirs(), [])

    # ---------------------------------------------------------------- node failures

    def assert_failed_cleanly(self, rc, err, node, reason):
        self.assertEqual(rc, EXIT_STAGE, err)
        self.assertIn(f"node {node} (rank {node[-1]})", err)
        self.assertIn(reason, err)
        self.assertEqual(self.partials(), [], "partial files left behind")
        self.assertEqual([f for f in self.all_files() if f.endswith(".sif")], [], "a copy was renamed into place")
        self.assertEqual(self.private_dirs(), [], "private directories created by this run were left")

    def test_unwritable_node_directory_fails_naming_the_node(self):
        src = make_sif(self.tmp / "rt.sif", 3 * MiB)
        ro = self.base / "node2"
        ro.mkdir(parents=True)
        ro.chmod(0o555)
        # Root ignores permissions; rank 2 runs without the capabilities that let it.
        special = 'exec setpriv --bounding-set=-dac_override,-dac_read_search "$0" "$@"'
        rc, _, err = self.stage(src, env={"LHPC_T_SPECIAL_RANK": "2", "LHPC_T_SPECIAL": special})
        self.assert_failed_cleanly(rc, err, "node2", "Permission denied")

    def test_full_disk_on_one_node_fails_before_the_transfer(self):
        src = make_sif(self.tmp / "rt.sif", 3 * MiB)
        small = self.base / "node1"
        small.mkdir(parents=True)
        # Rank 1 sees a 1 MiB tmpfs as its sif_path (its own mount namespace).
        special = ('exec unshare --mount sh -c \'mount -t tmpfs -o size=1m tmpfs "$1" && shift && exec "$@"\' '
                   f'_ {small} "$0" "$@"')
        rc, _, err = self.stage(src, env={"LHPC_T_SPECIAL_RANK": "1", "LHPC_T_SPECIAL": special})
        self.assert_failed_cleanly(rc, err, "node1", "not enough space")

    def test_write_failure_mid_transfer_stops_every_node(self):
        src = make_sif(self.tmp / "rt.sif", 40 * MiB)
        # Rank 3 may write files of at most 8 MiB (more than Open MPI's 4 MiB
        # shared-memory segment); SIGXFSZ ignored, so write() fails with EFBIG
        # at chunk 8 of 40 while every other node is mid-transfer too.
        special = "trap '' XFSZ; exec prlimit --fsize=8388608 \"$0\" \"$@\""
        rc, _, err = self.stage(src, "--chunk-mib", "1", "--log-level", "debug",
                                env={"LHPC_T_SPECIAL_RANK": "3", "LHPC_T_SPECIAL": special})
        self.assert_failed_cleanly(rc, err, "node3", "File too large")
        self.assert_stopped_early(err, 40)

    def assert_stopped_early(self, err, chunks):
        """Every rank agreed to stop before the end (not merely failed at the end)."""
        m = re.search(r"every rank stopped before chunk (\d+) of (\d+)", err)
        self.assertIsNotNone(m, err)
        self.assertEqual(int(m.group(2)), chunks)
        self.assertLess(int(m.group(1)), chunks)

    # ---------------------------------------------------------------- signals

    def interrupted_run(self, sig, ranks):
        src = make_sif(self.tmp / "rt.sif", 40 * MiB)
        # Test-only throttle: 100 ms per 1 MiB chunk, so the transfer would take ~4 s.
        p = self.start(src, "--chunk-mib", "1", "--log-level", "debug",
                       env={"LITHOPS_HPC_STAGE_THROTTLE_MS": "100"})
        try:
            # Bytes in every partial file: the transfer itself has begun (a
            # partial file exists a moment before, while the nodes still agree).
            wait_until(lambda: self.partials_written() == NP, 30, "every node to start writing")
            wait_until(lambda: len(list(self.pids.iterdir())) == NP, 5, "rank pids")
            for r in ranks:
                os.kill(int((self.pids / str(r)).read_text()), sig)
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        self.assertEqual(self.partials(), [], "partial files left behind")
        self.assertEqual([f for f in self.all_files() if f.endswith(".sif")], [])
        self.assertEqual(self.private_dirs(), [])
        self.assert_stopped_early(err, 40)
        return p.returncode, err

    def test_sigterm_to_every_rank_like_scancel_stops_cleanly_with_143(self):
        rc, err = self.interrupted_run(signal.SIGTERM, range(NP))
        self.assertEqual(rc, 143, err)
        self.assertIn("interrupted by SIGTERM", err)

    def test_sigint_to_one_rank_stops_every_rank_with_130(self):
        rc, err = self.interrupted_run(signal.SIGINT, [2])
        self.assertEqual(rc, 130, err)
        self.assertIn("interrupted by SIGINT on node node2 (rank 2)", err)

    def test_sigterm_to_mpirun_leaves_no_partials(self):
        src = make_sif(self.tmp / "rt.sif", 40 * MiB)
        p = self.start(src, "--chunk-mib", "1", env={"LITHOPS_HPC_STAGE_THROTTLE_MS": "100"})
        try:
            wait_until(lambda: len(self.partials()) == NP, 30, "every node to start writing")
            p.send_signal(signal.SIGTERM)  # mpirun forwards it to every rank, then exits with its own code
            p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(self.partials(), [])
        self.assertEqual(self.private_dirs(), [])


if __name__ == "__main__":
    unittest.main(verbosity=2)
