"""Loading a checkpoint into a model: plan, check, prepare, agree, commit, report."""
