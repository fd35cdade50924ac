"""Fault report: run every crash / bad-input scenario and print one table.

    .venv/bin/python -m tests.support.faults            # all scenarios (about 2-4 minutes on 2 busy cores)
    .venv/bin/python -m tests.support.faults -k resume  # only scenarios whose name contains "resume"

Each scenario builds tiny synthetic shards (d_in 16, batches of 256 tokens) in a temporary folder, runs ``lit-sae
fit`` (in a subprocess where a process must die, else in-process under an alarm) and checks what happened: the exit
status, the message (it must name the offending file or key and say how to fix it) and that nothing a later run
would accept was left behind. tests/train/test_resume.py and tests/cli/test_faults.py run the same functions (``from tests.support import faults``; pytest puts
the project root on the path).

This module is also imported by the resume subprocesses for ``LossRecorder`` and ``SlowSave`` (class paths
``tests.support.faults.X``; hence no LightningModule lives here, see STACK.md).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
LIT_SAE = str(Path(PYTHON).with_name("lit-sae"))  # the console script of this environment

D_IN, N_LATENTS, K, BATCH = 16, 64, 4, 256
CKPT_EVERY = 4  # steps between last.ckpt refreshes in the resume scenarios
MAX_STEPS = 40  # 24 batches per epoch: the run crosses an epoch boundary


# ----------------------------------------------------------------------------------------------------------- helpers
def make_shards(out: Path, n_train: int = 24 * BATCH, n_val: int = 2 * BATCH, d_in: int = D_IN,
                nan_rows: tuple = (), hook_point: str = "blocks.1.hook_resid_post", n_test: int = 0) -> Path:
    """Synthetic shards with a manifest (token i: ctx i // 16, pos i % 16; ``tests.support.shards.write_shards``);
    returns the folder."""
    from tests.support.shards import write_shards

    g = torch.Generator().manual_seed(0)
    acts = {}
    for split, n in {"train": n_train, "val": n_val, "test": n_test}.items():
        if split == "test" and not n:
            continue
        # Sparse non-negative codes over 128 directions plus an offset: something an SAE can learn.
        dirs = torch.nn.functional.normalize(torch.randn(128, d_in, generator=g), dim=1)
        codes = torch.rand(n, 128, generator=g) * (torch.rand(n, 128, generator=g) < 0.03)
        acts[split] = codes @ dirs * 4 + 1.0
        for r in nan_rows if split == "train" else ():
            acts[split][r, r % d_in] = float("nan")
    write_shards(out, acts, ctx_len=16, block_tokens=128, tokens_per_shard=1024, hook_point=hook_point)
    return Path(out)


BASE_MODEL = {"n_latents": N_LATENTS, "k": K, "lr": 0.003, "warmup_steps": 5, "decay_start": 0.5, "ema_decay": 0.9,
              "normalize": "scalar", "dead_after_tokens": 2048, "k_aux": 8, "init_tokens": 2048, "export_dir": "none"}


def _model_section(model: str) -> str:
    """The recipe's model keys, each replaced by the same key of ``model`` (YAML lines) if it has it, then the rest
    of ``model``."""
    extra = textwrap.dedent(model)
    given = {line.split(":", 1)[0].strip() for line in extra.splitlines() if ":" in line and not line.startswith(" ")}
    base = "".join(f"  {k}: {v}\n" for k, v in BASE_MODEL.items() if k not in given)
    return base + textwrap.indent(extra, "  ")


def write_config(path: Path, shards: Path, run: Path, losses: Optional[Path] = None, extra_callbacks: str = "",
                 model: str = "", data: str = "", trainer: str = "") -> Path:
    """A complete fit recipe: ModelCheckpoint(save_last, every CKPT_EVERY steps), EMA, LR schedule, AuxK, workers."""
    recorder = (f"    - class_path: tests.support.faults.LossRecorder\n      init_args:\n        path: {losses}\n"
                if losses else "")
    text = f"""\
seed_everything: 0
trainer:
  max_steps: {MAX_STEPS}
  default_root_dir: {run}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  deterministic: true
  val_check_interval: 10
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {run}/checkpoints
        save_last: true
        every_n_train_steps: {CKPT_EVERY}
        save_top_k: 0
{recorder}{extra_callbacks}{textwrap.indent(textwrap.dedent(trainer), "  ")}
model:
{_model_section(model)}
data:
  class_path: lit_sae.data.datamodule.ActivationDataModule
  init_args:
    path: {shards}
    batch_size_tokens: {BATCH}
    shuffle_buffer_tokens: 1024
    num_workers: 1
    val_tokens: {BATCH}
{textwrap.indent(textwrap.dedent(data), "    ")}
"""
    path.write_text(text)
    return path


class LossRecorder(L.Callback):
    """Appends ``step<TAB>loss<TAB>batch-id hash`` after every training step (flushed: survives a kill -9)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids = (batch["ctx"] * 16 + batch["pos"]).tolist()
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step}\t{float(outputs['loss']).hex()}\t{hash(tuple(ids))}\n")


