"""The training machinery under ``bltdist.train``'s loop: ``state`` builds it all from a config
(``parallelize`` the model parts, ``optim`` the optimizer and schedule, ``step`` the micro-steps),
``checkpoint`` saves and restores it."""
