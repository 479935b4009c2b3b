"""Multi-host input on one machine: 2 processes on loopback (gloo), 2 fake CPU devices each.

The worker (tests/multihost_worker.py) builds an *interleaved* 4-device mesh (process 0, 1, 0, 1)
and checks that global batch row i holds host row i (E3), that each process reads only its rows,
that predict_logits' rows belong to their inputs (the KD targets), that training equals one device,
and that make_mesh(n < all) keeps a device in every process (E12).
"""

import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_two_processes_interleaved_mesh_rows_align():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, NPROC="4", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=str(REPO))
  worker = str(REPO / "tests" / "multihost_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(port), str(i)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=300))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-2000:]}\n{err[-4000:]}"
    assert f"process {i}: all multi-host checks passed" in out
