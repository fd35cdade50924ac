"""Other libraries' SAE layouts, as pure conversions between their (config, tensors) and lit-sae's.

lit-sae's own parameterisation (what ``TopKSAE.state_dict()`` holds and its constructor takes) is the hub:

    z     = act(W_enc (n(x) - b_pre) + b_enc)         W_enc, W_dec: (n_latents, d_in); b_enc: (n_latents,)
    x_hat = n^-1(W_dec^T z + b_pre)                    b_pre: (d_in,); n: the input normalisation

Each module here maps one library's files to a ``(kwargs, state)`` pair (``kwargs`` for ``TopKSAE(**kwargs)``,
``state`` for ``load_state_dict``) and back. They import nothing of lit-sae's model, so the model can use them for
its own ``save_pretrained`` / ``from_pretrained`` without an import cycle. Every refusal is a ``ValueError`` that
names the file and the field it cannot represent.

- ``saelens``: SAELens (also read by SAEBench, SAEDashboard, Neuronpedia): ``cfg.json`` + ``sae_weights.safetensors``.
- ``sparsify``: EleutherAI sparsify (also read by delphi): ``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors``.
- ``openai``: the state dicts of OpenAI's released v5 TopK SAEs (``sparse_autoencoder/model.py``).
"""
