"""One process of the barrier-timeout test (tests/test_train_e2e.py).

  python tests/barrier_worker.py PROCESS_ID PORT TIMEOUT_S

Both of the 2 processes start ``jax.distributed`` over 127.0.0.1 (one CPU device each) and meet at the
barrier ``start``, printing one JSON line once through it. Then process 1 sleeps until the test kills
it, never reaching the barrier ``late``; process 0 waits there with a timeout of TIMEOUT_S seconds and
prints one JSON line: the error's type and message (or none) and the seconds it waited.
"""

import json
import os
import sys
import time


def main():
  process_id, port, timeout_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
  os.environ["JAX_PLATFORMS"] = "cpu"
  from mixtral_jax.sharding import distributed
  from mixtral_jax.train.checkpointing import barrier

  assert distributed.initialize(f"127.0.0.1:{port}", 2, process_id, local_device_count=1)
  barrier("start", 120.0)
  print(json.dumps({"process": process_id, "passed": "start"}), flush=True)
  if process_id == 1:
    time.sleep(600)  # never reaches "late"; the test kills this process
    return
  t = time.monotonic()
  try:
    barrier("late", timeout_s)
    outcome = {"error": None}
  except Exception as e:  # noqa: BLE001 - reported to the test, which checks the type
    outcome = {"error": type(e).__name__, "message": str(e)}
  outcome["waited_s"] = time.monotonic() - t
  print(json.dumps(outcome), flush=True)
  os._exit(0)  # skips jax.distributed's shutdown barrier, which process 1 never joins


if __name__ == "__main__":
  main()
