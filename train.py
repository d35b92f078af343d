"""Fine-tune a causal LM with MoE-LoRA adapters: ``python train.py fit --config configs/quickstart.yaml``.

Subcommands and options are LightningCLI's (``fit``, ``validate``, ``test``, ``--ckpt_path``,
``--print_config``); ``trainer.precision: auto`` picks bf16 only where the hardware runs it natively.
"""

from layermoe.cli import main

if __name__ == "__main__":
    main()
