"""Post-training: supervised fine-tuning on prompt/response pairs (sft.py), reinforcement learning
with verifiable rewards (GRPO, grpo.py) on tasks (tasks.py), and SFT data from a teacher's correct
answers (rejection sampling, distill.py), sharing common.py's run set-up.

Nothing is imported here, so that `moeforge --help` stays quick; import the modules themselves.
"""