class SlowSave(L.Callback):
    """Fault injection: every checkpoint after the first is written in two halves with a pause in between, so a
    kill can land in the middle of the write (the parent waits for the temporary file to appear)."""

    def setup(self, trainer, pl_module, stage) -> None:
        import lit_sae.train.atomic_io as cio

        real_save, count = torch.save, [0]

        def slow_save(obj, f, *args, **kwargs):
            count[0] += 1
            if count[0] == 1 or not hasattr(f, "write"):
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(30)  # the parent kills us here
            f.write(data[len(data) // 2:])

        cio.torch.save = slow_save  # only the checkpoint IO's module sees it (cio.torch is the torch module:
        # restore on teardown so an in-process caller is not affected)
        self._restore = lambda: setattr(cio.torch, "save", real_save)

    def teardown(self, trainer, pl_module, stage) -> None:
        self._restore()


def read_losses(path: Path) -> dict[int, tuple[float, int]]:
    """step -> (loss, batch hash) from a LossRecorder file (a resumed run's later lines win)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        step, loss, h = line.split("\t")
        out[int(step)] = (float.fromhex(loss), int(h))
    return out


def fit_subprocess(config: Path, *args: str, env: Optional[dict] = None, command: str = "fit") -> subprocess.Popen:
    """Start ``lit-sae fit --config config args`` (or another command) in its own process group (so kill -9 takes
    its workers too)."""
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
             PYTHONHASHSEED="0", OMP_NUM_THREADS="1", **(env or {}))
    cmd = [LIT_SAE, *command.split(), "--config", str(config), *args]  # the console script: DDP relaunches it
    # as it is; command may be two words ("sweep fit")
    return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -999, out
    return proc.returncode, out


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> bool:
    """kill -9 the process group as soon as ``ready()``; False if the process ended or time ran out first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    return False


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def cli(args: list[str]) -> tuple[int, str]:
    """Run ``lit-sae`` in-process; (exit status, stderr + the exception text if one escaped)."""
    from lit_sae.cli.main import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exn:
            code = exn.code if isinstance(exn.code, int) else 1
        except Exception as exn:  # not converted into a clean message: report it as such
            code = -1
            err.write("UNCAUGHT " + "".join(traceback.format_exception_only(type(exn), exn)))
    return code, err.getvalue()


def error_line(text: str) -> str:
    """The ``error:`` line(s) of a CLI output, else its last line."""
    lines = text.splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.startswith(("error:", "UNCAUGHT"))), None)
    if first is None:
        return (text.strip().splitlines() or [""])[-1]
    return " ".join(ln.strip() for ln in lines[first:] if "LIT_SAE_TRACEBACK" not in ln)


def checkpoints_sound(run: Path, allow: bool = False) -> bool:
    """No checkpoint at all (``allow`` False), or only whole ones with finite weights (an error mid-run may follow
    good checkpoints: a resume from them meets the same error, which is what should happen)."""
    found = list(Path(run).rglob("*.ckpt"))
    if not allow:
        return not found
    for p in found:
        state = torch.load(p, map_location="cpu", weights_only=True)
        if not all(bool(torch.isfinite(t).all()) for t in state["state_dict"].values() if t.is_floating_point()):
            return False
    return True


class Result(NamedTuple):
    ok: bool
    observed: str


