"""A process that ran lit-sae under a gloo process group destroys the group at exit, while Python is still whole
(``lit_sae.parallel.data_parallel.destroy_process_group_at_exit``): left to the interpreter's finalisation, gloo
aborted a 2-process ``trainer.test`` that had succeeded (exit -6, "terminate called without an active exception")."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import atexit, tempfile
    import torch.distributed as dist
    # registered first, so it runs last (atexit is last-in first-out): what the group is when Python finalises
    atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
    dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    from lit_sae.parallel.data_parallel import destroy_process_group_at_exit
    destroy_process_group_at_exit()
    destroy_process_group_at_exit()  # idempotent: one handler
""")


def test_gloo_process_group_is_destroyed_before_the_interpreter_finalises():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "initialized at exit: False" in proc.stdout, proc.stdout
