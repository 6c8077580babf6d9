"""Ray Tune sweeps for cmr (``cmr tune``): Optuna search with an ASHA scheduler.

* ``tune.cmr_sweep`` — the continual router's knobs, objective the CMRBench continual protocol
  scored on a validation split carved out of the train splits (one Tune iteration per experience);
* ``tune.llm_sweep`` — the serving cost trade-off (λ, or a calibration target) on an outcome
  matrix, validation carved out of train;
* ``tune.pareto`` — Pareto front, table, PNG and the chosen-config files.

Nothing here runs at import time; Ray is imported inside the functions that start it.
"""