# --------------------------------------------------------------------------------------------------------- scenarios
def resume_after_kill(tmp: Path, kill_after_steps: int = 14, model: str = "") -> Result:
    """kill -9 a fit at an arbitrary step, resume with --ckpt_path last: same batches and losses from there on.
    ``model``: YAML lines that override the recipe's model keys (e.g. another activation)."""
    shards = make_shards(tmp / "shards")
    full_cfg = write_config(tmp / "full.yaml", shards, tmp / "full", tmp / "full.tsv", model=model)
    part_cfg = write_config(tmp / "part.yaml", shards, tmp / "part", tmp / "part.tsv", model=model)
    res_cfg = write_config(tmp / "res.yaml", shards, tmp / "part", tmp / "resumed.tsv", model=model)
    full = fit_subprocess(full_cfg)
    part = fit_subprocess(part_cfg)

    def lines() -> int:
        p = tmp / "part.tsv"
        return len(p.read_text().splitlines()) if p.exists() else 0

    killed = kill_when(part, lambda: lines() >= kill_after_steps)
    code, out = finish(full)
    if code != 0 or not killed:
        return Result(False, f"uninterrupted exit {code}, killed={killed}: {error_line(out)}")
    killed_at = lines()
    last = tmp / "part" / "checkpoints" / "last.ckpt"
    resumed_from = ckpt_step(last)
    code, out = finish(fit_subprocess(res_cfg, "--ckpt_path", "last"))
    if code != 0:
        return Result(False, f"resume exit {code}: {error_line(out)}")
    ref, before, after = read_losses(tmp / "full.tsv"), read_losses(tmp / "part.tsv"), read_losses(
        tmp / "resumed.tsv")
    steps = sorted(after)
    if steps != list(range(resumed_from + 1, MAX_STEPS + 1)):
        return Result(False, f"resumed run did steps {steps[:3]}...{steps[-2:]}, expected {resumed_from + 1}..")
    same_data = all(after[s][1] == ref[s][1] for s in steps) and all(before[s][1] == ref[s][1] for s in before)
    diff = max(abs(after[s][0] - ref[s][0]) for s in steps)
    final_a = torch.load(tmp / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    final_b = torch.load(last, weights_only=True)
    w_diff = max(float((final_a["state_dict"][k].float() - final_b["state_dict"][k].float()).abs().max())
                 for k in final_a["state_dict"])
    dead_same = torch.equal(final_a["state_dict"]["tokens_since_fired"], final_b["state_dict"]["tokens_since_fired"])
    ok = same_data and diff <= 1e-6 and w_diff <= 1e-6 and dead_same
    return Result(ok, f"killed after step {killed_at}, resumed from step {resumed_from}: {len(steps)} steps, "
                      f"same batches={same_data}, max |dloss|={diff:.1e}, final weights/EMA max diff={w_diff:.1e}, "
                      f"dead counters equal={dead_same}")


SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "sae", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # a one-task batch job


def _interrupt(tmp: Path, signum: int, after_steps: int = 13, env: Optional[dict] = None,
               resume_args: tuple = ("--ckpt_path", "last")) -> Result:
    """Send ``signum`` to a real ``lit-sae fit`` (its whole process group, as a terminal or a scheduler does) after
    ``after_steps`` steps: it must stop with exit 128 + signum after writing last.ckpt at the step it finished, and
    ``--ckpt_path last`` must then give exactly the uninterrupted run's batches and losses (bit-exact)."""
    shards = make_shards(tmp / "shards")
    full_cfg = write_config(tmp / "full.yaml", shards, tmp / "full", tmp / "full.tsv")
    part_cfg = write_config(tmp / "part.yaml", shards, tmp / "part", tmp / "part.tsv")
    res_cfg = write_config(tmp / "res.yaml", shards, tmp / "part", tmp / "resumed.tsv")
    full, part = fit_subprocess(full_cfg), fit_subprocess(part_cfg, env=env)

    def lines() -> int:
        p = tmp / "part.tsv"
        return len(p.read_text().splitlines()) if p.exists() else 0

    t0 = time.time()
    while lines() < after_steps and part.poll() is None and time.time() - t0 < 240:
        time.sleep(0.02)
    os.killpg(part.pid, signum)
    code, out = finish(part)
    full_code, full_out = finish(full)
    if full_code != 0:
        return Result(False, f"uninterrupted run exit {full_code}: {error_line(full_out)}")
    last = tmp / "part" / "checkpoints" / "last.ckpt"
    if not last.exists():
        return Result(False, f"exit {code} and no last.ckpt: {out.strip().splitlines()[-3:]}")
    saved_at, done = ckpt_step(last), max(read_losses(tmp / "part.tsv"))
    code_r, out_r = finish(fit_subprocess(res_cfg, *resume_args, env=env))
    if code_r != 0:
        return Result(False, f"resume exit {code_r}: {error_line(out_r)}")
    ref, after = read_losses(tmp / "full.tsv"), read_losses(tmp / "resumed.tsv")
    steps = sorted(after)
    exact = steps == list(range(saved_at + 1, MAX_STEPS + 1)) and all(after[s] == ref[s] for s in steps)
    said = "interrupted by" in out and "--ckpt_path last" in out
    ok = code == 128 + signum and saved_at == done and exact and said
    return Result(ok, f"{signal.Signals(signum).name} after step {done}: exit {code}, last.ckpt at step {saved_at}, "
                      f"message={said}; resumed {len(steps)} steps, bit-exact batches and losses={exact}")


def interrupt_sigint(tmp: Path) -> Result:
    """Ctrl-C in the middle of a fit."""
    return _interrupt(tmp, signal.SIGINT)


def interrupt_sigterm(tmp: Path) -> Result:
    """A scheduler's SIGTERM (preemption, `scancel`, `kill`) in the middle of a fit."""
    return _interrupt(tmp, signal.SIGTERM)


def interrupt_slurm_requeue(tmp: Path) -> Result:
    """SLURM's requeue signal (SIGUSR1, Lightning's SLURMEnvironment with auto_requeue): the step finishes, last.ckpt
    and Lightning's hpc_ckpt_1.ckpt are written at it, the requeue is asked for (``scontrol``; absent here, so
    Lightning logs that it failed), and the requeued job (the same command line, no --ckpt_path) continues from the
    hpc checkpoint bit-exactly."""
    result = _interrupt(tmp, signal.SIGUSR1, env=SLURM_ENV, resume_args=())
    hpc = sorted(p.name for p in (tmp / "part").glob("hpc_ckpt_*.ckpt"))
    return Result(result.ok and hpc == ["hpc_ckpt_1.ckpt"], f"{result.observed}; hpc checkpoints {hpc}")


def kill_during_checkpoint_write(tmp: Path) -> Result:
    """kill -9 while last.ckpt is being rewritten: the previous last.ckpt stays whole and a resume uses it."""
    shards = make_shards(tmp / "shards")
    slow = "    - class_path: tests.support.faults.SlowSave\n"
    cfg = write_config(tmp / "cfg.yaml", shards, tmp / "run", extra_callbacks=slow)
    ck = tmp / "run" / "checkpoints"
    proc = fit_subprocess(cfg)
    # Kill during a REwrite: the first save runs at full speed and may be caught mid-write by the poll, when no
    # previous last.ckpt exists yet; only a write that starts after last.ckpt exists is the scenario.
    def rewriting() -> bool:
        try:
            return (ck / "last.ckpt").exists() and any(p.stat().st_size > 0 for p in ck.glob(".last.ckpt.*.tmp"))
        except FileNotFoundError:  # a temp file renamed between the listing and the stat
            return False

    killed = kill_when(proc, rewriting)
    if not killed:
        return Result(False, f"the run ended before a checkpoint write could be interrupted: {finish(proc)[1][-300:]}")
    names = sorted(p.name for p in ck.iterdir())
    step = ckpt_step(ck / "last.ckpt")  # loads: the file is whole
    res = write_config(tmp / "res.yaml", shards, tmp / "run", trainer="max_steps: 12")
    code, out = finish(fit_subprocess(res, "--ckpt_path", "last"))
    resumed = "Restored all states" in out and code == 0
    return Result(step == CKPT_EVERY and resumed,
                  f"folder after kill: {names}; last.ckpt loads (step {step}); resume exit {code}")


def atomic_write_failure(tmp: Path) -> Result:
    """A failure in the middle of torch.save: the old last.ckpt is intact, no temporary file remains."""
    import lit_sae.train.atomic_io as cio

    path = tmp / "last.ckpt"
    io_ = cio.AtomicCheckpointIO()
    io_.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    real = cio.torch.save

    def failing(obj, f, *a, **k):
        f.write(b"\x00" * 5000)
        raise OSError(28, "No space left on device (simulated)")

    cio.torch.save = failing
    try:
        io_.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
        raised = "nothing"
    except OSError as exn:
        raised = str(exn)
    finally:
        cio.torch.save = real
    back = torch.load(path, weights_only=True)
    leftovers = sorted(p.name for p in tmp.iterdir())
    ok = back["global_step"] == 1 and bool(back["w"].eq(1).all()) and leftovers == ["last.ckpt"] and "space" in raised
    return Result(ok, f"save raised {raised!r}; last.ckpt still step {back['global_step']}; folder {leftovers}")


class _Poison(L.Callback):
    """Fault injection at step ``at``: ``nan`` writes NaN into W_enc; ``lr`` sets a huge learning rate."""

    def __init__(self, at: int, how: str):
        self.at, self.how = at, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.at:
            return
        if self.how == "nan":
            with torch.no_grad():
                pl_module.sae.W_enc[0, 0] = float("nan")
        else:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = 1e38


def _divergence(tmp: Path, how: str) -> Result:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_sae.data.datamodule import ActivationDataModule
    from lit_sae.train.atomic_io import AtomicCheckpointIO
    from lit_sae.train.module import SAEModule

    shards = make_shards(tmp / "shards")
    L.seed_everything(0)
    ck = ModelCheckpoint(dirpath=str(tmp / "ck"), save_last=True, every_n_train_steps=CKPT_EVERY, save_top_k=0)
    # nan: poisoned right before a checkpoint step; lr: the huge step lands between two checkpoints.
    at = 2 * CKPT_EVERY if how == "nan" else 2 * CKPT_EVERY + 1
    trainer = L.Trainer(max_steps=30, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, plugins=[AtomicCheckpointIO()], callbacks=[ck, _Poison(at, how)],
                        default_root_dir=str(tmp))
    module = SAEModule(d_in=D_IN, n_latents=N_LATENTS, k=K, lr=3e-3, export_dir="none", init_tokens=1024)
    try:
        trainer.fit(module, ActivationDataModule(str(shards), batch_size_tokens=BATCH, num_workers=0))
        message = "no error"
    except FloatingPointError as exn:
        message = str(exn)
    files = sorted(p.name for p in (tmp / "ck").iterdir())
    state = torch.load(tmp / "ck" / "last.ckpt", weights_only=True)
    finite = all(bool(torch.isfinite(t).all()) for t in state["state_dict"].values() if t.is_floating_point())
    clear = ("lower" in message and "lr" in message) and ("last" in message)
    last_good = at - CKPT_EVERY if how == "nan" else 2 * CKPT_EVERY  # nan: the save at `at` itself is refused
    ok = files == ["last.ckpt"] and finite and state["global_step"] == last_good and clear
    return Result(ok, f"{message[:150]}...; on disk: {files} at step {state['global_step']}, finite={finite}")


def divergence_nan_weights(tmp: Path) -> Result:
    """NaN in the weights at a checkpoint step: the save is refused, the run stops, the old last.ckpt stays."""
    return _divergence(tmp, "nan")


def divergence_huge_lr(tmp: Path) -> Result:
    """A real blow-up (lr 1e38 for one step): the next loss is non-finite, the run stops before any bad save."""
    return _divergence(tmp, "lr")


def _cli_error(tmp: Path, args: list[str], must: list[str], shards: Optional[Path] = None, steps: int = 3,
               **cfg_kw) -> Result:
    """Run ``lit-sae fit`` with a broken input: exit 2, an error line containing every string of ``must`` (in
    order-insensitive, case-insensitive form), and no checkpoint written."""
    shards = shards if shards is not None else make_shards(tmp / "shards")
    cfg = write_config(tmp / "cfg.yaml", shards, tmp / "run", **cfg_kw)
    code, err = cli(["fit", "--config", str(cfg), "--trainer.max_steps", str(steps), *args])
    line = error_line(err)
    found = all(m.lower() in line.lower() for m in must)
    clean = checkpoints_sound(tmp / "run", allow=steps > 3)
    return Result(code == 2 and found and clean, f"exit {code}; {line[:220]}" + ("" if clean else " [CKPT LEFT]"))


def missing_shard_folder(tmp: Path) -> Result:
    return _cli_error(tmp, [], ["nope", "does not exist", "harvest"], shards=tmp / "nope")


def empty_shard_folder(tmp: Path) -> Result:
    (tmp / "empty").mkdir()
    return _cli_error(tmp, [], ["manifest.json", "empty", "harvest"], shards=tmp / "empty")


def truncated_tar(tmp: Path) -> Result:
    shards = make_shards(tmp / "shards")
    p = shards / "train-000002.tar"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return _cli_error(tmp, [], ["train-000002.tar", "truncated", "harvest"], shards=shards, steps=30)


def wrong_shape_sample(tmp: Path) -> Result:
    import json

    shards = make_shards(tmp / "shards")
    man = json.loads((shards / "manifest.json").read_text())
    man["d_in"] = 12  # the blocks hold 16 columns
    from lit_sae.data.shards import write_manifest_atomic

    write_manifest_atomic(str(shards), man)
    return _cli_error(tmp, [], [".tar", "shape", "expected (T, 12)"], shards=shards)


def wrong_dtype_sample(tmp: Path) -> Result:
    import json

    from lit_sae.data.shards import write_manifest_atomic

    shards = make_shards(tmp / "shards")
    man = json.loads((shards / "manifest.json").read_text())
    man["dtype"] = "bfloat16"  # the blocks are float16
    write_manifest_atomic(str(shards), man)
    return _cli_error(tmp, [], [".tar", "dtype", "bfloat16"], shards=shards)


def nonfinite_error(tmp: Path) -> Result:
    """A NaN row met by the training stream (row 700: outside the b_pre initialisation sample)."""
    shards = make_shards(tmp / "shards", nan_rows=(700,))
    return _cli_error(tmp, [], ["train-000000.tar", "NaN/Inf", "skip_nonfinite"], shards=shards, steps=30)


def nonfinite_in_init_sample(tmp: Path) -> Result:
    """A NaN row inside the sample read for the b_pre / scale initialisation (row 300)."""
    shards = make_shards(tmp / "shards", nan_rows=(300,))
    return _cli_error(tmp, [], ["train-000000.tar", "NaN/Inf", "skip_nonfinite"], shards=shards)


def nonfinite_skipped(tmp: Path) -> Result:
    """skip_nonfinite: true trains on and counts the skipped rows (logged as data/nonfinite_skipped)."""
    from lightning.pytorch.loggers import CSVLogger

    from lit_sae.data.datamodule import ActivationDataModule
    from lit_sae.train.module import SAEModule

    shards = make_shards(tmp / "shards", nan_rows=(300, 301, 4000))
    dm = ActivationDataModule(str(shards), batch_size_tokens=BATCH, num_workers=0, skip_nonfinite=True,
                              shuffle=False)
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=24, logger=CSVLogger(str(tmp), name="csv"), log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        enable_checkpointing=False)
    trainer.fit(SAEModule(d_in=D_IN, n_latents=N_LATENTS, k=K, export_dir="none", init_tokens=1024), dm)
    logged = (tmp / "csv" / "version_0" / "metrics.csv").read_text()
    ok = dm.nonfinite_skipped == 3 and "data/nonfinite_skipped" in logged and trainer.global_step == 24
    return Result(ok, f"trained {trainer.global_step} steps, nonfinite_skipped={dm.nonfinite_skipped}, "
                      f"logged={'data/nonfinite_skipped' in logged}")


