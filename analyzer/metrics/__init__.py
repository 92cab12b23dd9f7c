"""Pure numpy metric functions, one module per family. All work per MoE layer."""
