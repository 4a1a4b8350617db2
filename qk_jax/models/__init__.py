"""Linen modules. Today: ``lora``. The Qwen2.5-VL (``qwen_vl``), the MMDiT, VAE and connector (``mmdit``, ``vae``,
``connector``) and the assembled ``query_kontext`` model land with their issues (see README's status table)."""
