"""Training of Hyper-Bagel's accelerators, above the pipeline (inference packages never import this).

Stages (each ``python -m hyperbagel_core.training.<stage>``; docs/TRAINING.md):
  stage1_cfg   CFG distillation: guidance-scale embedders + generation expert, one pass without CFG
  tscd         trajectory-segmented consistency distillation onto the 6-NFE grid
  dmdo         distribution matching with ODE pairs on top of TSCD
  adversarial  1-NFE: adversarial stage (latent + pixel discriminators on the frozen teacher) and ReFL
  draft_head   the speculative-decoding draft head from regenerated answers
Shared by the stages: ``loop`` (loop, resume, state files, optimiser step), ``distributed`` (DDP / ZeRO-1 /
FSDP2), ``student`` (fp32 masters, weight installation, checkpointing, EMA), ``teacher`` (guided ODE on
items), ``data`` (prompts, edit pairs), ``evaluation`` (metrics, training-free baselines), ``cli`` (flags, setup).
"""
