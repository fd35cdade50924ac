"""A tiny GPT-2 with a byte-level BPE tokenizer trained on stdlib files, and a harvest of it (shared test helper)."""

import sysconfig
from pathlib import Path

import torch

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["textwrap.py", "colorsys.py", "bisect.py", "keyword.py", "glob.py", "fnmatch.py", "shlex.py", "this.py"]


def tiny_lm(folder: Path, corpus: list[str]) -> None:
    """Save a 2-layer GPT-2 (n_embd 32) and a 400-token BPE tokenizer trained on ``corpus`` into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2, n_head=4)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)


def harvest_tiny(root: Path) -> Path:
    """``root/texts`` (the stdlib files), ``root/lm`` (:func:`tiny_lm`) and ``root/shards`` (6,000 tokens of 32-token
    contexts at blocks.0.hook_resid_post; val 10%, test 30%). Returns ``root``."""
    from lit_sae.data.harvest import run_harvest

    texts = root / "texts"
    texts.mkdir()
    corpus = [(STDLIB / f).read_text() for f in FILES]
    for f, t in zip(FILES, corpus):
        (texts / f"{f}.txt").write_text(t)
    tiny_lm(root / "lm", corpus)
    run_harvest(out_dir=str(root / "shards"), model=str(root / "lm"), hook_point="blocks.0.hook_resid_post",
                source=str(texts), total_tokens=6000, context_length=32, batch_size=16, block_tokens=256,
                tokens_per_shard=1024, val_fraction=0.1, test_fraction=0.3, progress=False)
    return root


def tiny_datamodule(root: Path):
    """The ActivationDataModule over :func:`harvest_tiny`'s shards with the small batches the report tests use."""
    from lit_sae.data.datamodule import ActivationDataModule

    return ActivationDataModule(str(root / "shards"), batch_size_tokens=128, shuffle_buffer_tokens=256, num_workers=0)