def k_above_n_latents(tmp: Path) -> Result:
    return _cli_error(tmp, ["--model.k", "100"], ["model.k=100", "n_latents=64"])


def k_not_positive(tmp: Path) -> Result:
    return _cli_error(tmp, ["--model.k", "0"], ["model.k=0", "0 < k"])


def negative_lr(tmp: Path) -> Result:
    return _cli_error(tmp, ["--model.lr", "-0.001"], ["model.lr=-0.001", "positive"])


def unknown_hook_point(tmp: Path) -> Result:
    """The harvest's hook resolution on a tiny random GPT-2: the error lists the valid names."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lit_sae.data.lm import resolve_hook

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    try:
        resolve_hook(model, "blocks.7.hook_resid_post")
        return Result(False, "accepted blocks.7 of a 2-layer model")
    except ValueError as exn:
        msg = str(exn)
    one_line = "\n" not in msg and len(msg) < 300  # the pattern and examples, not every name
    return Result("blocks.7.hook_resid_post" in msg and "blocks.1.hook_mlp_out" in msg and one_line, msg[:200])


def d_in_data_vs_model(tmp: Path) -> Result:
    """model.d_in in a YAML would be overwritten by the data's d_in without a word: it is an error instead."""
    return _cli_error(tmp, [], ["model.d_in=8", "d_in=16", "manifest.json", "remove"], model="d_in: 8")


