"""LoRA adapters: PEFT directories -> host tier -> device slot pools."""
