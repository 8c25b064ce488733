"""`belay bench`: one fixed PPO workload, measured per stage as services, in one process, and in TRL."""
