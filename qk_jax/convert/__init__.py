"""Checkpoint conversion to and from transformers (Qwen2.5-VL) and diffusers (FLUX transformer, AutoencoderKL).
All parameter-name mapping lives in this package."""