def d_in_on_command_line(tmp: Path) -> Result:
    return _cli_error(tmp, ["--model.d_in", "8"], ["model.d_in", "read from the data", "remove"])


def incompatible_checkpoint(tmp: Path) -> Result:
    """Resume with other n_latents / k / hook point: refused before any weight is loaded, keys named."""
    shards = make_shards(tmp / "shards")
    cfg = write_config(tmp / "cfg.yaml", shards, tmp / "run", trainer="max_steps: 4")
    code, err = cli(["fit", "--config", str(cfg)])
    if code != 0:
        return Result(False, f"first run failed: {error_line(err)}")
    other = make_shards(tmp / "other", hook_point="blocks.0.hook_mlp_out")
    cfg2 = write_config(tmp / "cfg2.yaml", other, tmp / "run", trainer="max_steps: 8", model="n_latents: 128")
    before = (tmp / "run" / "checkpoints" / "last.ckpt").read_bytes()
    code, err = cli(["fit", "--config", str(cfg2), "--ckpt_path", "last", "--model.k", "8"])
    line = error_line(err)
    must = ["last.ckpt", "model.n_latents: checkpoint 64, config 128", "model.k: checkpoint 4, config 8",
            "model.hook_point", "size mismatch"]
    ok = code == 2 and all(m in line for m in must[:-1]) and must[-1] not in err
    untouched = (tmp / "run" / "checkpoints" / "last.ckpt").read_bytes() == before
    return Result(ok and untouched, f"exit {code}; {line[:260]}; last.ckpt untouched={untouched}")


