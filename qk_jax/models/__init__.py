"""Linen modules, each mirroring its reference implementation's names:

- ``lora``: ``LoRADense`` and the pure merge/split functions over params pytrees;
- ``mmdit``: diffusers' ``FluxTransformer2DModel`` (the paper's MMDiT and stage 1's light head);
- ``vae``: diffusers' ``AutoencoderKL`` (the FLUX.1 VAE layout), latent scaling and 2x2 packing;
- ``connector``: the two-layer MLP from the VLM's text/kontext states to the MMDiT's text stream;
- ``qwen_vl``: transformers' ``Qwen2_5_VLForConditionalGeneration`` plus the kontext queries;
- ``query_kontext``: the assembled model and its flow-matching loss;
- ``saved_model``: the exported-model format (params + config.json) that stages, the sampler and the exporter read.
"""
