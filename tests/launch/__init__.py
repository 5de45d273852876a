"""The run on Ray (mostly `ray`-marked): trials, searches under Tune, `pf-ray compress` end to end, resume, remote
storage, multi-node, autoscaling, job submission, orphaned placement groups, the saved search state."""