def unknown_config_key(tmp: Path) -> Result:
    return _cli_error(tmp, [], ["model.n_latnets", "did you mean", "model.n_latents"], model="n_latnets: 32")


def unknown_data_key(tmp: Path) -> Result:
    return _cli_error(tmp, [], ["batch_size_token", "did you mean", "batch_size_tokens"],
                      data="batch_size_token: 128")


def changed_lr_on_resume(tmp: Path) -> Result:
    """Resuming with another model.lr (the usual fix after a divergence) applies it, instead of the restored one."""
    shards = make_shards(tmp / "shards")
    cfg = write_config(tmp / "cfg.yaml", shards, tmp / "run", trainer="max_steps: 4",
                       model="warmup_steps: 0\ndecay_start: null")
    assert cli(["fit", "--config", str(cfg)])[0] == 0
    cfg2 = write_config(tmp / "cfg2.yaml", shards, tmp / "run", trainer="max_steps: 8",
                        model="warmup_steps: 0\ndecay_start: null\nlr: 0.0005")
    code, err = cli(["fit", "--config", str(cfg2), "--ckpt_path", "last"])
    state = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    lr = state["optimizer_states"][0]["param_groups"][0]["lr"]
    return Result(code == 0 and abs(lr - 5e-4) < 1e-12, f"exit {code}; optimizer lr after resume: {lr}")


# ------------------------------------------------------------------------------------- run folders
def run_root_isolation(tmp: Path) -> Result:
    """Two fits of one recipe that differ only in --trainer.default_root_dir share no file; nothing lands outside
    the two roots; a third, fresh fit into a used root stops (exit 2) offering --ckpt_path last or a new root."""
    shards = make_shards(tmp / "shards")
    cfg = write_config(tmp / "cfg.yaml", shards, tmp / "unused", trainer="max_steps: 4")
    cfg.write_text(cfg.read_text().replace(f"default_root_dir: {tmp / 'unused'}", "default_root_dir: runs/x")
                   .replace(f"        dirpath: {tmp / 'unused'}/checkpoints\n", "").replace(
                       "lightning.pytorch.callbacks.ModelCheckpoint", "lit_sae.callbacks.checkpoint.Checkpoint")
                   .replace("export_dir: none", "export_dir: null"))
    work = tmp / "work"
    work.mkdir()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        codes = [cli(["fit", "--config", str(cfg), "--trainer.default_root_dir", root])[0] for root in ("a", "b")]
        code, err = cli(["fit", "--config", str(cfg), "--trainer.default_root_dir", "a"])
    finally:
        os.chdir(cwd)
    files = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    own = all(f"{r}/checkpoints/last.ckpt" in files and f"{r}/sae/sae_weights.safetensors" in files for r in "ab")
    outside = [f for f in files if not f.startswith(("a/", "b/"))]
    versioned = [f for f in files if "-v1" in f or "version_" in f]
    refused = code == 2 and "--ckpt_path last" in error_line(err) and "default_root_dir" in error_line(err)
    ok = codes == [0, 0] and own and not outside and not versioned and refused
    return Result(ok, f"fits exit {codes}; each root holds its checkpoint and export={own}; outside={outside}; "
                      f"versioned={versioned}; fresh fit into a used root: exit {code}, {error_line(err)[:120]}")


def test_without_checkpoint(tmp: Path) -> Result:
    """`lit-sae test --ckpt_path last` with no checkpoint, and `lit-sae test` with none at all, refuse to report
    untrained weights (exit 2, naming the folder searched); --untrained true is the explicit way to do it."""
    shards = make_shards(tmp / "shards", n_test=BATCH)
    cfg = write_config(tmp / "cfg.yaml", shards, tmp / "run")
    last_code, last_err = cli(["test", "--config", str(cfg), "--ckpt_path", "last"])
    none_code, none_err = cli(["test", "--config", str(cfg)])
    asked_code, asked_err = cli(["test", "--config", str(cfg), "--untrained", "true"])
    folder = str(tmp / "run" / "checkpoints")
    ok = (last_code == 2 and folder in error_line(last_err) and none_code == 2 and "--untrained" in error_line(
        none_err) and asked_code == 0)
    return Result(ok, f"--ckpt_path last: exit {last_code} ({error_line(last_err)[:110]}); no ckpt_path: exit "
                      f"{none_code}; --untrained true: exit {asked_code}")


