"""``SAEModule``'s transcoder keys (``transcoder``, ``skip``, ``d_out``, ``target_hook_point``) checked against each
other and the data before anything is built."""

from __future__ import annotations

from typing import Optional


def check_transcoder_keys(transcoder: bool, skip: bool, d_out: Optional[int], target_hook_point: Optional[str],
                          d_in: int) -> None:
    """The transcoder keys agree with each other and with the data (ValueError naming the key and the fix)."""
    if skip and not transcoder:
        raise ValueError("model.skip=true: a skip term needs a transcoder (an SAE's skip would reconstruct its input "
                         "by a dense matrix); set model.transcoder: true with data.target_hook_point, or remove skip")
    if transcoder and target_hook_point is None and d_out is None:
        raise ValueError("model.transcoder=true needs a target: set data.target_hook_point "
                         "(e.g. blocks.L.hook_mlp_out) on a multi-hook harvest that holds it")
    if not transcoder and target_hook_point is not None:
        raise ValueError(f"data.target_hook_point={target_hook_point!r} is set but model.transcoder is false: set "
                         "model.transcoder: true to train a transcoder (or remove data.target_hook_point)")
    if not transcoder and d_out is not None and d_out != d_in:
        raise ValueError(f"model.d_out={d_out} differs from d_in={d_in} but model.transcoder is false: set "
                         "model.transcoder: true")
