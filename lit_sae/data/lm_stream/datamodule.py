"""``LMStreamDataModule``: train on activations computed by the language model while training, no shards on disk.

text -> contexts -> LM forward -> filters (:mod:`~lit_sae.data.lm_stream.rows`) -> mixing buffer
(:mod:`~lit_sae.data.lm_stream.mixing`) -> batches (:mod:`~lit_sae.data.lm_stream.dataset`).

Its keys are ``lit-sae harvest``'s for the model, text source, contexts, filters and splits (a harvest recipe's values
can be pasted in), and ActivationDataModule's for batching (``batch_size_tokens``, ``shuffle_buffer_tokens``,
``num_workers``, ``val_tokens``, ``test_tokens``, ``hook_points``, ``target_hook_point``); batches have the same keys
(:mod:`lit_sae.data.multi_hook`). With one worker the LM runs in a DataLoader worker process, beside the SAE step.

**The same SAE either way:** with one rank, the batches equal those ActivationDataModule reads from a harvest with
the same settings whose train split is one shard (``tokens_per_shard`` above the split's tokens): same rows, same
windows, same permutations (tests/data/test_lm_stream.py trains both through ``lit-sae fit`` and compares the SAEs).

Resume: the state (saved in checkpoints by Lightning) is a :class:`~lit_sae.data.lm_stream.mixing.Position`, the
norm medians and the settings the order depends on; ``--ckpt_path last`` re-runs the LM over the one window in
progress and continues bit-exactly. Under DDP each rank streams its own forwards (``i % world_size``).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Optional

import lightning as L
import torch

from lit_sae.data.contexts import SPLITS, first_position, iter_contexts, split_of
from lit_sae.data.filters import norm_threshold
from lit_sae.data.harvest import run_harvest
from lit_sae.data.harvest_state import hook_list, validate_settings
from lit_sae.data.lm import EMBEDDED_MODEL, load_lm, resolve_site
from lit_sae.data.lm_stream.dataset import LMStream, LMStreamLoader
from lit_sae.data.lm_stream.mixing import Position
from lit_sae.data.lm_stream.rows import lm_batches, lm_rows, n_contexts
from lit_sae.data.norms import forward_hooks, norm_medians
from lit_sae.data.text import open_source

log = logging.getLogger(__name__)

STATE_VERSION = 1
_HARVEST_ONLY = ("out_dir", "overwrite", "progress", "block_tokens", "tokens_per_shard", "device")


def harvest_config(**values) -> dict:
    """The settings dict a harvest with these values records (``manifest.config``), defaults filled in."""
    params = inspect.signature(run_harvest).parameters
    config = {k: p.default for k, p in params.items() if k not in ("out_dir", "device", "overwrite", "progress")}
    config.update(values)
    if config.get("hook_points") is None:
        config.pop("hook_points", None)
    else:
        config["hook_point"] = config["hook_points"][0]
    return config


class LMStreamDataModule(L.LightningDataModule):
    """Streams activations from a language model into training, validation and test (no harvest).

    Args (harvest's keys; see :func:`lit_sae.data.harvest.run_harvest` for each):
        model, gguf_file, model_dtype, hook_point, hook_points, source, text_field, hf_split, hf_config,
        hf_streaming, shuffle_documents, max_contexts_per_document, total_tokens (per epoch, all splits),
        context_length, batch_size (contexts per LM forward), dtype (batches' dtype, as harvest stores),
        drop_first_position, norm_filter_multiple, val_fraction, test_fraction, seed (split assignment, document
        order and the mixing permutations).
    Args (ActivationDataModule's keys):
        batch_size_tokens: rows per batch, per process.
        shuffle_buffer_tokens: the mixing buffer, rows mixed together (0: in stream order). Memory: this many rows
            x d x 2 bytes per hook point (65,536 x 576 x 2 = 75 MB for SmolLM2-135M's residual stream).
        num_workers: 0 runs the LM in the training process between steps; 1 runs it in a DataLoader worker beside
            the step (a GPU LM should stay in the training process: 0).
        val_tokens, test_tokens: evaluate on the first this many rows of the split (None: all; 0: skip).
        hook_points, target_hook_point: several hook points from one forward; see ActivationDataModule.
        device: where the LM runs ("cpu", "cuda", "cuda:1"; "auto": the trainer's device).
        chat: ``source`` is JSONL of conversations (``{"messages": [{"role", "content"}, ...]}`` per line) rendered
            by the tokenizer's chat template; rows of its special tokens are dropped like position 0
            (:mod:`lit_sae.data.chat`). A malformed line fails at once naming file:line.

    Raises ValueError (one line naming the key) for an unknown hook point, a text source too small for
    ``total_tokens``, bad settings; the model check gives harvest's one-line error for a model missing offline.
    """

    def __init__(self, model: str = EMBEDDED_MODEL, gguf_file: Optional[str] = None, model_dtype: str = "float32",
                 hook_point: str = "blocks.20.hook_resid_post", hook_points: Optional[list[str]] = None,
                 target_hook_point: Optional[str] = None, source: str = "stdlib", text_field: str = "text",
                 hf_split: str = "train", hf_config: Optional[str] = None, hf_streaming: bool = True,
                 shuffle_documents: bool = True, max_contexts_per_document: Optional[int] = None,
                 total_tokens: int = 150_000, context_length: int = 64, batch_size: int = 64,
                 dtype: str = "float16", drop_first_position: bool = True,
                 norm_filter_multiple: Optional[float] = 5.0, val_fraction: float = 0.05, test_fraction: float = 0.05,
                 seed: int = 0, batch_size_tokens: int = 4096, shuffle_buffer_tokens: int = 65536,
                 num_workers: int = 0, val_tokens: Optional[int] = None, test_tokens: Optional[int] = None,
                 device: str = "cpu", chat: bool = False):
        super().__init__()
        self.save_hyperparameters()
        if batch_size_tokens <= 0:
            raise ValueError(f"data.batch_size_tokens must be positive, got {batch_size_tokens}")
        if num_workers not in (0, 1):
            raise ValueError(f"data.num_workers must be 0 (LM in the training process) or 1 (LM in one worker), "
                             f"got {num_workers}")
        names = [k for k in inspect.signature(run_harvest).parameters if k not in _HARVEST_ONLY]
        given = {k: v for k, v in locals().items() if k in names}
        self.config = harvest_config(**given)
        try:
            validate_settings(self.config)
            self.hooks = hook_list(hook_point, hook_points)
        except ValueError as exn:
            raise ValueError(f"data: {exn}") from None
        if target_hook_point is not None and target_hook_point not in self.hooks:
            self.hooks.append(target_hook_point)
        self.hook_point, self.target_hook_point = self.hooks[0], target_hook_point
        self.batch_size_tokens, self.shuffle_buffer_tokens = int(batch_size_tokens), max(int(shuffle_buffer_tokens), 0)
        self.num_workers, self.seed, self.device = num_workers, int(seed), device
        self.val_tokens, self.test_tokens = val_tokens, test_tokens
        self.lm_name = self.model_name = model  # the name the CLI links to model.lm_name

        if model != EMBEDDED_MODEL:
            from lit_sae.data.hub import check_model_available

            try:  # the harvest's fast one-line error for a model missing offline
                check_model_available(model)
            except FileNotFoundError as exn:
                raise FileNotFoundError(f"data.model: {exn}") from None
        self.text = open_source(source, text_field=text_field, shuffle_seed=seed if shuffle_documents else None,
                                hf_split=hf_split, hf_config=hf_config, hf_streaming=hf_streaming)
        self.lm, self.tokenizer = load_lm(model, gguf_file=gguf_file, dtype=model_dtype,
                                          device="cpu" if device == "auto" else device)
        self.chat, self.drop_token_ids = bool(chat), None
        if chat:
            from lit_sae.data.chat import chat_source, special_token_ids

            self.text = chat_source(source, self.tokenizer, shuffle_seed=seed if shuffle_documents else None)
            self.drop_token_ids = special_token_ids(self.tokenizer)
        for h in self.hooks:
            try:
                resolve_site(self.lm, h)
            except ValueError as exn:
                raise ValueError(f"data.hook_point{'s' if hook_points else ''}: {exn}") from None
        if self.text.kind != "hf":
            self._check_source_size()
        with torch.inference_mode():
            probe = next(iter(lm_batches(self.tokenizer, self.text, self.config, "train")))[1][:1]
            self.d_ins = {h: int(a.shape[-1]) for h, a in forward_hooks(self.lm, torch.from_numpy(probe).to(
                self.lm.device), self.hooks).items()}
            self.medians = (norm_medians(self.lm, self.tokenizer, self.text, self.config, self.lm.device, self.hooks)
                            if norm_filter_multiple is not None else dict.fromkeys(self.hooks))
        self.d_in = self.d_ins[self.hook_point]
        self.d_target = self.d_ins[target_hook_point] if target_hook_point else None
        self._pos, self._pass_start, self._pending = Position(), Position(), Position()
        self._consumed_in_pass = False
        self.allow_zero_length_dataloader_with_multiple_devices = True

    # ---- checks ----------------------------------------------------------------------------------------------------
    def _check_source_size(self) -> None:
        """Count the contexts the source holds (tokenizing only): fewer than total_tokens needs is an error."""
        c = self.config
        want = n_contexts(c)
        kept = c["context_length"] - first_position(c["drop_first_position"])
        have = sum(1 for _ in iter_contexts(self.tokenizer, self.text.documents(), c["context_length"], want,
                                            c["max_contexts_per_document"]))
        if have < want:
            raise ValueError(f"data.total_tokens: text source {c['source']!r} holds {have * kept} tokens "
                             f"({have} contexts of {c['context_length']}), fewer than total_tokens={c['total_tokens']};"
                             f" set data.total_tokens to at most {have * kept} or use a larger source")
        train = sum(split_of(i, c["seed"], c["val_fraction"], c["test_fraction"]) == "train" for i in range(have))
        _, world = self._world()
        if train * kept < self.batch_size_tokens * world:
            raise ValueError(f"data.total_tokens: the train split holds about {train * kept} tokens, fewer than one "
                             f"batch per rank ({world} x batch_size_tokens {self.batch_size_tokens}); raise "
                             "data.total_tokens or lower data.batch_size_tokens")

    # ---- distribution ----------------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            kwargs = trainer.distributed_sampler_kwargs
            return (int(kwargs["rank"]), int(kwargs["num_replicas"])) if kwargs else (0, 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def setup(self, stage: str) -> None:
        """Move the LM to the trainer's device (``device: auto``); a fresh fit starts at epoch 0."""
        trainer = getattr(self, "trainer", None)
        if self.device == "auto" and trainer is not None:
            self.lm.to(trainer.strategy.root_device)
        if stage == "fit" and (trainer is None or trainer.global_step == 0):
            self._pos, self._pass_start, self._pending = Position(), Position(), Position()

    # ---- datasets and loaders ----------------------------------------------------------------------------------------
    def dataset(self, split: str, rank: Optional[int] = None, world_size: Optional[int] = None,
                max_tokens: Optional[int] = None) -> LMStream:
        """The stream of ``split`` for one rank (rank/world_size default to the trainer's)."""
        r, w = self._world()
        thresholds = {h: norm_threshold(self.config["norm_filter_multiple"], self.medians[h]) for h in self.hooks}
        return LMStream((self.lm, self.tokenizer, self.text, self.config), self.hooks, thresholds, split,
                        batch_size_tokens=self.batch_size_tokens, shuffle_buffer_tokens=self.shuffle_buffer_tokens,
                        seed=self.seed, rank=r if rank is None else rank,
                        world_size=w if world_size is None else world_size, target=self.target_hook_point,
                        max_tokens=max_tokens, drop_token_ids=self.drop_token_ids)

    def _loader(self, ds: LMStream, train: bool = False):
        return LMStreamLoader(ds, on_iter=self._begin_train_epoch if train else None, state=self if train else None,
                              sync_ranks=train, num_workers=self.num_workers, persistent_workers=False)

    def train_dataloader(self):
        """Training batches of this rank (mixed; the position is applied at each pass)."""
        return self._loader(self.dataset("train"), train=True)

    def val_dataloader(self):
        """Validation batches from the held-out val contexts ([] when val_fraction or val_tokens is 0)."""
        if self.config["val_fraction"] == 0 or self.val_tokens == 0:
            log.warning("data: no val split (val_fraction or val_tokens is 0): validation is skipped")
            return []
        return self._loader(self.dataset("val", max_tokens=self.val_tokens))

    def test_dataloader(self):
        """Test batches from the held-out test contexts."""
        return self._loader(self.dataset("test", max_tokens=self.test_tokens))

    # ---- position --------------------------------------------------------------------------------------------------
    def _begin_train_epoch(self, ds: LMStream) -> None:
        """Main process, before a pass: continue a pending position, repeat a pass that consumed nothing (Lightning
        may create the iterator twice around a restore), else start the next epoch."""
        if self._pending is not None:
            pos, self._pending = self._pending, None
        elif not self._consumed_in_pass:
            pos = self._pass_start
        else:
            pos = Position(self._pos.epoch + (self._pos.batches > 0))
        if pos.batches or pos.epoch:
            log.info("LM stream continues at epoch %d, batch %d", pos.epoch, pos.batches)
        ds.set_position(pos)
        self._pos = self._pass_start = pos
        self._consumed_in_pass = False

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position after a consumed train batch (main process, once per step)."""
        if isinstance(batch, dict) and "stream_pos" in batch:
            sp = batch.pop("stream_pos").tolist()
            trainer = getattr(self, "trainer", None)
            if trainer is None or trainer.training:
                self._pos = Position(sp[0] + 1) if sp[5] else Position(*sp[:5])
                self._consumed_in_pass = True
        return batch

    def _layout(self) -> dict:
        _, world = self._world()
        return {"world_size": world, "batch_size_tokens": self.batch_size_tokens,
                "shuffle_buffer_tokens": self.shuffle_buffer_tokens, "hooks": self.hooks, "chat": self.chat,
                "config": {k: v for k, v in self.config.items() if k not in ("hf_streaming",)}}

    def state_dict(self) -> dict:
        """The stream's position, its norm medians and the settings its order depends on (saved in checkpoints)."""
        return {"version": STATE_VERSION, "position": self._pos.as_list(), "medians": self.medians,
                "layout": self._layout()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue from a saved position; ValueError naming the settings that differ from the checkpoint's."""
        saved, now = state_dict.get("layout", {}), self._layout()
        diff = [k for k in now if k in saved and saved[k] != now[k]]
        diff += [f"config.{k}" for k in now["config"] if saved.get("config", {}).get(k) != now["config"][k]] \
            if "config" in diff else []
        if diff:
            raise ValueError(f"data: the checkpoint's stream position does not fit these settings ({', '.join(diff)} "
                             "differ); set them back to the checkpoint's values or start a fresh run without "
                             "--ckpt_path")
        self.medians = dict(state_dict.get("medians", self.medians))
        self._pending = self._pos = self._pass_start = Position(*state_dict["position"])
        self._consumed_in_pass = False

    # ---- samples ---------------------------------------------------------------------------------------------------
    def sample_activations(self, n_tokens: int, hook_point: Optional[str] = None) -> torch.Tensor:
        """The first ``n_tokens`` kept rows of the train split in stream order, float32 (n, d) (for b_pre init).

        Equals ActivationDataModule's sample of a harvest whose train split is one shard."""
        from lit_sae.data.shard_format import from_storage

        hook = hook_point or self.hook_point
        thresholds = {h: norm_threshold(self.config["norm_filter_multiple"], self.medians[h]) for h in self.hooks}
        out, have = [], 0
        for rows in lm_rows(self.lm, self.tokenizer, self.text, self.config, self.hooks, thresholds, "train",
                            drop_token_ids=self.drop_token_ids):
            out.append(from_storage(rows.acts[hook][: n_tokens - have].copy(), self.config["dtype"]).float())
            have += out[-1].shape[0]
            if have >= n_tokens:
                break
        return torch.cat(out)


__all__ = ["LMStreamDataModule", "SPLITS", "harvest_config"]