def resume_epoch_boundary(tmp: Path) -> Result:
    """A run stopped on the last batch of epoch 1 (step 24 of 24) and resumed under max_epochs: 2 sees exactly
    the uninterrupted run's batches and losses in epoch 2 and stops after 48 steps (the stream's
    position is the DataModule's own saved state). The stop at step 24 is a second run with max_steps 24, so the LR
    schedule must not depend on the run's length: warm-up only (the decay's exactness across a resume is tested in
    tests/data/test_data_resume.py, which copies the uninterrupted run's own checkpoint)."""
    shards = make_shards(tmp / "shards")
    epochs = "max_steps: -1\nmax_epochs: 2"
    warmup_only = "decay_start: null"
    full = write_config(tmp / "full.yaml", shards, tmp / "full", tmp / "full.tsv", trainer=epochs, model=warmup_only)
    part = write_config(tmp / "part.yaml", shards, tmp / "part", tmp / "part.tsv", trainer="max_steps: 24",
                        model=warmup_only)
    res = write_config(tmp / "res.yaml", shards, tmp / "part", tmp / "resumed.tsv", trainer=epochs, model=warmup_only)
    for cfg, args in ((full, ()), (part, ()), (res, ("--ckpt_path", "last"))):
        code, out = finish(fit_subprocess(cfg, *args))
        if code != 0:
            return Result(False, f"{cfg.name}: exit {code}: {error_line(out)}")
    ref = read_losses(tmp / "full.tsv")
    after = read_losses(tmp / "resumed.tsv") if (tmp / "resumed.tsv").exists() else {}  # none: it trained no step
    same = sorted(after) == list(range(25, 49)) and all(after[s] == ref[s] for s in after)
    return Result(same, f"uninterrupted: {len(ref)} steps; resumed from step 24: steps {min(after, default=0)}.."
                        f"{max(after, default=0)}, same batches and losses={same}")


def ddp_eval_uneven(tmp: Path) -> Result:
    """`lit-sae test` of one checkpoint on 1, 2 and 3 CPU processes: every test token evaluated exactly once, so
    test NMSE agrees to float32 rounding and the report's token count is the split's."""
    import json

    n_test = 2 * BATCH + 17  # not a multiple of 2 or 3 processes' batches
    shards = make_shards(tmp / "shards", n_test=n_test)
    cfg = write_config(tmp / "cfg.yaml", shards, tmp / "run", trainer="max_steps: 4")
    code, err = cli(["fit", "--config", str(cfg)])
    if code == 0:  # evaluate the export: no training state (the train stream's position) is restored
        code, err = cli(["export", str(tmp / "run" / "checkpoints" / "last.ckpt"), "--out", str(tmp / "sae")])
    if code != 0:
        return Result(False, f"fit/export exit {code}: {error_line(err)}")
    report_cb = ("    - class_path: lit_sae.callbacks.eval_report.EvalReport\n      init_args:\n        downstream: false\n"
                 "        probes: false\n        ablation: false\n        explain: false\n        progress: false\n")
    seen = {}
    for world in (1, 2, 3):
        out_dir = tmp / f"report{world}"
        ecfg = write_config(tmp / f"eval{world}.yaml", shards, tmp / "run", extra_callbacks=report_cb.replace(
            "progress: false", f"progress: false\n        out_dir: {out_dir}"), data="num_workers: 0")
        code, out = finish(fit_subprocess(ecfg, "--model.init_from", str(tmp / "sae"), "--trainer.accelerator", "cpu",
                                          "--trainer.devices", str(world), "--trainer.strategy",
                                          "ddp" if world > 1 else "auto", command="test"), timeout=300)
        if code != 0:
            return Result(False, f"test on {world} processes: exit {code}: {error_line(out)}")
        metrics = json.loads((out_dir / "report.json").read_text())["metrics"]
        seen[world] = (metrics["nmse"], metrics["n_tokens"])
    spread = max(v[0] for v in seen.values()) - min(v[0] for v in seen.values())
    counts = {w: v[1] for w, v in seen.items()}
    # Each token's squared error is a float32 reduction over d_in computed in batches of another shape per process
    # count (another summation order): about 2 * d_in * eps32 relative; NMSE's numerator and denominator each carry
    # it once. One token lost or counted twice moves NMSE by about 1 / n_test, far above this.
    tol = 4 * D_IN * torch.finfo(torch.float32).eps * seen[1][0]
    ok = spread <= tol and set(counts.values()) == {n_test}
    return Result(ok, f"test nmse spread over 1/2/3 processes {spread:.1e}; tokens {counts} (split: {n_test})")


# ---------------------------------------------------------------------------------------- offline
def offline_model(tmp: Path) -> Result:
    """`lit-sae harvest` with a model, a model's tokenizer or a dataset that is neither local nor cached, on a machine
    without the hub: exit 2 with one line naming where it looked, and no output folder created."""
    results = []
    hub_cache = tmp / "hf-cache" / "hub"  # an empty Hugging Face cache, whatever this machine has downloaded
    hub_cache.mkdir(parents=True)
    _fake_cached_model(hub_cache, "lit-sae-tests/model-without-tokenizer")
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache),  # the same answer on a machine with network
                      HF_DATASETS_CACHE=str(tmp / "hf-cache" / "datasets"))
    try:
        results = _offline_harvests(tmp)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return Result(all(r[0] for r in results), "; ".join(r[1] for r in results))


