"""layermoe: MoE-LoRA fine-tuning whose per-block capacity follows per-layer influence (PyTorch Lightning)."""

from layermoe.quiet import silence_import_noise

silence_import_noise()  # before any subpackage imports bitsandbytes or Lightning
