"""Post-training: reinforcement learning with verifiable rewards (GRPO, grpo.py) on tasks (tasks.py).

Nothing is imported here, so that `moeforge --help` stays quick; import the modules themselves.
"""