def _fake_cached_model(hub_cache: Path, repo_id: str) -> None:
    """A hub-cache entry (huggingface_hub's layout) holding a model's config.json and no tokenizer file."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


def _offline_harvests(tmp: Path) -> list:
    results = []
    cases = ((["--model", str(tmp / "no-such-folder")], "model folder not found"),
             (["--model", "lit-sae-tests/not-a-model"], "Hugging Face cache"),
             (["--model", "lit-sae-tests/model-without-tokenizer"], "the tokenizer of model"),
             (["--source", "hf:lit-sae-tests/not-a-dataset"], "dataset 'lit-sae-tests/not-a-dataset' is neither"),
             (["--source", "hf:" + str(tmp / "no-such-dataset")], "dataset folder not found"))
    for args, must in cases:
        out = tmp / f"shards-{len(results)}"
        code, err = cli(["harvest", *args, "--out_dir", str(out)])
        line = error_line(err)
        one_line = len([ln for ln in err.splitlines() if ln.strip() and "LIT_SAE_TRACEBACK" not in ln]) == 1
        results.append((code == 2 and must in line and one_line and not out.exists(), f"exit {code}: {line[:100]}"))
    return results


class Scenario(NamedTuple):
    name: str
    expected: str
    fn: Callable[[Path], Result]
    subprocess: bool = False


SCENARIOS = [
    Scenario("resume_after_kill", "kill -9 mid-run, --ckpt_path last: same batches, |dloss| <= 1e-6",
             resume_after_kill, True),
    Scenario("interrupt_sigint", "Ctrl-C: last.ckpt at the step, exit 130, bit-exact resume", interrupt_sigint,
             True),
    Scenario("interrupt_sigterm", "SIGTERM: last.ckpt at the step, exit 143, bit-exact resume", interrupt_sigterm,
             True),
    Scenario("interrupt_slurm_requeue", "SIGUSR1 (SLURM): hpc + last.ckpt, requeued job continues bit-exactly",
             interrupt_slurm_requeue, True),
    Scenario("kill_during_checkpoint_write", "old last.ckpt whole, resume works", kill_during_checkpoint_write, True),
    Scenario("run_root_isolation", "two roots share nothing; fresh fit into a used root: exit 2", run_root_isolation),
    Scenario("test_without_checkpoint", "test w/o checkpoint: exit 2 naming the folder", test_without_checkpoint),
    Scenario("resume_epoch_boundary", "resume from the last batch of an epoch: same batches, 48 steps",
             resume_epoch_boundary, True),
    Scenario("ddp_eval_uneven", "test on 1/2/3 processes: same nmse (float32 rounding) and token count", ddp_eval_uneven,
             True),
    Scenario("offline_model", "missing model, tokenizer or dataset offline: exit 2, one line, nothing created",
             offline_model),
    Scenario("atomic_write_failure", "save error leaves old last.ckpt, no tmp", atomic_write_failure),
    Scenario("divergence_nan_weights", "FloatingPointError, no NaN ckpt, old ckpt kept", divergence_nan_weights),
    Scenario("divergence_huge_lr", "FloatingPointError, no NaN ckpt, old ckpt kept", divergence_huge_lr),
    Scenario("incompatible_checkpoint", "exit 2 naming n_latents, k, hook_point", incompatible_checkpoint),
    Scenario("changed_lr_on_resume", "new model.lr applied to the restored optimizer", changed_lr_on_resume),
    Scenario("missing_shard_folder", "exit 2 naming the folder", missing_shard_folder),
    Scenario("empty_shard_folder", "exit 2 naming manifest.json", empty_shard_folder),
    Scenario("truncated_tar", "exit 2 naming the tar", truncated_tar),
    Scenario("wrong_shape_sample", "exit 2 naming the tar and shapes", wrong_shape_sample),
    Scenario("wrong_dtype_sample", "exit 2 naming the tar and dtypes", wrong_dtype_sample),
    Scenario("nonfinite_activations", "exit 2 naming the tar, hint skip_nonfinite", nonfinite_error),
    Scenario("nonfinite_in_init_sample", "exit 2 naming the tar, hint skip_nonfinite", nonfinite_in_init_sample),
    Scenario("nonfinite_skipped", "skip_nonfinite: trains, 3 rows counted+logged", nonfinite_skipped),
    Scenario("k_above_n_latents", "exit 2 naming model.k", k_above_n_latents),
    Scenario("k_not_positive", "exit 2 naming model.k", k_not_positive),
    Scenario("negative_lr", "exit 2 naming model.lr", negative_lr),
    Scenario("unknown_hook_point", "one-line ValueError giving the valid hook points", unknown_hook_point),
    Scenario("d_in_data_vs_model_yaml", "exit 2: model.d_in differs from data", d_in_data_vs_model),
    Scenario("d_in_on_command_line", "exit 2: model.d_in comes from data", d_in_on_command_line),
    Scenario("unknown_config_key", "exit 2 suggesting model.n_latents", unknown_config_key),
    Scenario("unknown_data_key", "exit 2 suggesting batch_size_tokens", unknown_data_key),
]


def run_scenario(s: Scenario, timeout: int = 240) -> Result:
    """Run one scenario in a fresh temporary folder; in-process ones under an alarm."""
    with tempfile.TemporaryDirectory(prefix=f"faults-{s.name}-") as tmp:
        def on_alarm(*_):
            raise TimeoutError(f"{s.name} took longer than {timeout} s")

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(timeout)
        try:
            return s.fn(Path(tmp))
        except Exception as exn:
            return Result(False, f"crashed: {type(exn).__name__}: {str(exn)[:200]}")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lit_sae", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="run only scenarios whose name contains this")
    args = parser.parse_args()
    _quiet()
    rows, t0 = [], time.time()
    for s in SCENARIOS:
        if args.k not in s.name:
            continue
        t = time.time()
        r = run_scenario(s)
        rows.append((s.name, s.expected, r.observed.replace("|", "/").replace("\n", " "), "pass" if r.ok else "FAIL",
                     time.time() - t))
        print(f"[{rows[-1][3]}] {s.name} ({rows[-1][4]:.0f} s)", file=sys.stderr, flush=True)
    print("| scenario | expected | observed | result |")
    print("|---|---|---|---|")
    for name, exp, obs, res, _ in rows:
        print(f"| {name} | {exp} | {obs} | {res} |")
    failed = sum(r[3] != "pass" for r in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} passed in {time.time() - t0:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
