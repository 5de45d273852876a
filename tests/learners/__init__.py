"""pf_ray/learners: the learner contract every learner keeps, and each learner's own tests (prepare, finalize,
packed weights, search space, config errors)."""
