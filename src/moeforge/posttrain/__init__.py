"""Post-training: supervised fine-tuning on prompt/response pairs (sft.py) and reinforcement learning
with verifiable rewards (GRPO, grpo.py) on tasks (tasks.py), sharing common.py's run set-up.

Nothing is imported here, so that `moeforge --help` stays quick; import the modules themselves.
"""
